"""Unattended nightly runs through the CLI: job files, precedence, deadlines, logs, status, schedule,
Ctrl-C.

Set up through files, run through the CLI (CliRunner; a real subprocess where a test interrupts a
run or needs one alive beside it), check through the checkpoint, the manifests and the run log.
"""

from __future__ import annotations

import json
import sys
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from _runs import (
    check_masks,
    checkpoint_rows,
    names,
    read_manifests,
    run_args,
    start_run,
    survivors_after,
    wait_until,
)
from click.testing import CliRunner, Result
from conftest import make_image

from batchseg.cli import cli
from batchseg.store.checkpoint import Checkpoint


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


def stored_config(output: Path) -> dict[str, Any]:
    checkpoint = Checkpoint.open_existing(output, read_only=True)
    try:
        return checkpoint.stored_config()
    finally:
        checkpoint.close()


def manifest_rows(output: Path) -> dict[str, dict[str, Any]]:
    images, _ = read_manifests(output)
    return {r["path"]: r for r in images}


def write_job(path: Path, model: Path, **extra: str) -> Path:
    """A job file with relative input/output (relative to the job file's folder, not the cwd)."""
    lines = [
        'input = "../photos"',
        'output = "../segmented"',
        f"model = {json.dumps(str(model))}",
        'prompt = ["roof"]',
        'device = "cpu"',
        "threshold = 0.0",
        "max-detections = 4",
        "workers = 1",
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- job file, precedence, two nights in a row -----------------------------------------------------


def test_job_file_precedence_and_a_second_night_doing_only_new_images(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    make_image(photos / "a.png", (96, 72), 1)
    make_image(photos / "b.png", (96, 72), 2)
    job = write_job(
        tmp_path / "jobs" / "night.toml", tiny_model, timeout='"2m"', max_attempts="3", progress_interval="7"
    )
    output = tmp_path / "segmented"
    elsewhere = tmp_path / "elsewhere"  # the scheduler starts in some other folder
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    first = invoke("run", "--job", job)
    assert first.exit_code == 0, first.output
    assert "processed 2 images" in first.output
    config = stored_config(output)
    assert (config["input"], config["output"]) == (str(photos.resolve()), str(output.resolve()))
    assert (config["timeout"], config["max_attempts"], config["progress_interval"]) == (120.0, 3, 7.0)
    assert (config["load_timeout"], config["max_consecutive_failures"]) == (600.0, 20)  # defaults

    # flag > environment > job file > default, seen in the configuration the run stored.
    env = {"BATCHSEG_TIMEOUT": "222", "BATCHSEG_MAX_ATTEMPTS": "4", "BATCHSEG_LOAD_TIMEOUT": "333"}
    again = invoke("run", "--job", job, "--max-attempts", "5", env=env)
    assert again.exit_code == 0, again.output
    assert "processed 0 images" in again.output
    config = stored_config(output)
    assert config["max_attempts"] == 5  # flag over environment
    assert config["timeout"] == 222.0  # environment over job file
    assert config["load_timeout"] == 333.0  # environment over default
    assert config["progress_interval"] == 7.0  # job file over default
    assert config["max_consecutive_failures"] == 20

    # An output-defining value from a flag or the environment also beats the job file: refused.
    for refused in (
        invoke("run", "--job", job, "--threshold", "0.5"),
        invoke("run", "--job", job, env={"BATCHSEG_THRESHOLD": "0.5"}),
    ):
        assert refused.exit_code == 1, refused.output
        assert "threshold" in refused.output and "0.5" in refused.output

    # The next night: only the image added during the day is processed.
    before = manifest_rows(output)
    make_image(photos / "new" / "c.png", (96, 72), 3)
    night2 = invoke("run", "--job", job)
    assert night2.exit_code == 0, night2.output
    assert "processed 1 images" in night2.output
    after = manifest_rows(output)
    assert sorted(after) == ["a.png", "b.png", "new/c.png"]
    assert {r["status"] for r in after.values()} == {"ok"}
    for path in ("a.png", "b.png"):
        assert after[path]["started_at"] == before[path]["started_at"]
    check_masks(output, *read_manifests(output))


# ---- deadline --------------------------------------------------------------------------------------


def test_max_runtime_stops_early_with_exit_4_and_a_resume_finishes(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for i in range(10):
        make_image(folder / f"p{i}.png", (64, 48), i)
    output = tmp_path / "out"
    # One image per worker process makes every image cost a model load (seconds on any machine), so
    # a 10 s budget ends well before the tenth image; on a loaded machine the first load alone can
    # outlast it, and then no image starts at all (the deadline holds for the first one too).
    stopped = invoke(
        *run_args(folder, output, tiny_model, "--max-runtime", "10s", "--max-images-per-worker", "1")
    )
    assert stopped.exit_code == 4, stopped.output
    assert "stopped early (deadline)" in stopped.output and "resume" in stopped.output
    rows = checkpoint_rows(output)
    done = {p: r for p, r in rows.items() if r["status"] == "ok"}
    assert len(done) < 10, rows
    assert all(r["status"] == "pending" for p, r in rows.items() if p not in done), rows
    assert len(manifest_rows(output)) == 10, "the manifest is exported when the run stops"

    resumed = invoke(*run_args(folder, output, tiny_model))
    assert resumed.exit_code == 0, resumed.output
    assert f"processed {10 - len(done)} images" in resumed.output
    after = checkpoint_rows(output)
    assert {r["status"] for r in after.values()} == {"ok"}
    assert all(r["attempts"] == 1 for r in after.values())
    for path, row in done.items():
        assert after[path] == row, f"{path} was redone"
    check_masks(output, *read_manifests(output))


# ---- run log and status of a finished run ----------------------------------------------------------

NASTY = "bad\x1b[31mred\rname.png"


def test_run_log_and_status_of_a_finished_run(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    make_image(folder / "good1.png", (96, 72), 1)
    make_image(folder / "good2.png", (96, 72), 2)
    (folder / NASTY).write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    output = tmp_path / "out"
    result = invoke(*run_args(folder, output, tiny_model))
    assert result.exit_code == 3, result.output
    assert "\x1b" not in result.output and "\r" not in result.output

    logs = list((output / "logs").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text(encoding="utf-8")
    controls = {ch for ch in text if unicodedata.category(ch) == "Cc" and ch != "\n"}
    assert not controls, f"control characters in the log: {controls}"
    lines = text.splitlines()
    assert "run started" in lines[0]
    summary = [line for line in lines if " summary " in line]
    assert len(summary) == 1 and "exit code 3" in summary[0] and "ok 2" in summary[0], summary
    assert summary[0] == lines[-1], "the summary is the last line"
    failures = [line for line in lines if "invalid_input " in line and "WARNING" in line]
    assert len(failures) == 2, failures
    assert any("bad\\x1b[31mred\\rname.png" in line for line in failures), failures
    assert any("empty.png" in line for line in failures), failures

    shown = invoke("status", output)
    assert shown.exit_code == 0, shown.output
    assert "no run is active" in shown.output
    assert "ok 2" in shown.output and "invalid_input 2" in shown.output
    assert "\x1b" not in shown.output and "batchseg retry" in shown.output

    as_json = invoke("status", output, "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert isinstance(report, dict), f"status --json printed {type(report).__name__}, not an object"
    assert report["counts"]["ok"] == 2 and report["counts"]["invalid_input"] == 2
    assert report["not_ok"] == 2 and report["live"] is None
    top = report["top_errors"][0]
    assert (top["status"], top["count"]) == ("invalid_input", 2)
    assert top["example_path"] in (NASTY, "empty.png") and top["example_message"]


# ---- Ctrl-C and a live run -------------------------------------------------------------------------


def test_ctrl_c_drains_exits_4_and_the_resume_completes(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for i in range(40):
        make_image(folder / f"p{i:02d}.png", (64, 48), i)
    output = tmp_path / "out"
    args = run_args(folder, output, tiny_model)
    # A real process: Ctrl-C goes to the whole process group, and the test must stay alive beside it.
    live = start_run(args, tmp_path / "console.txt", cwd=tmp_path)
    try:
        lock_info = output / ".batchseg.lock.json"
        assert wait_until(
            lambda: lock_info.exists() and f'"pid": {live.pid}' in lock_info.read_text(), 60, while_alive=live
        ), live.output()
        report = json.loads(invoke("status", output, "--json").output)
        assert isinstance(report, dict), "status --json must print an object"
        assert report["live"] and report["live"]["pid"] == live.pid, report
        assert wait_until(lambda: len(names(output / "masks")) >= 3, 120, 0.005, while_alive=live)
        live.interrupt()
        assert live.wait(120) == 4, live.output()
    finally:
        if live.alive():
            live.kill()
    assert "stopped early (interrupted)" in live.output(), live.output()
    assert not survivors_after(live.tag, 5.0)

    # Drained: the image in flight finished and was recorded; no mask exists without its row.
    rows = checkpoint_rows(output)
    done = {p: r for p, r in rows.items() if r["status"] == "ok"}
    assert {n[: -len(".png")] for n in names(output / "masks")} == set(done)
    assert 3 <= len(done) < 40
    assert {p for p, r in manifest_rows(output).items() if r["status"] == "ok"} == set(done)
    after_stop = json.loads(invoke("status", output, "--json").output)
    assert after_stop["live"] is None and after_stop["counts"]["ok"] == len(done)

    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert f"processed {40 - len(done)} images" in resumed.output
    after = checkpoint_rows(output)
    assert len(after) == 40 and {r["status"] for r in after.values()} == {"ok"}
    for path, row in done.items():
        assert after[path] == row, f"{path} was redone"
    check_masks(output, *read_manifests(output))


# ---- schedule --------------------------------------------------------------------------------------

TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


def test_schedule_writes_the_task_and_prints_schtasks_cron_and_xml(tiny_model: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "jobs" / "night.toml", tiny_model, max_runtime='"2h"')
    result = invoke("schedule", "--job", job, "--at", "02:00", "--days", "mon,fri")
    assert result.exit_code == 0, result.output
    xml_path = job.with_suffix(".task.xml")
    raw = xml_path.read_bytes()
    assert raw.startswith(b"\xff\xfe"), "UTF-16 with a BOM, as schtasks reads it"
    task = ET.fromstring(raw[2:].decode("utf-16-le").split("?>", 1)[1])
    exec_ = task.find("t:Actions/t:Exec", TASK_NS)
    assert exec_ is not None
    assert exec_.findtext("t:Command", namespaces=TASK_NS) == sys.executable
    assert exec_.findtext("t:Arguments", namespaces=TASK_NS) == f'-m batchseg run --job "{job.resolve()}"'
    assert exec_.findtext("t:WorkingDirectory", namespaces=TASK_NS) == str(job.resolve().parent)
    trigger = task.find("t:Triggers/t:CalendarTrigger", TASK_NS)
    assert trigger is not None
    assert (trigger.findtext("t:StartBoundary", namespaces=TASK_NS) or "").endswith("T02:00:00")
    days = trigger.find("t:ScheduleByWeek/t:DaysOfWeek", TASK_NS)
    assert days is not None and [d.tag.split("}")[1] for d in days] == ["Monday", "Friday"]
    settings = task.find("t:Settings", TASK_NS)
    assert settings is not None
    assert settings.findtext("t:MultipleInstancesPolicy", namespaces=TASK_NS) == "IgnoreNew"
    assert settings.findtext("t:ExecutionTimeLimit", namespaces=TASK_NS) == "PT3H"  # max-runtime + 1 h
    lines = result.output.splitlines()
    assert lines[0] == f"wrote {xml_path}"
    assert f'schtasks /Create /TN "batchseg\\night" /XML "{xml_path}" /F' in lines[1]
    assert 'schtasks /Delete /TN "batchseg\\night" /F' in lines[2]

    xml_path.unlink()
    printed = invoke("schedule", "--job", job, "--at", "02:00", "--print")
    assert printed.exit_code == 0, printed.output
    assert printed.output.startswith('<?xml version="1.0" encoding="UTF-16"?>')
    assert "<DaysInterval>1</DaysInterval>" in printed.output  # no --days: every day
    assert not xml_path.exists(), "--print writes nothing"

    cron = invoke("schedule", "--job", job, "--at", "02:30", "--days", "mon,fri", "--cron")
    assert cron.exit_code == 0, cron.output
    line = cron.output.strip()
    assert line.startswith("30 2 * * 1,5 cd "), line
    assert f"-m batchseg run --job {job.resolve()}" in line and "night.cron.log" in line
