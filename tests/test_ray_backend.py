"""The Ray backend on a real two-node Ray cluster on loopback (`ray start --head` plus
`ray start --address`, nodes on 127.0.0.2 and 127.0.0.3), with the misbehaving test engine:
the same manifest as the local pool, a hanging image, an actor killed from outside, and the driver
killed with SIGKILL and resumed. The cluster is stopped at the end and no Ray process is left."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from batchseg.config import RunConfig
from batchseg.runner import run

pytest.importorskip("ray", reason="the Ray backend needs batchseg[ray]")

TESTS = Path(__file__).parent
RAY = str(Path(sys.executable).with_name("ray"))
FACTORY = "fault_engine:load_faulty"
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # exited, only waiting to be reaped (by init, in a container): it holds nothing
        text = " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or "")
        if "raylet" in text or "gcs_server" in text:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head and a second node on this machine's loopback, one CPU each."""
    if shutil.which(RAY) is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--object-store-memory=80000000", "--disable-usage-stats"]
    head = [
        RAY,
        "start",
        "--head",
        f"--port={port}",
        f"--node-ip-address={HEAD_IP}",
        "--include-dashboard=false",
    ]
    second = [RAY, "start", f"--address={HEAD_IP}:{port}", f"--node-ip-address={WORKER_IP}"]
    try:
        subprocess.run(head + common, check=True, env=env, capture_output=True, timeout=120)
        subprocess.run(second + common, check=True, env=env, capture_output=True, timeout=120)
        yield f"{HEAD_IP}:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        deadline = time.monotonic() + 20
        while _ray_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(), "ray stop left Ray processes behind"


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"not read by the test engine")
    return root


def _config(folder: Path, out: Path, state: Path, **changes: object) -> RunConfig:
    state.mkdir(parents=True, exist_ok=True)
    extra = {"state_dir": str(state), **changes.pop("extra", {})}  # type: ignore[dict-item]
    base = RunConfig(input=folder, prompts=("roof",), output=out, timeout=20.0, extra=extra)
    return base.with_changes(**changes)


def _rows(out: Path) -> dict[str, tuple[str, int]]:
    table = pq.read_table(out / "manifest" / "images.parquet").to_pylist()
    return {r["path"]: (r["status"], r["n_detections"]) for r in table}


def test_ray_gives_the_local_pools_manifest_on_two_nodes(cluster: str, tmp_path: Path) -> None:
    names = [f"ok_{i}.jpg" for i in range(6)] + ["invalid_1.jpg", "raise_1.jpg", "flakyraise_1.jpg"]
    folder = _folder(tmp_path / "in", names)
    local = run(_config(folder, tmp_path / "local", tmp_path / "s1"), factory=FACTORY)
    remote = run(
        _config(folder, tmp_path / "ray", tmp_path / "s2", backend="ray", ray_address=cluster),
        factory=FACTORY,
    )
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    assert remote.counts == local.counts and remote.exit_code == local.exit_code == 3
    # Both nodes served: the engine records "pid slot" at each load, one actor per node's CPU.
    loads = (tmp_path / "s2" / "loads.txt").read_text().split("\n")
    assert len({line.split()[0] for line in loads if line}) >= 2


def test_a_hanging_image_times_out_and_the_run_goes_on(cluster: str, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in", ["hang_1.jpg", "ok_1.jpg", "ok_2.jpg", "ok_3.jpg"])
    config = _config(
        folder,
        tmp_path / "out",
        tmp_path / "s",
        backend="ray",
        ray_address=cluster,
        timeout=3.0,
        max_attempts=1,
    )
    summary = run(config, factory=FACTORY)
    rows = _rows(tmp_path / "out")
    assert rows["hang_1.jpg"][0] == "timeout"
    assert all(rows[f"ok_{i}.jpg"][0] == "ok" for i in (1, 2, 3))
    assert summary.exit_code == 3


def test_an_actor_killed_from_outside_is_replaced_and_its_image_retried(cluster: str, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in", [f"slow_{i:02d}.jpg" for i in range(10)])
    state = tmp_path / "s"
    config = _config(
        folder, tmp_path / "out", state, backend="ray", ray_address=cluster, extra={"slow_s": 0.6}
    )
    killed: list[int] = []

    def kill_first_actor() -> None:
        loads = state / "loads.txt"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if loads.exists() and loads.read_text().strip():
                time.sleep(1.0)  # let it take a task
                pid = int(loads.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_first_actor)
    killer.start()
    summary = run(config, factory=FACTORY)
    killer.join()
    assert killed, "no actor was seen loading"
    rows = pq.read_table(tmp_path / "out" / "manifest" / "images.parquet").to_pylist()
    assert all(r["status"] == "ok" for r in rows) and summary.exit_code == 0
    assert any(r["attempts"] == 2 for r in rows), "the killed actor's image was not retried"
    pids = {int(line.split()[0]) for line in (state / "loads.txt").read_text().splitlines()}
    assert len(pids) >= 3  # two actors, then a replacement for the killed one


def test_a_killed_driver_resumes_without_redoing_finished_images(cluster: str, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in", [f"slow_{i:02d}.jpg" for i in range(16)])
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "batchseg", "run", str(folder), "--prompt", "roof", "--output", str(out),
        "--engine", FACTORY, "--backend", "ray", "--ray-address", cluster,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_before = _wait_for_ok_rows(out, at_least=3, process=driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    finished = _ok_finish_times(out)
    assert len(finished) >= len(done_before)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    after = _ok_finish_times(out)
    assert len(after) == 16
    assert all(after[path] == when for path, when in finished.items()), "a finished image was redone"


def _ok_finish_times(out: Path) -> dict[str, float]:
    with sqlite3.connect(f"file:{out / 'checkpoint.sqlite'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT path, finished_at FROM images WHERE status = 'ok'").fetchall()
    return {path: when for path, when in rows}


def _wait_for_ok_rows(out: Path, at_least: int, process: subprocess.Popen[bytes]) -> dict[str, float]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the driver ended before it could be killed"
        if (out / "checkpoint.sqlite").exists():
            try:
                rows = _ok_finish_times(out)
            except sqlite3.OperationalError:
                rows = {}
            if len(rows) >= at_least:
                return rows
        time.sleep(0.2)
    raise AssertionError("no image finished within 120 s")
