"""Durable checkpoint: a run killed at any moment resumes without losing or repeating finished work.

The kill loop drives a real ``python -m batchseg run`` process (CliRunner runs inside the test
process, which cannot be SIGKILLed); the other tests go through CliRunner and check through the
checkpoint, the Parquet manifests and the mask files.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from _runs import (
    LiveRun,
    check_masks,
    checkpoint_rows,
    describe,
    names,
    ok_rows,
    read_manifests,
    run_args,
    start_run,
    survivors_after,
    temp_files,
    wait_until,
    worker_pids,
    written_after,
)
from click.testing import CliRunner, Result
from conftest import make_image

from batchseg.atomic import TEMP_SUFFIX
from batchseg.cli import cli
from batchseg.config import RunConfig
from batchseg.engines.sam3.engine import CPU_SUB_BATCHES_PER_TASK
from batchseg.errors import ConfigMismatchError
from batchseg.options import Option, fingerprint_options
from batchseg.pool_pass import COMMIT_WINDOW_S
from batchseg.prompt_values import ExemplarsKind
from batchseg.runner import resolve_config, run
from batchseg.store.checkpoint import Checkpoint

# ---- kill -9 at 11 points, resume each time -------------------------------------------------------

N_IMAGES = 24
SEED = 20260509
#: Workers notice a dead parent within a second (they poll it); a little slack for busy cores.
ORPHAN_GRACE_S = 5.0


@dataclass
class Kill:
    """One killed run: the planned trigger and what the output folder showed afterwards."""

    trigger: str
    before_ready: bool = False  # the log of the run has no worker_ready line: killed loading
    committed: int = 0  # images this run made durable before it died
    uncommitted: list[str] = field(default_factory=list)  # mask written, result not durable
    running: list[str] = field(default_factory=list)  # rows the checkpoint shows in flight
    export_temp: bool = False  # a manifest temp file of this run was there: killed exporting


def _schedule(rng: random.Random) -> list[str]:
    """11 kill triggers: startup and model load first, then inside the image loop (an early kill
    among them finds the rows an earlier kill left running), then the export.

    The first export kill comes while a few images are still pending, so it lands at the end of a
    run that processed images; the later ones land in runs with nothing left to do.
    """
    middle = ["mid"] * 3 + ["commit"] * 2 + ["early"]
    rng.shuffle(middle)
    return ["early", "load", *middle, "export", "export", "export"]


def _trigger(run: LiveRun, trigger: str, rng: random.Random, masks: Path, manifest: Path) -> None:
    """Wait for the moment ``trigger`` names (or the end of the run)."""
    masks_before = names(masks)
    temps_before = names(manifest, TEMP_SUFFIX)
    if trigger == "early":  # interpreter start, discovery, checkpoint open and plan
        time.sleep(rng.uniform(0.05, 1.0))
    elif trigger == "load":  # the worker exists and imports torch / loads the model
        _poll(run, lambda: bool(worker_pids(run.tag)), 0.05)
        time.sleep(rng.uniform(0.0, 1.0))
    elif trigger in ("mid", "commit"):
        wanted = rng.randint(1, 4) if trigger == "mid" else rng.randint(1, 2)
        # "commit": the moment a mask file lands, before its result reaches the checkpoint.
        seen: list[float] = []

        def landed() -> bool:
            count = len(names(masks) - masks_before)
            seen.extend([time.monotonic()] * (count - len(seen)))
            return count >= wanted

        _poll(run, landed, 0.002 if trigger == "mid" else 0.0005)
        if trigger == "mid" and len(seen) >= 2:
            # Somewhere inside a following image, whatever the speed of this machine today.
            per_image = (seen[-1] - seen[0]) / (len(seen) - 1)
            time.sleep(rng.uniform(0.0, 1.5) * per_image)
        elif trigger == "mid":
            time.sleep(rng.uniform(0.0, 0.05))
    elif trigger == "export":
        _poll(run, lambda: bool(names(manifest, TEMP_SUFFIX) - temps_before), 0.0002)


def _poll(run: LiveRun, condition: Any, interval: float) -> None:
    deadline = time.monotonic() + 120
    while run.alive() and time.monotonic() < deadline and not condition():
        if interval:
            time.sleep(interval)


def _run_log(output: Path, since_ns: int) -> str:
    logs = [p for p in (output / "logs").glob("*.log") if p.stat().st_mtime_ns >= since_ns]
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(logs))


def _check_after_kill(
    run: LiveRun, kill: Kill, output: Path, durable: dict[str, dict[str, Any]], manifest_temps: set[str]
) -> None:
    """What must hold in the output folder right after a kill, before anything resumes."""
    left = survivors_after(run.tag, ORPHAN_GRACE_S)
    assert not left, f"{kill.trigger} kill: processes outlived the killed run:\n{describe(left)}"
    if run.reaped_ns is not None:
        # A worker whose parent died stops at once (Linux: parent-death signal): it must not go on
        # to write the masks of the images it had, racing the run that resumes. The kernel sends
        # the signal while the parent exits, so it has been sent when the parent is reaped (a
        # parent killed in an fsync exits only when the fsync returns). After that a worker can
        # finish at most the system call it is in: a write to a temp file, which never becomes a
        # mask (a rename keeps the file's mtime). So no finished file is newer than the reaping.
        late = written_after(output / "masks", run.reaped_ns)
        assert not late, f"{kill.trigger} kill: written after the parent was gone: {late}"
    rows = checkpoint_rows(output)
    for path, row in durable.items():
        # Finished work is never lost and never redone: the row is exactly what it was.
        assert rows.get(path) == row, f"{kill.trigger} kill: {path} changed: {row} -> {rows.get(path)}"
    now_ok = {p: r for p, r in rows.items() if r["status"] == "ok"}
    kill.committed = len(now_ok) - len(durable)
    for path, row in now_ok.items():
        assert (output / row["mask_path"]).is_file(), f"{path} is ok in the checkpoint without its mask"
    # Masks without their commit: this run's (kill.uncommitted), and an earlier killed run's when
    # this one died before its plan() redid them.
    lacking = {p.name[: -len(".png")]: p for p in (output / "masks").glob("*.png")}
    for path in now_ok:
        lacking.pop(path, None)
    kill.uncommitted = sorted(n for n, p in lacking.items() if p.stat().st_mtime_ns >= run.started_ns)
    kill.running = sorted(p for p, r in rows.items() if r["status"] == "running")
    # Results are committed in groups at most COMMIT_WINDOW_S after the first of a group arrived:
    # only masks written that recently (plus the images in flight) may lack their commit.
    if run.killed_ns is not None:
        window_ns = int((COMMIT_WINDOW_S + 1.0) * 1e9)
        for name in kill.uncommitted:
            age_ns = run.killed_ns - lacking[name].stat().st_mtime_ns
            assert age_ns <= window_ns, f"{kill.trigger} kill lost {name}, done {age_ns / 1e9:.1f}s before"
    # Running: the task the worker held (batch-1 sub-batches), plus images of the task before it
    # whose results had arrived (their masks written) but were not committed yet. A kill before
    # plan() finds the rows an earlier kill left running, with that run's masks.
    assert len(set(kill.running) - set(lacking)) <= CPU_SUB_BATCHES_PER_TASK, kill
    if (output / "manifest" / "images.parquet").exists():
        # Swapped in whole or not at all: a kill during an export leaves the earlier manifest.
        images, _ = read_manifests(output)
        assert len({r["path"] for r in images}) == len(images)
    kill.before_ready = "worker_ready" not in _run_log(output, run.started_ns)
    kill.export_temp = bool(names(output / "manifest", TEMP_SUFFIX) - manifest_temps)
    durable.update(now_ok)


def test_sigkill_at_11_points_resumes_without_losing_or_repeating_work(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "aerial"
    for i in range(N_IMAGES):
        make_image(folder / f"img{i:02d}.png", (160, 120), i)
    output = tmp_path / "out"
    # One worker, batch 1: at most one task's images are in flight (running) when the parent dies.
    args = run_args(folder, output, tiny_model, "--batch-size", "1")
    rng = random.Random(SEED)
    durable: dict[str, dict[str, Any]] = {}
    kills: list[Kill] = []
    in_flight_at_kill: Counter[str] = Counter()
    for trigger in _schedule(rng):
        for _ in range(3):  # a trigger that never comes (the run ended first) is tried again
            manifest_temps = names(output / "manifest", TEMP_SUFFIX)
            run = start_run(args, tmp_path / "console.txt", cwd=tmp_path)
            _trigger(run, trigger, rng, output / "masks", output / "manifest")
            if not run.alive():
                assert run.wait(5) == 0, run.output()
                _check_after_kill(run, Kill("(ran to the end)"), output, durable, manifest_temps)
                continue
            run.kill()
            kill = Kill(trigger)
            _check_after_kill(run, kill, output, durable, manifest_temps)
            kills.append(kill)
            in_flight_at_kill.update(kill.uncommitted + kill.running)
            break

    summary = "\n".join(str(k) for k in kills)
    assert len(kills) >= 11, summary
    # The kills really are spread over a run's life.
    assert sum(k.before_ready for k in kills) >= 3, summary
    assert sum(k.committed > 0 for k in kills) >= 4, summary
    assert sum(k.export_temp for k in kills) >= 2, summary
    assert sum(bool(k.uncommitted) for k in kills) >= 1, "no kill landed between a mask and its commit"

    final = start_run(args, tmp_path / "console.txt", cwd=tmp_path)
    assert final.wait(240) == 0, final.output()
    assert not survivors_after(final.tag, ORPHAN_GRACE_S)

    images, detections = read_manifests(output)
    paths = [r["path"] for r in images]
    assert sorted(paths) == [f"img{i:02d}.png" for i in range(N_IMAGES)], "every image exactly once"
    assert {r["status"] for r in images} == {"ok"}
    check_masks(output, images, detections)
    # A kill is not a failed attempt: an image it caught in flight is pending again, with its
    # attempts as they were, and no image of this folder fails. So each ended ok at its first
    # recorded attempt, however many kills caught it (a kill counted as a try would make it 2).
    caught = [p for p, n in in_flight_at_kill.items() if n]
    assert caught, "no kill caught an image in flight"
    assert {r["path"]: r["attempts"] for r in images} == {r["path"]: 1 for r in images}
    final_rows = ok_rows(output)
    for path, row in durable.items():
        assert final_rows[path] == row, f"{path} was redone after it was durable"
    leftovers = temp_files(output)
    assert not leftovers, f"temp files left after the resumed run finished: {leftovers}\n{summary}"


# ---- configuration, new runs, retry, incremental (CliRunner: no kill needed) -----------------------


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def manifest_rows(output: Path) -> dict[str, dict[str, Any]]:
    images, _ = read_manifests(output)
    return {r["path"]: r for r in images}


def folder_of(root: Path, *names_: str) -> Path:
    for seed, name in enumerate(names_, start=1):
        make_image(root / name, (96, 72), seed)
    return root


def test_config_change_is_refused_naming_the_field_and_new_run_starts_afresh(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = folder_of(tmp_path / "in", "a.png", "b.png", "sub/c.png")
    output = tmp_path / "out"
    assert invoke(*run_args(folder, output, tiny_model)).exit_code == 0
    before = checkpoint_rows(output)
    old_run_id = manifest_rows(output)["a.png"]["run_id"]

    for flag, value in (("--threshold", "0.5"), ("--max-detections", "7")):
        refused = invoke(*run_args(folder, output, tiny_model), flag, value)
        assert refused.exit_code == 1, refused.output
        assert f"{flag}: " in refused.output and value in refused.output, refused.output
        assert "--new-run" in refused.output
        assert checkpoint_rows(output) == before, "a refused run must not touch the checkpoint"

    fresh = invoke(*run_args(folder, output, tiny_model), "--threshold", "0.5", "--new-run")
    assert fresh.exit_code == 0, fresh.output
    assert "processed 3 images" in fresh.output
    archived = output / "previous-runs" / old_run_id
    assert (archived / "checkpoint.sqlite").is_file()
    assert pq.read_table(archived / "manifest" / "images.parquet").num_rows == 3
    moved = sorted(p.relative_to(archived).as_posix() for p in (archived / "masks").rglob("*.png"))
    assert moved == ["masks/a.png.png", "masks/b.png.png", "masks/sub/c.png.png"]
    rows = manifest_rows(output)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert {r["run_id"] for r in rows.values()} != {old_run_id}
    last_old_finish = max(r["finished_at"] for r in before.values())
    assert all(r["started_at"].timestamp() >= last_old_finish for r in rows.values()), "all redone"
    check_masks(output, *read_manifests(output))


def _broken_then_fixed_setup(tiny_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = folder_of(tmp_path / "in", "a.png", "b.png", "c.png")
    (folder / "bad.png").write_text("not an image at all")
    output = tmp_path / "out"
    first = invoke(*run_args(folder, output, tiny_model))
    assert first.exit_code == 3, first.output
    assert manifest_rows(output)["bad.png"]["status"] == "invalid_input"
    return folder, output


def test_retry_reruns_only_the_failed_image(tiny_model: Path, tmp_path: Path) -> None:
    folder, output = _broken_then_fixed_setup(tiny_model, tmp_path)
    before = manifest_rows(output)

    # A status filter that matches nothing reruns nothing (and starts no worker).
    nothing = invoke("retry", output, "--status", "timeout")
    assert nothing.exit_code == 3, nothing.output
    assert "processed 0 images" in nothing.output
    assert manifest_rows(output) == before

    make_image(folder / "bad.png", (96, 72), 9)  # the user replaces the broken file
    fixed = invoke("retry", output, "--status", "invalid_input")
    assert fixed.exit_code == 0, fixed.output
    assert "processed 1 images" in fixed.output
    after = manifest_rows(output)
    assert after["bad.png"]["status"] == "ok" and after["bad.png"]["attempts"] == 1
    for path in ("a.png", "b.png", "c.png"):
        assert after[path]["started_at"] == before[path]["started_at"], f"{path} was redone"
        assert after[path]["worker_pid"] == before[path]["worker_pid"]
    check_masks(output, *read_manifests(output))


def test_retry_works_from_the_manifest_alone(tiny_model: Path, tmp_path: Path) -> None:
    folder, output = _broken_then_fixed_setup(tiny_model, tmp_path)
    before = manifest_rows(output)
    for name in ("checkpoint.sqlite", "checkpoint.sqlite-wal", "checkpoint.sqlite-shm"):
        (output / name).unlink(missing_ok=True)
    make_image(folder / "bad.png", (96, 72), 9)

    fixed = invoke("retry", output)
    assert fixed.exit_code == 0, fixed.output
    assert "processed 1 images" in fixed.output
    after = manifest_rows(output)
    assert after["bad.png"]["status"] == "ok"
    for path in ("a.png", "b.png", "c.png"):
        assert after[path]["started_at"] == before[path]["started_at"], f"{path} was redone"
    assert after["a.png"]["run_id"] == before["a.png"]["run_id"], "the same run goes on"
    assert (output / "checkpoint.sqlite").is_file(), "the checkpoint is rebuilt"
    check_masks(output, *read_manifests(output))


def test_incremental_new_changed_removed_and_hash(tiny_model: Path, tmp_path: Path) -> None:
    folder = folder_of(tmp_path / "in", "a.png", "b.png", "c.png", "d.bmp")
    output = tmp_path / "out"
    assert invoke(*run_args(folder, output, tiny_model, "--hash")).exit_code == 0
    before = manifest_rows(output)

    make_image(folder / "e.png", (96, 72), 5)  # new
    make_image(folder / "b.png", (120, 90), 6)  # changed: other content, size and mtime
    (folder / "c.png").unlink()  # removed
    # d.bmp: same size (uncompressed BMP of the same dimensions), same mtime, other pixels.
    stat = (folder / "d.bmp").stat()
    make_image(folder / "d.bmp", (96, 72), 7)
    os.utime(folder / "d.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "d.bmp").stat().st_size == stat.st_size

    plain = invoke(*run_args(folder, output, tiny_model))
    assert plain.exit_code == 0, plain.output
    assert "processed 2 images" in plain.output
    rows = manifest_rows(output)
    assert sorted(rows) == ["a.png", "b.png", "c.png", "d.bmp", "e.png"]
    assert rows["e.png"]["status"] == "ok"
    assert rows["b.png"]["started_at"] > before["b.png"]["started_at"]
    assert (rows["b.png"]["width"], rows["b.png"]["height"]) == (120, 90)
    assert rows["c.png"]["status"] == "missing"
    assert (output / before["c.png"]["mask_path"]).is_file(), "a missing image keeps its old mask"
    for path in ("a.png", "d.bmp"):  # without --hash, d.bmp looks unchanged
        assert rows[path]["started_at"] == before[path]["started_at"]

    hashed = invoke(*run_args(folder, output, tiny_model, "--hash"))
    assert hashed.exit_code == 0, hashed.output
    assert "processed 1 images" in hashed.output
    after = manifest_rows(output)
    assert after["d.bmp"]["started_at"] > before["d.bmp"]["started_at"], "--hash sees the new content"
    for path in ("a.png", "b.png", "e.png"):
        assert after[path]["started_at"] == rows[path]["started_at"]
    check_masks(output, *read_manifests(output))


# ---- the run lock ---------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from batchseg.lock import RunLock
lock = RunLock(Path(sys.argv[1]))  # kept referenced: a collected FileLock lets go
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_refuses_a_second_run_and_a_stale_lock_is_taken_over(tiny_model: Path, tmp_path: Path) -> None:
    folder = folder_of(tmp_path / "in", "a.png")
    output = tmp_path / "out"
    # A real process holds the folder (no model: only the lock), as a live run would.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        refused = invoke(*run_args(folder, output, tiny_model))
        assert refused.exit_code == 1, refused.output
        assert f"pid {holder.pid}" in refused.output, refused.output
        assert not (output / "checkpoint.sqlite").exists(), "a refused run writes nothing"
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert (output / ".batchseg.lock").exists()
    taken = invoke(*run_args(folder, output, tiny_model))
    assert taken.exit_code == 0, taken.output
    assert manifest_rows(output)["a.png"]["status"] == "ok"


def test_a_live_run_refuses_a_second_one_and_the_manifest_stays_readable(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = folder_of(tmp_path / "in", "first1.png", "first2.png")
    output = tmp_path / "out"
    assert invoke(*run_args(folder, output, tiny_model)).exit_code == 0
    for i in range(12):  # seconds of writing after the first of them: 20 reads take well under one
        make_image(folder / "more" / f"m{i:02d}.png", (64, 48), i)
    live = start_run(run_args(folder, output, tiny_model), tmp_path / "console.txt", cwd=tmp_path)
    try:
        assert wait_until(lambda: f'"pid": {live.pid}' in _lock_info(output), 60, while_alive=live)
        refused = invoke(*run_args(folder, output, tiny_model))
        assert refused.exit_code == 1, refused.output
        assert f"pid {live.pid}" in refused.output, refused.output
        # MANIFEST_INTERVAL_S (300 s) has no test hook, so the manifest read here is the one the
        # earlier run exported; the point is that a live run never leaves it half written.
        assert wait_until(lambda: bool(names(output / "masks" / "more")), 60, 0.01, while_alive=live)
        reads = 0
        while live.alive() and reads < 20:  # each read starts while the run is writing
            images, _ = read_manifests(output)
            assert sorted(r["path"] for r in images) == ["first1.png", "first2.png"]
            reads += 1
        assert reads >= 1, "the run ended before the manifest could be read beside it"
        assert live.wait(120) == 0, live.output()
    finally:
        if live.alive():
            live.kill()
    rows = manifest_rows(output)
    assert len(rows) == 14 and {r["status"] for r in rows.values()} == {"ok"}


def _lock_info(output: Path) -> str:
    try:
        return (output / ".batchseg.lock.json").read_text()
    except OSError:
        return ""


# ---- a broken output folder -----------------------------------------------------------------------


def test_unwritable_mask_folder_stops_with_exit_1_and_keeps_finished_work(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = folder_of(tmp_path / "in", "a.png", "b.png", "z/c.png", "z/d.png")
    output = tmp_path / "out"
    (output / "masks").mkdir(parents=True)
    (output / "masks" / "z").write_text("a file where the folder z/ of masks should be")
    args = run_args(folder, output, tiny_model)
    broken = invoke(*args)
    assert broken.exit_code == 1, broken.output
    assert "cannot write" in broken.output and "masks/z" in broken.output, broken.output
    rows = checkpoint_rows(output)
    assert rows["a.png"]["status"] == rows["b.png"]["status"] == "ok", rows
    assert all(rows[p]["status"] != "ok" for p in ("z/c.png", "z/d.png")), rows

    (output / "masks" / "z").unlink()  # the user fixes the folder and runs the same command again
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    after = checkpoint_rows(output)
    assert {r["status"] for r in after.values()} == {"ok"}, after
    for path in ("a.png", "b.png"):
        assert after[path] == rows[path], f"{path} was redone"
    check_masks(output, *read_manifests(output))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (needs root and mount rights; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_stops_with_exit_1_and_resumes_after_space_is_freed(
    tiny_model: Path, tmp_path: Path, tiny_disk: Path
) -> None:
    folder = folder_of(tmp_path / "in", *(f"a{i}.png" for i in range(6)))
    output = tiny_disk / "out"
    args = run_args(folder, output, tiny_model)
    assert invoke(*args).exit_code == 0
    done = checkpoint_rows(output)
    for i in range(20):
        make_image(folder / f"b{i:02d}.png", (96, 72), i)
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 96 * 1024))

    full = invoke(*args)
    assert full.exit_code == 1, full.output
    text = full.output.lower()
    assert "full" in text or "no space" in text, full.output
    rows = checkpoint_rows(output)
    for path, row in done.items():
        assert rows[path] == row, f"{path} was lost or redone"
        assert (output / row["mask_path"]).is_file()

    (tiny_disk / "filler").unlink()
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    after = checkpoint_rows(output)
    assert len(after) == 26 and {r["status"] for r in after.values()} == {"ok"}
    for path, row in done.items():
        assert after[path] == row
    check_masks(output, *read_manifests(output))


# ---- every fingerprint option, changed on resume --------------------------------------------------

#: A value other than the base run's for each fingerprint option. Keyed by the registry's names and
#: checked against it, so a new fingerprint option fails this test until it has a value here.
CHANGED = {
    "prompts": ("blue",),
    "exemplars": ExemplarsKind().from_text(str(Path(__file__).parent / "data" / "exemplars" / "red.csv")),
    "classes": (("red", "paint"),),
    "prompt_thresholds": (("red", 0.5),),
    "suppress_iou": 0.5,
    "model": "other/model",
    "engine": "batchseg.engines.sam3.engine:load_engine",
    "dtype": "float32",
    "threshold": 0.5,
    "mask_threshold": 0.4,
    "max_detections": 7,
    "max_pixels": 1_000_000,
    "tile": "512",
    "tile_overlap": 20,
    "tile_match": 0.7,
    "gsd": 0.3,
    "bands": (1,),
    "simplify": 1.0,
}


def test_every_fingerprint_option_has_a_changed_value_here() -> None:
    assert set(CHANGED) == {o.name for o in fingerprint_options()}


def colour_config(folder: Path, output: Path) -> RunConfig:
    return RunConfig(
        input=folder, output=output, prompts=("red",), engine="batchseg.engines.threshold:load", workers=1
    )


@pytest.fixture(scope="module")
def colour_run_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fingerprint")
    folder = folder_of(root / "in", "a.png", "b.png")
    assert run(colour_config(folder, root / "out")).exit_code == 0
    return folder, root / "out"


@pytest.mark.parametrize("option", fingerprint_options(), ids=lambda o: o.name)
def test_each_fingerprint_option_changed_on_resume_is_refused_naming_it(
    colour_run_folder: tuple[Path, Path], tmp_path: Path, option: Option
) -> None:
    folder, finished = colour_run_folder
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    config = colour_config(folder, output).with_changes(**{option.name: CHANGED[option.name]})
    shown = f"{option.cli_name}: "
    with pytest.raises(ConfigMismatchError, match="--new-run") as refused:  # before anything is written
        run(config)
    assert shown in str(refused.value) and str(refused.value).count("\n  ") == 1, refused.value
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigMismatchError) as again:  # and by the checkpoint itself, under the lock
        Checkpoint.open(output, resolve_config(config))
    assert shown in str(again.value)
