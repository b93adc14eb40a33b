"""The Ray backend on a real two-node Ray cluster on loopback (`ray start --head` plus
`ray start --address`, nodes on 127.0.0.2 and 127.0.0.3), with the misbehaving test engine:
the same manifest as the local pool, a hanging image, an actor killed from outside, and the driver
killed with SIGKILL and resumed; on a two-node cluster of their own, Ray itself lost mid-run (the
second node's raylet killed, then every process of the cluster); and on a one-node cluster of 2
CPUs, workers sized to fit and those that cannot be placed. Each cluster runs in its own temp
dir, and its own processes (never any other Ray on the machine) are stopped at the end and
checked gone."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from fault_engine import write_settings

from batchseg.config import RunConfig
from batchseg.errors import ConfigError, ExitCode
from batchseg.runner import run
from batchseg.supervise import ray_backend

pytest.importorskip("ray", reason="the Ray backend needs batchseg[ray]")

TESTS = Path(__file__).parent
RAY = str(Path(sys.executable).with_name("ray"))
FACTORY = "fault_engine:load_faulty"
GATED = "gate_engine:load_gated"
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
LONE_IP = "127.0.0.4"  # the one-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackCluster:
    """Ray nodes started here with ``ray start --block``, all in one temp dir of their own: every
    process of the cluster is a descendant of a node's ``ray start`` or names that dir, so
    ``stop`` ends exactly those (``ray stop`` would end every Ray on the machine)."""

    def __init__(self) -> None:
        # Short, so the session's socket paths stay under the system's limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="bsray"))
        # No token authentication: a driver given an explicit address does not send the machine's
        # token (~/.ray/auth_token, which any earlier ray.init may have made) unless told to.
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "RAY_AUTH_MODE": "disabled",
        }
        self.nodes: list[subprocess.Popen[bytes]] = []

    def start_node(self, *args: str) -> None:
        """``ray start ARGS``; returns once the node says it runs."""
        log = self.temp_dir / f"node-{len(self.nodes)}.out"
        command = [RAY, "start", "--block", f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *args]
        with log.open("wb") as out:
            node = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert node.poll() is None, f"ray start ended: {log.read_text(errors='replace')[-2000:]}"
            assert time.monotonic() < deadline, "ray start did not start within 120 s"
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
            except psutil.NoSuchProcess:
                pass
        mark = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            if any(mark in part for part in proc.info["cmdline"] or []):
                found[proc.pid] = proc
        return [proc for proc in found.values() if _running(proc)]

    def stop(self) -> None:
        """Ends the cluster's own processes (terminate, then kill) and checks that none is left."""
        procs = self.processes()
        for node in reversed(self.nodes):  # a blocking `ray start` stops its node's processes
            node.terminate()
        for node in self.nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(10)
        for proc in procs:
            if _running(proc):
                _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(_running(proc) for proc in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in procs:
            if _running(proc):
                _signal(proc, signal.SIGKILL)
        time.sleep(0.5)
        left = [f"{proc.pid} {proc.name()}" for proc in procs if _running(proc)]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"the cluster's processes outlived it: {left}"


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (an exited process waiting to be reaped holds nothing)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


@contextlib.contextmanager
def _two_nodes() -> Iterator[tuple[str, LoopbackCluster]]:
    """A head and a second node on loopback, one CPU each: their address and the nodes; stopped
    on the way out."""
    if shutil.which(RAY) is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    common = ["--num-cpus=1", "--object-store-memory=80000000"]
    nodes = LoopbackCluster()
    try:
        nodes.start_node(
            "--head", f"--port={port}", f"--node-ip-address={HEAD_IP}", "--include-dashboard=false", *common
        )
        nodes.start_node(f"--address={HEAD_IP}:{port}", f"--node-ip-address={WORKER_IP}", *common)
        yield f"{HEAD_IP}:{port}", nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and a second node on this machine's loopback, one CPU each."""
    with _two_nodes() as (address, _):
        yield address


@pytest.fixture
def two_cpu_node() -> Iterator[str]:
    """A one-node cluster of 2 CPUs on loopback (function scope: it never runs beside ``cluster``
    when these tests come first in the module)."""
    if shutil.which(RAY) is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    nodes = LoopbackCluster()
    try:
        nodes.start_node(
            "--head",
            f"--port={port}",
            f"--node-ip-address={LONE_IP}",
            "--include-dashboard=false",
            "--num-cpus=2",
            "--object-store-memory=80000000",
        )
        yield f"{LONE_IP}:{port}"
    finally:
        nodes.stop()


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"not read by the test engine")
    return root


