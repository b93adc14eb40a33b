"""Checkpoint: real SQLite files on tmp_path, real child processes where durability is the point."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from _storage import failed_result, make_config, make_items, ok_result, python

from batchseg.errors import ConfigMismatchError, OutputError
from batchseg.records import FINAL_FAILURES, Item, Status
from batchseg.store.checkpoint import CHECKPOINT_NAME, Checkpoint
from batchseg.store.manifest import export_manifest
from batchseg.store.rebuild import open_run

TESTS = str(Path(__file__).parent)


def rows(output_dir: Path) -> dict[str, tuple[str, int]]:
    """path -> (status, attempts), read through a connection of its own."""
    with sqlite3.connect(output_dir / CHECKPOINT_NAME) as conn:
        return {p: (s, a) for p, s, a in conn.execute("SELECT path, status, attempts FROM images")}


def test_open_creates_a_wal_checkpoint_with_full_sync(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path, make_config()) as cp:
        assert cp.journal_mode == "wal"
        assert cp._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert cp.run_info().model_id == "models/sam3"
        assert cp.stored_config()["prompts"] == ["roof"]
    assert (tmp_path / CHECKPOINT_NAME).is_file()


def test_a_changed_fingerprint_is_refused_naming_each_field(tmp_path: Path) -> None:
    Checkpoint.open(tmp_path, make_config()).close()
    with pytest.raises(ConfigMismatchError) as err:
        Checkpoint.open(tmp_path, make_config(threshold=0.5, prompts=("roof", "tree")))
    message = str(err.value)
    assert "--threshold: 0.3 -> 0.5" in message  # named as the user gives it
    assert '--prompt: ["roof"] -> ["roof", "tree"]' in message
    assert "model" not in message.split("\n", 1)[1].split("Pass")[0]  # unchanged fields are not listed
    assert "--new-run" in message and "--output" in message


def test_options_outside_the_fingerprint_may_change_and_are_stored(tmp_path: Path) -> None:
    Checkpoint.open(tmp_path, make_config(workers=1)).close()
    with Checkpoint.open(tmp_path, make_config(workers=3, timeout=10.0)) as cp:
        assert cp.stored_config()["workers"] == 3
        assert cp.stored_config()["timeout"] == 10.0


def test_new_run_moves_the_earlier_run_aside(tmp_path: Path) -> None:
    item = make_items(1)[0]
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan([item], use_hash=False)
        cp.record(ok_result(item, tmp_path), item)
        export_manifest(cp, tmp_path)
        old_id = cp.run_id
    with open_run(tmp_path, make_config(threshold=0.6), new_run=True) as cp:
        assert cp.run_id != old_id
        assert sum(cp.counts().values()) == 0
        assert cp.plan([item], use_hash=False).counts["new"] == 1
    archive = tmp_path / "previous-runs" / old_id
    assert (archive / "masks" / f"{item.path}.png").is_file()
    assert (archive / "manifest" / "images.parquet").is_file()
    assert not (tmp_path / "masks").exists() and not (tmp_path / "manifest").exists()
    with Checkpoint.open_existing(archive) as old:
        assert old.counts()["ok"] == 1
        assert old.stored_config()["threshold"] == 0.3


def test_plan_sorts_new_changed_removed_and_failed_items(tmp_path: Path) -> None:
    a, b, c, d, e = make_items(5)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        assert cp.plan([a, b, c, d, e], use_hash=False).counts["new"] == 5
        for item in (a, b, c, d):
            cp.record(ok_result(item, tmp_path), item)
        cp.record(failed_result(e), e)

    b2 = Item(b.path, b.size_bytes + 1, b.mtime_ns)
    c2 = Item(c.path, c.size_bytes, c.mtime_ns + 5)
    f = Item("new/f.jpg", 1, 2)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        plan = cp.plan([f, a, b2, c2, e], use_hash=False)
    assert [i.path for i in plan.pending] == [f.path, b.path, c.path]  # input order
    assert plan.counts == {
        "done": 2,
        "failed": 1,
        "new": 1,
        "changed": 2,
        "resumed": 0,
        "in_flight_reset": 0,
        "mask_missing": 0,
        "restored": 0,
        "missing": 1,
        "pending": 3,
        "orphan_masks": 0,
    }
    state = rows(tmp_path)
    assert state[d.path][0] == "missing" and (tmp_path / f"masks/{d.path}.png").is_file()
    assert state[b.path] == ("pending", 0) and state[e.path][0] == "error"

    # d comes back unchanged: its earlier result stands again
    with Checkpoint.open(tmp_path, make_config()) as cp:
        back = cp.plan([a, d], use_hash=False)
    assert back.pending == [] and back.counts["restored"] == 1
    assert rows(tmp_path)[d.path][0] == "ok"


def test_changed_input_drops_its_old_detections(tmp_path: Path) -> None:
    (a,) = make_items(1)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.record(ok_result(a, tmp_path, n_det=3), a)
        cp.plan([Item(a.path, a.size_bytes + 1, a.mtime_ns)], use_hash=False)
        with cp.read_connection() as conn:
            assert conn.execute("SELECT count(*) FROM detections").fetchone()[0] == 0


def test_plan_with_hash_follows_content_not_mtime(tmp_path: Path) -> None:
    a = Item("a.jpg", 10, 100, "aa")
    b = Item("b.jpg", 10, 100, "bb")
    with Checkpoint.open(tmp_path, make_config(hash=True)) as cp:
        for item in (a, b):
            cp.record(ok_result(item, tmp_path), item)
        copied = Item("a.jpg", 10, 999, "aa")  # copied folder: new mtime, same bytes
        edited = Item("b.jpg", 10, 100, "bc")  # same size and mtime, other bytes
        plan = cp.plan([copied, edited], use_hash=True)
        assert [i.path for i in plan.pending] == ["b.jpg"] and plan.counts["changed"] == 1
        # the new mtime is kept, so a later run without --hash sees a unchanged
        assert cp.plan([copied, edited], use_hash=False).counts["done"] == 1
    with Checkpoint.open(tmp_path / "nohash", make_config()) as cp:
        cp.record(ok_result(b, tmp_path / "nohash"), b)
        assert cp.plan([Item("b.jpg", 10, 100, "zz")], use_hash=False).counts["done"] == 1


def test_plan_redoes_an_ok_image_whose_mask_is_gone(tmp_path: Path) -> None:
    a, b = make_items(2)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        for item in (a, b):
            cp.record(ok_result(item, tmp_path), item)
        (tmp_path / f"masks/{a.path}.png").unlink()
        plan = cp.plan([a, b], use_hash=False)
    assert plan.pending == [a] and plan.counts["mask_missing"] == 1 and plan.counts["done"] == 1


def test_items_running_at_a_crash_are_pending_again(tmp_path: Path) -> None:
    a, b, c = make_items(3)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan([a, b, c], use_hash=False)
        cp.mark_started([a.path, b.path])
        cp.record(ok_result(b, tmp_path), b)
    assert rows(tmp_path)[a.path][0] == "running"
    with Checkpoint.open(tmp_path, make_config()) as cp:
        plan = cp.plan([a, b, c], use_hash=False)
    assert plan.pending == [a, c]
    assert plan.counts["in_flight_reset"] == 1 and plan.counts["resumed"] == 1
    assert rows(tmp_path)[a.path][0] == "pending"


def test_record_replaces_detections_and_attempts_add_up_over_a_retry(tmp_path: Path) -> None:
    (a,) = make_items(1)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan([a], use_hash=False)
        cp.record(failed_result(a, Status.TIMEOUT, None, "took too long", attempts=2), a)
        assert cp.failed_items(FINAL_FAILURES) == [a]
        assert cp.failed_items([Status.CRASHED]) == []
        assert cp.reset_for_retry([a.path]) == 1
        cp.record(ok_result(a, tmp_path, n_det=4), a)
        cp.record(ok_result(a, tmp_path, n_det=2), a)  # a final row starts its count over
        with cp.read_connection() as conn:
            assert conn.execute("SELECT count(*) FROM detections").fetchone()[0] == 2
            error = conn.execute("SELECT error_type, error_message FROM images").fetchone()
        assert error == (None, None)
    assert rows(tmp_path)[a.path] == ("ok", 1)

    with Checkpoint.open(tmp_path / "retry", make_config()) as cp:
        cp.record(failed_result(a, attempts=2), a)
        cp.reset_for_retry([a.path])
        cp.record(failed_result(a, attempts=1), a)
    assert rows(tmp_path / "retry")[a.path] == ("error", 3)


def test_record_is_visible_to_another_process_at_once(tmp_path: Path) -> None:
    (a,) = make_items(1)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.record(ok_result(a, tmp_path), a)
        # A separate process reads while the writer is still open.
        code = (
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
            "print(c.execute('SELECT status FROM images').fetchall())"
        )
        child = python(code.replace("sys.argv[1]", repr(str(tmp_path / CHECKPOINT_NAME))))
        out, _ = child.communicate(timeout=30)
    assert out.strip() == "[('ok',)]"


WRITER = f"""
import sys
sys.path.insert(0, {TESTS!r})
from pathlib import Path
from _storage import make_config, make_items, ok_result
from batchseg.store.checkpoint import Checkpoint
cp = Checkpoint.open(Path(sys.argv[1]), make_config())
for item in make_items(1_000_000):
    cp.record(ok_result(item, n_det=3), item)
    print(item.path, flush=True)
