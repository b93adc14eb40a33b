"""The first worker loads while the parent walks the folder (``supervise/early.py``): the pool
adopts that worker instead of loading a second one, and a run with nothing to do, or refused
after discovery, stops it without waiting for its load, leaving no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from _runs import wait_until
from conftest import make_image

from batchseg.config import RunConfig
from batchseg.supervise.early import early_start
from batchseg.supervise.settings import PoolSettings
from batchseg.worker.contract import EngineSpec

TESTS_DIR = Path(__file__).resolve().parent


def _cli(
    folder: Path, output: Path, loads: Path, *extra: str, load_s: float = 0.0, ready_after: int = 0
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "BATCHSEG_TEST_LOADS": str(loads),
        "BATCHSEG_TEST_LOAD_S": str(load_s),
        "BATCHSEG_TEST_READY_AFTER": str(ready_after),
    }
    args = ["run", str(folder), "--engine", "counted_engine:load", "--prompt", "roof"]
    return subprocess.run(
        [sys.executable, "-m", "batchseg", *args, "--output", str(output), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _loads(loads: Path) -> list[tuple[int, int]]:
    """(pid, slot) of each load begun."""
    path = loads / "loads.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), int(slot)) for pid, slot in (line.split() for line in lines)]


def test_the_worker_started_before_discovery_is_the_one_that_processes(tmp_path: Path) -> None:
    folder, loads = tmp_path / "in", tmp_path / "loads"
    loads.mkdir()
    for k in range(3):
        make_image(folder / f"img_{k}.png", seed=k)
    done = _cli(folder, tmp_path / "out", loads, "--workers", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    (pid, slot), *others = _loads(loads)
    assert (slot, others) == (0, []), "one model load for one worker"
    rows = pq.read_table(tmp_path / "out" / "manifest" / "images.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["worker_pid"] for r in rows} == {pid}


def test_with_two_workers_slot_0_loads_once(tmp_path: Path) -> None:
    """The early worker is started as the pool starts slot 0 of two (half the cores each). No
    load ends before two have begun, so both workers load whatever the machine's load."""
    folder, loads = tmp_path / "in", tmp_path / "loads"
    loads.mkdir()
    for k in range(4):
        make_image(folder / f"img_{k}.png", seed=k)
    done = _cli(folder, tmp_path / "out", loads, "--workers", "2", ready_after=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(slot for _pid, slot in _loads(loads)) == [0, 1]


def test_nothing_to_do_stops_the_early_worker_without_waiting_for_its_load(tmp_path: Path) -> None:
    folder, loads, output = tmp_path / "in", tmp_path / "loads", tmp_path / "out"
    loads.mkdir()
    make_image(folder / "img_0.png")
    assert _cli(folder, output, loads).returncode == 0
    (loads / "loads.txt").unlink()
    started = time.monotonic()
    again = _cli(folder, output, loads, load_s=120)  # every image done: the load is never needed
    assert again.returncode == 0, again.stdout + again.stderr
    assert time.monotonic() - started < 60, "the run waited for a load it did not need"
    for pid, _slot in _loads(loads):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_an_early_worker_the_pool_never_takes_is_stopped_when_the_run_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a refused run (a GeoTIFF without the geo extra, a failing checkpoint) does after
    discovery: leaves the ``with`` block by an exception, the early worker still loading."""
    monkeypatch.setenv("BATCHSEG_TEST_LOADS", str(tmp_path))
    monkeypatch.setenv("BATCHSEG_TEST_LOAD_S", "120")
    spec = EngineSpec(RunConfig(input=tmp_path, prompts=("roof",)), factory="counted_engine:load")
    with pytest.raises(RuntimeError), early_start(spec, PoolSettings(workers=1, stop_grace=2.0)) as launcher:
        assert launcher.early is not None
        process = launcher.early[0]
        assert wait_until(lambda: bool(_loads(tmp_path)), 60), "the early worker never began its load"
        raise RuntimeError("refused after discovery")
    assert not process.is_alive()