def _config(folder: Path, out: Path, state: Path, **changes: object) -> RunConfig:
    state.mkdir(parents=True, exist_ok=True)
    write_settings(folder, state_dir=str(state), **changes.pop("chosen", {}))  # type: ignore[arg-type]
    base = RunConfig(input=folder, prompts=("roof",), output=out, timeout=20.0)
    return base.with_changes(**changes)


def _rows(out: Path) -> dict[str, tuple[str, int]]:
    table = pq.read_table(out / "manifest" / "images.parquet").to_pylist()
    return {r["path"]: (r["status"], r["n_detections"]) for r in table}


def _log_text(out: Path) -> str:
    return "".join(path.read_text() for path in sorted((out / "logs").glob("*.log")))


def _open_gate_when_logged(out: Path, state: Path, phrase: str) -> None:
    """Opens the gate images' gate once the run's log holds ``phrase`` (at the latest after 120 s,
    so that a run that never tells still ends, and the test fails on the missing line)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "logs").is_dir() and phrase in _log_text(out):
            break
        time.sleep(0.1)
    (state / "open").touch()


# These two come first: their one-node cluster never runs beside the module's two-node one.
def test_workers_that_cannot_be_placed_are_told_and_the_run_goes_on(
    two_cpu_node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 3 on 2 CPUs: two workers of one CPU each run (the barrier images finish only while
    both do); the third is told in the log while the run goes on (the gate image finishes only
    after that line), never as a killed process; the run ends ok on the two."""
    monkeypatch.setattr(ray_backend, "PLACEMENT_WAIT_S", 2.0)  # the driver's bridge runs in this process
    names = ["barrier_1.jpg", "barrier_2.jpg", "gate_1.jpg"] + [f"ok_{i}.jpg" for i in range(3)]
    folder = _folder(tmp_path / "in", names)
    out, state = tmp_path / "out", tmp_path / "s"
    config = _config(
        folder,
        out,
        state,
        backend="ray",
        ray_address=two_cpu_node,
        workers=3,
        timeout=120.0,
        max_attempts=1,
        chosen={"barrier": 2},
    )
    opener = threading.Thread(target=_open_gate_when_logged, args=(out, state, "cannot be placed"))
    opener.start()
    summary = run(config, factory=GATED)
    opener.join()
    log = _log_text(out)
    told = re.findall(r"worker \d cannot be placed: needs 1 CPU, the cluster has 0 free of 2", log)
    assert len(told) == 1, log
    assert summary.exit_code == 0 and {status for status, _ in _rows(out).values()} == {"ok"}, log
    assert "killed by signal" not in log and "pid None" not in log, log


def test_two_workers_on_a_two_cpu_node_both_run(two_cpu_node: str, tmp_path: Path) -> None:
    """--workers 2 and no --threads on one node of 2 CPUs: each actor gets one thread (one CPU), so
    both are placed. The barrier images can only finish while two workers run at once."""
    names = ["barrier_1.jpg", "barrier_2.jpg", "threads_1.jpg", "threads_2.jpg"]
    folder = _folder(tmp_path / "in", names)
    out, state = tmp_path / "out", tmp_path / "s"
    config = _config(
        folder,
        out,
        state,
        backend="ray",
        ray_address=two_cpu_node,
        workers=2,
        timeout=60.0,
        max_attempts=1,
        chosen={"barrier": 2},
    )
    summary = run(config, factory=GATED)
    rows = {r["path"]: r for r in pq.read_table(out / "manifest" / "images.parquet").to_pylist()}
    assert {r["status"] for r in rows.values()} == {"ok"} and summary.exit_code == 0
    assert rows["barrier_1.jpg"]["worker_pid"] != rows["barrier_2.jpg"]["worker_pid"]
    assert rows["threads_1.jpg"]["height"] == rows["threads_2.jpg"]["height"] == 1  # OMP_NUM_THREADS
    assert "cannot be placed" not in _log_text(out)