"""


def test_a_killed_writer_keeps_every_record_that_returned(tmp_path: Path) -> None:
    # A real child process, SIGKILLed between (or during) commits.
    child = python(WRITER.replace("sys.argv[1]", repr(str(tmp_path))))
    assert child.stdout is not None
    returned = [child.stdout.readline().strip() for _ in range(100)]
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate(timeout=30)
    returned += rest.split()
    assert child.returncode == -signal.SIGKILL
    with Checkpoint.open_existing(tmp_path) as cp:
        with cp.read_connection() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            have = {p for (p,) in conn.execute("SELECT path FROM images WHERE status='ok'")}
            n_det = conn.execute("SELECT count(*) FROM detections").fetchone()[0]
    assert set(returned) <= have
    assert n_det == 3 * len(have)  # no image row without its detections, or the other way round


def test_a_damaged_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"this is not sqlite" * 1000)
    with pytest.raises(OutputError, match="damaged.*Move it away"):
        Checkpoint.open(tmp_path, make_config())
    with pytest.raises(OutputError, match="damaged"):
        Checkpoint.open_existing(tmp_path)


def test_a_damaged_checkpoint_error_points_at_the_manifest(tmp_path: Path) -> None:
    (a,) = make_items(1)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.record(ok_result(a, tmp_path), a)
        export_manifest(cp, tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"garbage" * 1000)
    with pytest.raises(OutputError, match="manifest.*rebuild the checkpoint"):
        Checkpoint.open(tmp_path, make_config())
    # --new-run moves the damaged file aside and starts clean
    with open_run(tmp_path, make_config(), new_run=True) as cp:
        assert cp.counts()["ok"] == 0
    assert list((tmp_path / "previous-runs").glob(f"*/{CHECKPOINT_NAME}"))


def test_a_lost_checkpoint_is_rebuilt_from_the_manifest(tmp_path: Path) -> None:
    a, b, c = make_items(3)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan([a, b, c], use_hash=False)
        cp.record(ok_result(a, tmp_path, n_det=2), a)
        cp.record(failed_result(b), b)
        cp.mark_started([c.path])
        export_manifest(cp, tmp_path)
        run_id = cp.run_id
    (tmp_path / CHECKPOINT_NAME).unlink()
    with pytest.raises(ConfigMismatchError, match="threshold"):
        open_run(tmp_path, make_config(threshold=0.9))
    with open_run(tmp_path, make_config()) as cp:
        assert cp.run_id == run_id
        assert cp.counts()["ok"] == 1 and cp.counts()["error"] == 1
        plan = cp.plan([a, b, c], use_hash=False)
        with cp.read_connection() as conn:
            assert conn.execute("SELECT count(*) FROM detections").fetchone()[0] == 2
    assert plan.pending == [c] and plan.counts["done"] == 2


def test_open_existing_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="no batchseg checkpoint"):
        Checkpoint.open_existing(tmp_path)


def test_a_read_only_checkpoint_refuses_writes(tmp_path: Path) -> None:
    (a,) = make_items(1)
    Checkpoint.open(tmp_path, make_config()).close()
    with Checkpoint.open_existing(tmp_path, read_only=True) as cp:
        assert cp.counts()["ok"] == 0
        with pytest.raises(OutputError, match="read-only"):
            cp.record(ok_result(a), a)


def _plan_timing(tmp_path: Path, total: int, done: int) -> float:
    # 100 sub-folders, as a large aerial survey would have
    items = [
        Item(f"d{k % 100:02d}/{i.path}", i.size_bytes, i.mtime_ns) for k, i in enumerate(make_items(total))
    ]
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan(items[:done], use_hash=False)
        for start in range(0, done, 10_000):
            chunk = items[start : min(start + 10_000, done)]
            cp.record_many([(ok_result(item, tmp_path), item) for item in chunk])
    with Checkpoint.open(tmp_path, make_config()) as cp:
        start = time.perf_counter()
        plan = cp.plan(items, use_hash=False)
        elapsed = time.perf_counter() - start
    assert plan.counts["done"] == done and plan.counts["new"] == total - done
    print(f"plan() of {total:,} items with {done:,} done: {elapsed:.2f} s", file=sys.stderr)
    return elapsed


def _plan_selects(folder: Path, total: int, done: int) -> list[str]:
    items = make_items(total)
    with Checkpoint.open(folder, make_config()) as cp:
        cp.record_many([(ok_result(item, folder), item) for item in items[:done]])
        statements: list[str] = []
        cp._conn.set_trace_callback(statements.append)
        plan = cp.plan(items, use_hash=False)
        cp._conn.set_trace_callback(None)
    assert plan.counts["done"] == done and len(plan.pending) == total - done
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


def test_plan_reads_the_checkpoint_with_two_selects_whatever_the_size(tmp_path: Path) -> None:
    """The rows' mask paths (merged with the walk of masks/) and the rows (merged with the items)."""
    small = _plan_selects(tmp_path / "small", 60, 50)
    assert len(small) == 2 and small == _plan_selects(tmp_path / "large", 600, 500)


