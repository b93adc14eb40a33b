"""batchseg status: from a live checkpoint, from the manifest alone, with and without a holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _storage import failed_result, make_config, make_items, ok_result, python
from fault_engine import write_settings

from batchseg.config import RunConfig
from batchseg.errors import OutputError, RunLockedError
from batchseg.lock import RunLock
from batchseg.records import Status
from batchseg.runner import run
from batchseg.status import collect_status, format_status
from batchseg.store.checkpoint import CHECKPOINT_NAME, Checkpoint
from batchseg.store.manifest import export_manifest

T0 = 1_700_000_000.0


def build_run(output_dir: Path) -> None:
    """20 ok images (1..20 s each, one finishing every second), 3 value errors, 1 timeout,
    1 running, 2 pending; manifest exported."""
    items = make_items(27)
    with Checkpoint.open(output_dir, make_config(prompts=("roof", "tree"))) as cp:
        cp.plan(items, use_hash=False)
        for k, item in enumerate(items[:20]):
            cp.record(ok_result(item, output_dir, duration=float(k + 1), finished=T0 + k), item)
        for item in items[20:23]:
            cp.record(failed_result(item, message=f"cannot decode {item.path}"), item)
        cp.record(failed_result(items[23], Status.TIMEOUT, None, "over 300 s"), items[23])
        cp.mark_started([items[24].path])
        export_manifest(cp, output_dir)


def check_report_content(output_dir: Path, source: str) -> None:
    report = collect_status(output_dir)
    assert report.source == source
    assert report.counts["ok"] == 20 and report.counts["error"] == 3 and report.counts["timeout"] == 1
    assert (report.in_flight, report.pending, report.not_ok, report.total) == (1, 2, 4, 27)
    assert report.prompts == ["roof", "tree"] and report.model_id == "models/sam3"
    assert (report.duration_p50_s, report.duration_p95_s) == (10.0, 19.0)
    # the error and timeout rows finished "now", long after the ok ones: only they are recent
    assert report.images_per_s is not None and report.images_per_s == pytest.approx(4 / 0.5, rel=0.2)
    top = report.top_errors[0]
    assert (top.status, top.error_type, top.count) == ("error", "ValueError", 3)
    assert top.example_path == "img/000020.jpg" and top.example_message == "cannot decode img/000020.jpg"
    assert [(g.status, g.count) for g in report.top_errors] == [("error", 3), ("timeout", 1)]
    assert report.live is None

    text = format_status(report)
    assert "images: 27 - ok 20, error 3, timeout 1, pending 2, running 1" in text
    assert "per ok image p50 10.00 s, p95 19.00 s" in text
    assert f"not ok: 4; rerun them with: batchseg retry {output_dir}" in text
    assert "error ValueError x3, e.g. img/000020.jpg: cannot decode img/000020.jpg" in text
    assert "in flight when the run stopped" in text
    assert f"from the {source}" in text
    assert json.loads(report.to_json())["counts"]["ok"] == 20


def test_status_from_the_checkpoint(tmp_path: Path) -> None:
    build_run(tmp_path)
    check_report_content(tmp_path, "checkpoint")


def test_status_from_the_manifest_alone(tmp_path: Path) -> None:
    build_run(tmp_path)
    (tmp_path / CHECKPOINT_NAME).unlink()
    check_report_content(tmp_path, "manifest")


def test_status_names_the_live_run(tmp_path: Path) -> None:
    build_run(tmp_path)
    with RunLock(tmp_path), Checkpoint.open(tmp_path, make_config(prompts=("roof", "tree"))) as cp:
        item = make_items(1, prefix="late")[0]
        cp.record(ok_result(item, tmp_path), item)  # written after the export: only the checkpoint has it
        report = collect_status(tmp_path)
        assert report.live is not None and report.live.pid == os.getpid()
        assert report.counts["ok"] == 21
        text = format_status(report)
        assert f"running now: batchseg pid {os.getpid()}" in text
        assert "in flight when the run stopped" not in text


def test_status_of_a_run_that_is_only_starting(tmp_path: Path) -> None:
    """Lock taken, checkpoint not written yet: a live run starting, not an error."""
    with RunLock(tmp_path):
        (tmp_path / "checkpoint.sqlite").write_bytes(b"")  # created, no run row yet
        report = collect_status(tmp_path)
        assert report.live is not None and report.live.pid == os.getpid()
        assert report.total == 0 and "starting" in (report.note or "")
        assert f"running now: batchseg pid {os.getpid()}" in format_status(report)


def test_status_of_a_folder_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="no batchseg run"):
        collect_status(tmp_path)


def test_a_fresh_run_reports_no_speed(tmp_path: Path) -> None:
    Checkpoint.open(tmp_path, make_config()).close()
    report = collect_status(tmp_path)
    assert report.total == 0 and report.images_per_s is None and report.duration_p50_s is None
    assert "no images finished" in format_status(report)


def test_storage_modules_never_import_torch() -> None:
    # A fresh interpreter: the test session itself may have torch loaded by other tests.
    code = (
        "import sys, batchseg.store.checkpoint, batchseg.store.manifest, batchseg.lock, batchseg.status;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_damaged_checkpoint_falls_back_to_the_manifest_and_says_why(tmp_path: Path) -> None:
    build_run(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"garbage" * 1000)
    report = collect_status(tmp_path)
    assert report.source == "manifest" and report.counts["ok"] == 20
    assert report.note is not None and "damaged" in report.note
    assert "note: the checkpoint" in format_status(report)
    (tmp_path / "manifest" / "images.parquet").unlink()
    with pytest.raises(OutputError, match="damaged"):
        collect_status(tmp_path)


def test_a_live_run_shows_its_task_as_running_and_leaves_none(tmp_path: Path) -> None:
    """A real run (fault engine, 0.4 s an image, tasks of 3): while it runs, status counts the
    images of the task in flight as running; when it ends, no row is left running; a warning in
    the worker reaches the run log."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in [f"slow_{k}" for k in range(5)] + ["warn_0"]:
        (folder / f"{name}.jpg").write_bytes(b"not decoded by the fault engine")
    state = tmp_path / "state"
    state.mkdir()
    config = RunConfig(
        input=folder,
        prompts=("roof",),
        output=tmp_path / "out",
        workers=1,
        progress_interval=60,
    )
    write_settings(folder, state_dir=str(state), slow_s=0.4, preferred_task_size=3)
    seen: list[int] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            try:
                seen.append(collect_status(tmp_path / "out").counts.get("running", 0))
            except Exception:  # noqa: BLE001, S112 - the checkpoint may not exist yet
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = run(config, factory="fault_engine:load_faulty")
    finally:
        finished.set()
        watcher.join()
    assert summary.counts["ok"] == 6
    # A whole task of 3, marked when the worker took it. The pool hands the worker its next task
    # before the finished one's results are committed (at the loop's next turn), so for that
    # moment a busy machine can show both tasks: never a part of one, never more than two.
    assert max(seen) in (3, 6), seen
    final = collect_status(tmp_path / "out")
    assert final.counts.get("running", 0) == 0 and final.counts["ok"] == 6
    # A warning shown in the worker is in the run log, not only on a console.
    log = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert "worker_warning" in log and "something to know about warn_0.jpg" in log


STATUS_LOOP = """
import sys
from pathlib import Path
from batchseg.errors import OutputError, RunLockedError
from batchseg.status import collect_status
out = Path(sys.argv[1])
print("looping", flush=True)
calls = 0
while True:
    try:
        collect_status(out)
    except OutputError:
        pass
    calls += 1
    if calls % 100 == 0:
        print(calls, flush=True)
"""


def test_status_in_a_loop_never_refuses_a_starting_run(tmp_path: Path) -> None:
    Checkpoint.open(tmp_path, make_config()).close()
    child = python(STATUS_LOOP.replace("sys.argv[1]", repr(str(tmp_path))))
    assert child.stdout is not None and child.stdout.readline().strip() == "looping"
    refused = starts = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            starts += 1
            try:
                with RunLock(tmp_path):
                    pass
            except RunLockedError:
                refused += 1
    finally:
        child.kill()
        out, _ = child.communicate(timeout=30)
    assert out.split(), "the status loop made too few calls to prove anything"
    assert refused == 0, f"{refused} of {starts} starts refused"