#: A driver whose actor holds every CPU of the cluster at argv[1] until the driver is killed.
_HOLD_ALL_CPUS = """
import sys, time, ray
host = sys.argv[1].rsplit(":", 1)[0]
ray.init(address=sys.argv[1], _node_ip_address=host, include_dashboard=False, log_to_driver=False)
holder = ray.remote(num_cpus=int(ray.cluster_resources()["CPU"]))(type("Holder", (), {"ok": lambda self: 1}))
held = holder.remote()  # kept: an actor ends with its last handle
ray.get(held.ok.remote())
print("holding", flush=True)
time.sleep(600)
"""


def test_a_run_none_of_whose_workers_can_be_placed_ends_with_exit_1(
    two_cpu_node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another job holds both CPUs: the run's one worker is told as unplaced and the run ends
    (exit 1, nothing processed) instead of waiting for ever."""
    monkeypatch.setattr(ray_backend, "PLACEMENT_WAIT_S", 2.0)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_ALL_CPUS, two_cpu_node],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        folder = _folder(tmp_path / "in", ["ok_1.jpg"])
        config = _config(folder, tmp_path / "out", tmp_path / "s", backend="ray", ray_address=two_cpu_node)
        told = "worker 0 cannot be placed: needs 2 CPU, the cluster has 0 free of 2"
        expected = f"no worker could be placed; last: {told}"
        with pytest.raises(ConfigError, match=re.escape(expected)) as raised:
            run(config, factory=FACTORY)
        assert raised.value.exit_code == ExitCode.FATAL
        assert not (tmp_path / "s" / "loads.txt").exists()
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdout.close()  # type: ignore[union-attr]


# ---- Ray's own machinery lost mid-run ---------------------------------------------------------------
# Each of these has a two-node cluster of its own (it breaks it); they come before the module's
# shared cluster is first used, so the two never run side by side.


@pytest.fixture
def own_cluster() -> Iterator[tuple[str, LoopbackCluster]]:
    """A head and a second node on loopback, one CPU each, for a test that breaks them."""
    with _two_nodes() as started:
        yield started


def _when_ok_rows(
    out: Path, at_least: int, then: Callable[[], None], running: Callable[[], bool] = lambda: True
) -> None:
    """Calls ``then`` once the checkpoint holds ``at_least`` ok rows (or once the run is no longer
    ``running``, or after 120 s: the test then fails on what the run did)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and running():
        try:
            if (out / "checkpoint.sqlite").exists() and len(_ok_finish_times(out)) >= at_least:
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.1)
    then()


