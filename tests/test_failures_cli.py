"""Failures proven end to end: a real ``python -m batchseg run`` with a misbehaving engine
(tests/misbehaving_engines.py), checked through images.parquet, the exit code, the log and the
process table. A real subprocess because a worker that segfaults or hangs must be seen from a
parent that is batchseg itself, and every process it started must be gone when it exits.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from _runs import checkpoint_rows, log_text, start_run, survivors_after, temp_files, wait_until
from click.testing import CliRunner
from conftest import make_image
from misbehaving_engines import SharingViolation

from batchseg import atomic, upkeep
from batchseg.cli import cli
from batchseg.config import RunConfig
from batchseg.runner import _stop_time, deadline_epoch

TESTS = Path(__file__).parent


def folder_with(root: Path, *names: str) -> Path:
    for seed, name in enumerate(names):
        make_image(root / name, (8, 6), seed)
    return root


def run_cli(tmp_path: Path, engine: str, *extra: str, names: tuple[str, ...] = ("a.png", "bad.png")) -> Any:
    """``python -m batchseg run`` with ``engine``; returns (exit code, console, output, rows by path)."""
    folder = folder_with(tmp_path / "in", *names)
    output = tmp_path / "out"
    args = ["run", str(folder), "--engine", f"misbehaving_engines:{engine}", "--output", str(output)]
    args += ["--prompt", "roof", "--device", "cpu", "--workers", "1", "--max-attempts", "1", *extra]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    live = start_run(args, tmp_path / "console.txt", cwd=tmp_path, env=env)
    code = live.wait(60)
    left = survivors_after(live.tag, 5.0)
    assert not left, f"processes outlived the run: {left}"
    images = output / "manifest" / "images.parquet"
    rows = {r["path"]: r for r in pq.read_table(images).to_pylist()} if images.exists() else {}
    return code, live.output(), output, rows


def test_a_hanging_image_times_out_and_the_run_goes_on(tmp_path: Path) -> None:
    code, console, output, rows = run_cli(tmp_path, "hangs", "--timeout", "1")
    assert code == 3, console
    assert rows["bad.png"]["status"] == "timeout" and rows["a.png"]["status"] == "ok", rows
    log = log_text(output)
    assert "timeout bad.png" in log
    assert "batchseg retry" in console
    assert "removed 1 unfinished temp file(s) of worker pid" in log, log
    assert not temp_files(output)


def test_a_segfault_is_crashed_and_the_dead_workers_temp_file_goes_with_it(tmp_path: Path) -> None:
    code, console, output, rows = run_cli(tmp_path, "segfaults", names=("a.png", "bad.png", "c.png"))
    assert code == 3, console
    assert rows["bad.png"]["status"] == "crashed", rows
    assert rows["bad.png"]["exit_code"] == -11  # SIGSEGV
    assert {rows[p]["status"] for p in ("a.png", "c.png")} == {"ok"}, rows
    log = log_text(output)
    assert "crashed bad.png" in log and "SIGSEGV" in log, log
    # The half-written mask of the killed worker is removed when the worker is replaced, not at
    # the next start (this run's start-up cleanup came before the crash).
    assert "removed 1 unfinished temp file(s) of worker pid" in log, log
    assert not temp_files(output)


def test_memory_error_is_an_error_of_that_image(tmp_path: Path) -> None:
    code, console, output, rows = run_cli(tmp_path, "runs_out_of_memory")
    assert code == 3, console
    assert rows["bad.png"]["status"] == "error" and rows["bad.png"]["error_type"] == "MemoryError", rows
    assert rows["a.png"]["status"] == "ok"
    assert "error bad.png: MemoryError" in log_text(output)


def test_the_same_failure_on_every_image_trips_the_circuit_breaker(tmp_path: Path) -> None:
    names = tuple(f"img{i}.png" for i in range(8))
    code, console, output, rows = run_cli(
        tmp_path, "fails_alike", "--max-consecutive-failures", "3", names=names
    )
    assert code == 4, console
    assert "stopped early (circuit_breaker)" in console
    failed = [r for r in rows.values() if r["status"] == "error"]
    assert len(failed) == 3 and {r["error_type"] for r in failed} == {"RuntimeError"}, rows
    assert {r["status"] for r in rows.values()} == {"error", "pending"}, "the rest waits for a resume"
    assert "circuit_breaker" in log_text(output)


def test_a_held_mask_fails_its_image_and_the_night_goes_on(tmp_path: Path) -> None:
    names = ("a.png", "bad.png", "flaky.png", "z.png")
    code, console, output, rows = run_cli(tmp_path, "holds_masks", names=names)
    assert code == 3, console
    held = rows["bad.png"]
    assert held["status"] == "error" and held["error_type"] == "FileHeldError", held
    assert "another program keeps it open" in held["error_message"]
    # Held for its first two renames only: the back-off outlasts it.
    assert {rows[p]["status"] for p in ("a.png", "flaky.png", "z.png")} == {"ok"}, rows
    assert (output / "masks" / "flaky.png.png").is_file()
    assert "error bad.png: FileHeldError" in log_text(output)
    assert not temp_files(output), "a rename that failed leaves no temp file"


def test_a_held_mask_is_an_image_error_in_the_sam3_engine_too(tiny_model: Path, tmp_path: Path) -> None:
    # Its write turns an OSError into a fatal OutputError; a held file must not be one.
    model = ["--model", str(tiny_model), "--threshold", "0", "--max-detections", "2"]
    code, console, output, rows = run_cli(tmp_path, "sam3_holding_masks", *model, names=("a.png", "bad.png"))
    assert code == 3, console
    assert rows["bad.png"]["status"] == "error" and rows["bad.png"]["error_type"] == "FileHeldError", rows
    assert rows["a.png"]["status"] == "ok" and (output / rows["a.png"]["mask_path"]).is_file()
    assert not temp_files(output)


def test_an_output_folder_broken_under_a_run_is_exit_1_not_a_night_of_errors(
    tiny_model: Path, tmp_path: Path
) -> None:
    # masks/ is a file: every mask write fails with an OSError, even for root. Unlike a held
    # file, that is the output folder's fault: the run stops at once, the images stay pending.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "masks").write_text("not a folder")
    model = ["--model", str(tiny_model), "--threshold", "0", "--max-detections", "2"]
    code, console, output, rows = run_cli(
        tmp_path, "sam3_holding_masks", *model, names=("a.png", "b.png", "c.png")
    )
    assert code == 1, console
    assert "error: cannot write results to" in console, console
    statuses = {p: r["status"] for p, r in checkpoint_rows(output).items()}
    assert statuses == dict.fromkeys(("a.png", "b.png", "c.png"), "pending"), statuses


def test_an_output_folder_that_cannot_be_written_is_exit_1(tmp_path: Path) -> None:
    # A file where a folder should be: refused even to root, unlike permission bits.
    (tmp_path / "out").write_text("not a folder")
    code, console, _, _ = run_cli(tmp_path, "fails_alike")
    assert code == 1, console
    assert "error: output folder" in console and "is not writable" in console, console


def test_a_missing_input_folder_is_exit_1_and_stores_no_run(tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["run", str(tmp_path / "share"), "--prompt", "roof", "--output", str(output)]
    )
    assert result.exit_code == 1, result.output
    assert "does not exist" in result.output and "mounted" in result.output, result.output
    assert not output.exists(), "refused before anything is written: a later run is not refused"


def test_an_input_folder_without_images_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no image here")
    output = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["run", str(tmp_path / "in"), "--prompt", "roof", "--output", str(output)]
    )
    assert result.exit_code == 0, result.output
    assert "warning: no image found in" in result.output
    assert "no image found in" in log_text(output)


def test_a_case_collision_through_the_runner(tmp_path: Path) -> None:
    code, console, output, rows = run_cli(tmp_path, "hangs", names=("roof.png", "Roof.png", "x.png"))
    assert code == 3, console
    assert sorted(rows) == ["Roof.png", "roof.png", "x.png"]
    clash = [r for r in rows.values() if r["status"] == "invalid_input"]
    assert len(clash) == 1 and clash[0]["error_type"] == "NameCollision", rows
    kept = "roof.png" if clash[0]["path"] == "Roof.png" else "Roof.png"
    assert rows[kept]["status"] == "ok" and kept in clash[0]["error_message"]
    assert "case-insensitive" in console
    masks = sorted(p.name for p in (output / "masks").iterdir())
    assert masks == [f"{kept}.png", "x.png.png"], "one mask per kept name, none overwritten"


def test_a_held_manifest_keeps_the_previous_one_and_the_images_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process (CliRunner): the export runs in the parent, where the hook is set.
    folder = folder_with(tmp_path / "in", "a.png", "b.png")
    output = tmp_path / "out"
    args = ["run", str(folder), "--engine", "misbehaving_engines:hangs", "--output", str(output)]
    args += ["--prompt", "roof", "--device", "cpu", "--workers", "1"]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    before = pq.read_table(output / "manifest" / "images.parquet").num_rows
    make_image(folder / "c.png", (8, 6), 9)

    hook = SharingViolation(os.replace, held=lambda name: name == "images.parquet")
    monkeypatch.setattr(atomic, "_rename", hook)
    monkeypatch.setattr(upkeep, "FINAL_EXPORT_PATIENCE_S", 0.3)
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output  # the images' exit code: all ok
    assert "warning: the manifest in" in second.output and "out of date" in second.output
    assert hook.refused["images.parquet"] >= 3, "retried with back-off"
    assert pq.read_table(output / "manifest" / "images.parquet").num_rows == before, "the previous one"
    assert not temp_files(output)

    monkeypatch.setattr(atomic, "_rename", os.replace)  # the viewer is closed: the next run exports
    third = CliRunner().invoke(cli, args)
    assert third.exit_code == 0, third.output
    assert pq.read_table(output / "manifest" / "images.parquet").num_rows == before + 1


def test_a_held_manifest_is_exported_again_at_the_next_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = folder_with(tmp_path / "in", "slow1.png", "slow2.png", "slow3.png", "slow4.png")
    output = tmp_path / "out"
    args = ["run", str(folder), "--engine", "misbehaving_engines:hangs", "--output", str(output)]
    args += ["--prompt", "roof", "--device", "cpu", "--workers", "1", "--manifest-interval", "1"]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    # Held for the first export's two tries (patience 0.05 s: one wait), free afterwards.
    hook = SharingViolation(os.replace, held=lambda name: name == "images.parquet", times=2)
    monkeypatch.setattr(atomic, "_rename", hook)
    monkeypatch.setattr(upkeep, "PERIODIC_EXPORT_PATIENCE_S", 0.05)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert hook.refused == {"images.parquet": 2}
    assert "manifest not exported (tried again at the next interval)" in log_text(output)
    rows = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * 4
    assert not temp_files(output)


def test_deadline_crossing_midnight_with_a_fixed_clock() -> None:
    late = _dt.datetime(2026, 3, 7, 22, 0, 5)
    assert _dt.datetime.fromtimestamp(deadline_epoch("06:00", late)) == _dt.datetime(2026, 3, 8, 6, 0)
    early = _dt.datetime(2026, 3, 8, 1, 30)
    assert _dt.datetime.fromtimestamp(deadline_epoch("06:00", early)) == _dt.datetime(2026, 3, 8, 6, 0)
    exactly = _dt.datetime(2026, 3, 8, 6, 0)
    assert _dt.datetime.fromtimestamp(deadline_epoch("06:00", exactly)) == _dt.datetime(2026, 3, 9, 6, 0)
    # The sooner of --deadline and --max-runtime wins.
    config = RunConfig(input=Path("x"), prompts=("roof",), deadline="06:00", max_runtime=60.0)
    stop = _stop_time(config)
    assert stop is not None and stop - 61 < _dt.datetime.now().timestamp() <= stop


def test_a_second_ctrl_c_stops_at_once_and_exports_what_is_recorded(tmp_path: Path) -> None:
    # Real SIGINTs to a real process group, as a terminal sends them. bad.png hangs, so the first
    # Ctrl-C's drain would wait for ever: only the second ends the run, long before any periodic
    # export (--manifest-interval 1h).
    folder = folder_with(tmp_path / "in", "a.png", "b.png", "bad.png")
    output = tmp_path / "out"
    args = ["run", str(folder), "--engine", "misbehaving_engines:hangs", "--output", str(output)]
    args += ["--prompt", "roof", "--workers", "1", "--timeout", "1h", "--manifest-interval", "1h"]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    live = start_run(args, tmp_path / "console.txt", cwd=tmp_path, env=env)
    try:
        hanging = lambda: checkpoint_rows(output).get("bad.png", {}).get("status") == "running"  # noqa: E731
        assert wait_until(hanging, 120, while_alive=live), live.output()
        assert not (output / "manifest").exists(), "no export yet: the test would prove nothing"
        live.interrupt()
        stopping = lambda: "stopping (interrupted)" in log_text(output)  # noqa: E731
        assert wait_until(stopping, 60, while_alive=live), live.output()  # the first one is handled
        live.interrupt()
        code = live.wait(60)
    finally:
        if live.alive():
            live.kill()
    console = live.output()
    assert code == 4, console
    assert f"stopped at once: {output / 'manifest'} holds the images recorded so far" in console, console
    assert "interrupted: stopped at once; run the same command again to resume" in console
    assert not survivors_after(live.tag, 5.0)
    rows = {r["path"]: r["status"] for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}
    assert rows == {"a.png": "ok", "b.png": "ok", "bad.png": "pending"}, rows
    assert "holds the images recorded so far" in log_text(output)
    assert not temp_files(output / "manifest")