@pytest.mark.slow
def test_plan_of_200k_items_takes_under_two_seconds(tmp_path: Path) -> None:
    # Setup (190,000 mask files and rows) takes ~15 s; plan() itself ~0.6 s on a quiet machine.
    assert _plan_timing(tmp_path, 200_000, 190_000) < 2.0


def test_a_broken_result_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    a, b = make_items(2)
    twice = ok_result(b, tmp_path, n_det=2)
    twice.detections[1] = twice.detections[0]
    with Checkpoint.open(tmp_path, make_config()) as cp:
        with pytest.raises(ValueError, match="repeats a detection index"):
            cp.record_many([(ok_result(a, tmp_path), a), (twice, b)])
        with pytest.raises(ValueError, match="recorded with item"):
            cp.record(ok_result(a, tmp_path), b)
        assert cp.counts()["ok"] == 0


@pytest.mark.slow
def test_record_rate_with_a_commit_per_result(tmp_path: Path) -> None:
    # One fsync per record(): this measures the disk under the output folder.
    items = make_items(1_000)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        start = time.perf_counter()
        for item in items:
            cp.record(ok_result(item, n_det=10), item)
        rate = len(items) / (time.perf_counter() - start)
    print(f"record(): {rate:,.0f} results/s (10 detections each, synchronous=FULL)", file=sys.stderr)
    assert rate > 50  # far above what a pool of SAM3 workers produces