def test_a_node_whose_raylet_is_killed_is_told_and_the_run_finishes_on_the_other(
    own_cluster: tuple[str, LoopbackCluster], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second node's raylet is killed (SIGKILL) while both workers serve: the log names the
    lost worker, its node and Ray's error within seconds; its image goes back as fresh work (no
    image's fault: no attempt counted), its replacement, which no node has room for, is told as
    unplaced; the run finishes on the first node with every image ok, each once."""
    address, nodes = own_cluster
    monkeypatch.setattr(ray_backend, "PLACEMENT_WAIT_S", 2.0)  # the driver's bridge runs in this process
    # Enough images that the run outlasts the replacement's placement wait after the kill, however
    # late a loaded machine lets the killer see its third image (0.3 s each, most still to run).
    names = [f"slow_{i:02d}.jpg" for i in range(48)]
    folder, out, state = _folder(tmp_path / "in", names), tmp_path / "out", tmp_path / "s"
    config = _config(folder, out, state, backend="ray", ray_address=address, chosen={"slow_s": 0.3})
    raylet = next(
        p for p in psutil.Process(nodes.nodes[1].pid).children(recursive=True) if p.name() == "raylet"
    )
    killed_at: list[float] = []

    def kill_raylet() -> None:
        raylet.kill()
        killed_at.append(time.monotonic())

    def when_both_serve() -> None:  # both workers loaded (a line each in loads.txt), then 3 more images
        loads = state / "loads.txt"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (loads.exists() and len(loads.read_text().split()) >= 4):
            time.sleep(0.1)
        done = len(_ok_finish_times(out)) if (out / "checkpoint.sqlite").exists() else 0
        _when_ok_rows(out, done + 3, kill_raylet)

    killer = threading.Thread(target=when_both_serve)
    killer.start()
    summary = run(config, factory=FACTORY)
    ended_at = time.monotonic()
    killer.join()
    log = _log_text(out)
    assert killed_at and summary.exit_code == 0, log
    lost = re.findall(rf"worker_lost: worker 1 \(pid \d+\) was lost \(Ray node {WORKER_IP} is gone: .*", log)
    assert len(lost) == 1 and "node id " in lost[0] and "Error: " in lost[0], log  # Ray's own words
    assert "worker_unplaced: worker 1 cannot be placed: needs 1 CPU" in log, log
    assert "did not load" not in log and "out-of-memory" not in log and "attempt_failed" not in log, log
    with sqlite3.connect(f"file:{out / 'checkpoint.sqlite'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT path, status, attempts FROM images").fetchall()
    assert sorted(rows) == [(name, "ok", 1) for name in names]
    assert sorted(_rows(out)) == names  # the manifest lists each image once
    assert ended_at - killed_at[0] < 60  # 45 images on one worker: ~14 s; Ray's loss told at once


def test_a_cluster_stopped_mid_run_ends_it_with_exit_1_and_a_fresh_ray_resumes_it(
    own_cluster: tuple[str, LoopbackCluster], tmp_path: Path
) -> None:
    """Every process of the cluster is killed (the machines gone) while the driver runs: it says
    the cluster is gone and ends with exit 1 within 30 s (before Ray's own end for a driver
    whose GCS is away, 60 s, which says nothing); a resume on a freshly started cluster finishes
    without redoing an image."""
    address, nodes = own_cluster
    names = [f"slow_{i:02d}.jpg" for i in range(24)]
    folder, out = _folder(tmp_path / "in", names), tmp_path / "out"
    (tmp_path / "s").mkdir()
    write_settings(folder, state_dir=str(tmp_path / "s"), slow_s=0.3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    def command(at: str) -> list[str]:
        return [
            sys.executable, "-m", "batchseg", "run", str(folder), "--prompt", "roof", "--output", str(out),
            "--engine", FACTORY, "--backend", "ray", "--ray-address", at,
        ]  # fmt: skip

    driver = subprocess.Popen(command(address), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at: list[float] = []

    def kill_cluster() -> None:
        for proc in nodes.processes():
            _signal(proc, signal.SIGKILL)
        killed_at.append(time.monotonic())

    try:
        _when_ok_rows(out, 3, kill_cluster, running=lambda: driver.poll() is None)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
    waited = time.monotonic() - killed_at[0]
    log = _log_text(out)
    assert driver.returncode == 1 and waited < 30, (waited, err[-2000:], log)
    assert "the Ray cluster is gone" in err.decode() and "run ended: ConfigError" in log, log
    assert re.search(r"worker_lost: worker \d \(pid \d+\) was lost \(the Ray cluster is gone", log), log
    assert "did not load" not in log and "out-of-memory" not in log, log
    finished = _ok_finish_times(out)
    assert 3 <= len(finished) < len(names)

    fresh = LoopbackCluster()  # a new Ray, as after a restart of the machines
    try:
        port = _free_port()
        fresh.start_node(
            "--head", f"--port={port}", f"--node-ip-address={HEAD_IP}", "--include-dashboard=false",
            "--num-cpus=2", "--object-store-memory=80000000",
        )  # fmt: skip
        again = subprocess.run(
            command(f"{HEAD_IP}:{port}"), env=env, capture_output=True, text=True, timeout=180
        )
    finally:
        fresh.stop()
    assert again.returncode == 0, again.stderr[-2000:]
    after = _ok_finish_times(out)
    assert sorted(after) == names
    assert all(after[path] == when for path, when in finished.items()), "a finished image was redone"


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
        folder, tmp_path / "out", state, backend="ray", ray_address=cluster, chosen={"slow_s": 0.6}
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