def test_a_full_disk_is_an_output_error_that_says_so(tmp_path: Path) -> None:
    items = make_items(200)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        # SQLite's own page limit gives the same SQLITE_FULL a full disk gives.
        pages = cp._conn.execute("PRAGMA page_count").fetchone()[0]
        cp._conn.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(OutputError, match="is full; free space and run again"):
            for item in items:
                cp.record(ok_result(item, n_det=20), item)
        cp._conn.execute("PRAGMA max_page_count=1073741823")
        cp.record(ok_result(items[0], n_det=1), items[0])  # usable again once there is room


def test_an_output_folder_made_before_the_engine_option_resumes(tmp_path: Path) -> None:
    """tests/data/run-made-by-0.1.0 was written by batchseg 0.1.0 before `engine` joined the
    fingerprint (tests/_storage.make_config, one image ok): it must resume without --new-run."""
    folder = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "run-made-by-0.1.0", folder)
    with Checkpoint.open(folder, make_config()) as cp:
        assert cp.counts()["ok"] == 1
    with pytest.raises(ConfigMismatchError, match="engine"):
        Checkpoint.open(folder, make_config(engine="batchseg.engines.threshold:load"))


def test_a_mask_written_but_never_recorded_is_removed_at_resume(tmp_path: Path) -> None:
    a, b, c = make_items(3)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan([a, b, c], use_hash=False)
        cp.record(ok_result(a, tmp_path), a)
        ok_result(b, tmp_path)  # the worker wrote b's mask; the process died before the commit
    (tmp_path / "masks" / "notes.txt").write_text("not a mask: somebody else's file")
    (tmp_path / f"masks/{c.path}.tif").write_bytes(b"II*\x00 a tiled label map of c, never recorded")
    with Checkpoint.open(tmp_path, make_config()) as cp:
        plan = cp.plan([a, b, c], use_hash=False)
    assert plan.counts["orphan_masks"] == 2 and [i.path for i in plan.pending] == [b.path, c.path]
    assert (tmp_path / f"masks/{a.path}.png").is_file()
    assert not (tmp_path / f"masks/{b.path}.png").exists()
    assert not (tmp_path / f"masks/{c.path}.tif").exists()
    assert (tmp_path / "masks" / "notes.txt").is_file()


def test_an_output_folder_of_schema_1_gains_the_new_column_and_rebuilds_from_its_manifest(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "old"
    shutil.copytree(Path(TESTS) / "data" / "run-made-by-0.1.0", folder)
    with sqlite3.connect(folder / CHECKPOINT_NAME) as conn:
        assert "path_raw" not in {r[1] for r in conn.execute("PRAGMA table_info(images)")}
        known = [Item(*row) for row in conn.execute("SELECT path, size_bytes, mtime_ns FROM images")]
    odd = Item(os.fsdecode(b"caf\xe9.jpg"), 5, 6)
    with Checkpoint.open(folder, make_config()) as cp:
        plan = cp.plan([*known, odd], use_hash=False)
        assert plan.counts["done"] == 1 and plan.pending == [known[1], odd]
        cp.record(failed_result(odd), odd)
        assert cp.failed_items(FINAL_FAILURES) == [odd]
    (folder / CHECKPOINT_NAME).unlink()  # the 0.1.0 manifest has neither path_raw nor an export id
    with open_run(folder, make_config()) as cp:
        assert cp.counts()["ok"] == 1
