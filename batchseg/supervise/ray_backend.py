"""The Ray backend: the same supervisor and worker code, each worker a Ray actor.

The pool (``pool._Pool``) still sees a process and a pipe per worker: ``RayLauncher.start`` creates
an actor and a local bridge (``RayWorker``) that carries the pool's typed messages to and from it.
The actor runs the worker's own serving loop (``worker.serve_connection``) on a thread, so the
engine contract, heartbeats and results are exactly a local worker's, while the watchdog, retries,
circuit breaker and drain stay in the driver. Stopping the "process" kills the actor.

Sizing: a CPU actor reserves as many CPUs as its torch threads, so the threads are shared out
(``cpu_share``) until the workers asked for fit the nodes. An actor that no node has room for within
``PLACEMENT_WAIT_S`` is given up and the pool told (``messages.Unplaced``), with what it asked for
and what the cluster has free; the pool goes on with the others.

Ray's own failures: an actor whose node (raylet, agent, machine) or cluster is lost ends as
``lost``, naming its node, its pid and Ray's own error, and ``node_lost`` when the node or the
cluster went (its task is then no image's fault). An actor Ray cannot start (no live node, the
cluster gone: its GCS does not answer for ``CLUSTER_GONE_S``, or no process after ``START_WAIT_S``)
is ``Unplaced`` with Ray's reason, never a model that did not load. No call to Ray that may wait on
a lost cluster runs on the pool's thread.

Only the driver imports this module's Ray parts; it never imports torch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigError, OutputError
from ..worker.contract import EngineSpec
from ..worker.messages import Unplaced
from ..worker.process import serve_connection
from .launch import WorkerProcess
from .ray_health import (
    GcsWatch,
    actor_state,
    gcs_address,
    kill_quietly,
    node_alive,
    ray_error,
    room_on_a_node,
    still_waiting,
)

__all__ = ["RayLauncher", "RayWorker", "EngineActor", "cpu_share"]

#: Longest a bridge's call for messages waits inside the actor before it returns empty.
_RECEIVE_WAIT_S = 0.5
#: CPU actors' torch threads when --threads is not given (at most the smallest node's CPUs).
_CPU_ACTOR_THREADS = 4
#: Longest a new actor waits for a node with room before it is reported and given up. Longer than
#: Ray takes to hand a killed actor's CPUs to its replacement; a cluster that is simply full stays full.
PLACEMENT_WAIT_S = 20.0
#: Between two looks at whether a waiting actor has started.
_PLACEMENT_POLL_S = 0.5
#: Exit code the pool is told when an actor died without being asked (node lost, process killed).
LOST_EXIT_CODE = 1
#: An actor that has no process this long after it was asked for is given up, whatever Ray says of
#: its node (e.g. a node whose agent is gone keeps its free CPUs but starts nothing): far below the
#: pool's load timeout, far above a worker process's start.
START_WAIT_S = 60.0
#: The cluster's GCS not answering this long: the cluster is gone (Ray itself ends a driver whose
#: GCS is away for 60 s, without a word).
CLUSTER_GONE_S = 10.0


def _import_ray(local: bool) -> Any:
    if local and "ray" not in sys.modules:
        # A Ray started for one run serves this machine only: loopback addresses, never the
        # machine's network interface (Ray's own switch for single-machine clusters).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "--backend ray needs Ray: install it with  pip install 'batchseg[ray]'  (Linux for clusters "
            "of several machines)"
        ) from exc
    return ray


@dataclass(frozen=True)
class _Ended:
    """The actor's serving loop has returned (the engine is closed): nothing more will come."""


class EngineActor:
    """A worker inside a Ray actor: ``serve_connection`` on a thread, fed through an in-process pipe.

    Methods run on the actor's thread pool (``max_concurrency``), so a long ``receive`` does not
    block ``send``."""

    def __init__(self, spec: EngineSpec, slot: int, threads: int, sys_path: list[str]) -> None:
        for entry in reversed(sys_path):  # the driver's import path, as multiprocessing's spawn does
            if entry not in sys.path:
                sys.path.insert(0, entry)
        self._mine, theirs = multiprocessing.Pipe(duplex=True)
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._serve, args=(spec, slot, theirs, threads), name="batchseg-ray-worker", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _serve(spec: EngineSpec, slot: int, conn: Connection, threads: int) -> None:
        try:
            serve_connection(spec, slot, conn, threads)
        finally:
            conn.close()

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> tuple[int, str, str]:
        """This actor's process and node: (pid, node IP, node id)."""
        import ray

        ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        return os.getpid(), ip, ray.get_runtime_context().get_node_id()

    def send(self, message: object) -> None:
        with self._lock:
            self._mine.send(message)

    def receive(self, wait_s: float) -> list[object]:
        """Messages the worker loop sent, waiting up to ``wait_s`` for the first one."""
        out: list[object] = []
        try:
            if self._mine.poll(wait_s):
                while self._mine.poll(0):
                    out.append(self._mine.recv())
        except (EOFError, OSError):
            out.append(_Ended())
        return out


class RayWorker:
    """The driver's view of one actor, shaped like a ``multiprocessing.Process`` for the pool.

    Two bridge threads move messages: supervisor -> actor (``send``) and actor -> supervisor (a
    long-polling ``receive``). When the actor ends, asked or not, the pool's end of the pipe reads
    EOF and ``sentinel`` becomes readable, as for a process that exited."""

    def __init__(
        self, ray: Any, actor: Any, bridge_end: Connection, needs: dict[str, float], gcs: str | None = None
    ) -> None:  # actor None: Ray could not be asked for one (the pool is told Unplaced)
        self._ray = ray
        self._actor = actor
        self._end = bridge_end
        self._needs = needs  # the resources the actor asked Ray for
        self._gcs = gcs  # host:port of the cluster's GCS
        self._dead_r, self._dead_w = os.pipe()
        self._finished = threading.Event()
        self._killed = False
        self._pid: int | None = None
        self.node: tuple[str, str] | None = None  # (IP, id) of the actor's node once it started
        self.exitcode: int | None = None
        self.reason: str | None = None
        #: How the actor was lost, when it ended without being asked: its node, its pid, Ray's words.
        self.lost: str | None = None
        #: The actor went with its node or the cluster (not a death of its own process).
        self.node_lost = False
        threading.Thread(target=self._uplink, name="batchseg-ray-up", daemon=True).start()
        threading.Thread(target=self._downlink, name="batchseg-ray-down", daemon=True).start()

    # -- the Process-like surface the pool uses -----------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def sentinel(self) -> int:
        return self._dead_r

    def is_alive(self) -> bool:
        return not self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._finished.wait(timeout)

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self._finished.is_set():
            return
        self._killed = True
        self._kill_actor()  # the uplink reports the end

    def _kill_actor(self) -> None:
        """``ray.kill`` off the caller's thread: with the cluster gone it may wait for the GCS."""
        if self._actor is not None:
            threading.Thread(target=kill_quietly, args=(self._ray, self._actor), daemon=True).start()

    # -- bridges -------------------------------------------------------------------------------

    def _uplink(self) -> None:
        ray = self._ray
        try:
            if self._actor is None:  # the cluster was gone when it was asked for
                self._unplaced(
                    f"cannot be placed: the Ray cluster is gone (its GCS at {self._gcs} does not answer)"
                )
                return
            if not self._await_start():
                return
            while True:
                for message in ray.get(self._actor.receive.remote(_RECEIVE_WAIT_S)):
                    if isinstance(message, _Ended):
                        self._finish(0)
                        return
                    self._end.send(message)
        except (OSError, EOFError):
            self._finish(0)  # the supervisor closed its end: it no longer listens
        except Exception as exc:  # noqa: BLE001 - a dead actor or node: Ray raises its own errors
            self.reason = ray_error(exc)
            if self._killed:  # asked to stop; an actor still waiting for a node had no process to kill
                self._finish(-int(signal.SIGKILL) if self._pid is not None else 0)
            elif self._pid is None:  # Ray could not start it: no model was loading
                self._unplaced(f"was not started by Ray: {self.reason}")
            else:
                self._on_lost()

    def _on_lost(self) -> None:
        """The actor ended without being asked: say where and what Ray said, and whether its node
        (or the whole cluster) went with it."""
        ip, node_id = self.node or ("?", "")
        alive, where = node_alive(self._ray, node_id, self._gcs)
        self.node_lost = alive is not True
        self.lost = f"was lost ({where}; node id {node_id[:12]}, IP {ip}): {self.reason}"
        self._finish(LOST_EXIT_CODE)

    def _await_start(self) -> bool:
        """Wait for the actor's process; False when Ray cannot start it: no node had room for it
        within ``PLACEMENT_WAIT_S``, the cluster is gone, or no process came within
        ``START_WAIT_S``. The pool is told (``Unplaced``), and the actor given up."""
        ref = self._actor.where.remote()
        started = time.monotonic()
        give_up_at = started + PLACEMENT_WAIT_S
        gcs = GcsWatch(self._gcs)
        while not self._ray.wait([ref], timeout=_PLACEMENT_POLL_S)[0]:
            if self._killed:
                continue  # the kill ends the wait (the reference raises)
            gone = gcs.gone_for()
            if gone >= CLUSTER_GONE_S:
                self._unplaced(
                    f"cannot be placed: the Ray cluster is gone (its GCS at {self._gcs} "
                    f"has not answered for {gone:.0f} s)"
                )
                return False
            waited = time.monotonic() - started
            if waited >= START_WAIT_S:
                self._unplaced(f"was not started by Ray within {waited:.0f} s ({actor_state(self._actor)})")
                return False
            if time.monotonic() >= give_up_at and self._unplaceable():
                self._unplaced(self._placement_detail())
                return False
        self._pid, ip, node_id = self._ray.get(ref)  # raises when it died (or was killed) first
        self.node = (ip, node_id)
        return True

    def _unplaced(self, detail: str) -> None:
        self._end.send(Unplaced(detail))
        self._finish(0)  # kills the waiting actor: Ray forgets its request

    def _unplaceable(self) -> bool:
        """Ray has not placed the actor, and no node has the free resources it asks for."""
        if not still_waiting(self._actor):
            return False  # placed; its process is starting (the pool's load timeout bounds that)
        return not room_on_a_node(self._ray, self._needs)

    def _placement_detail(self) -> str:
        name = "GPU" if self._needs.get("GPU") else "CPU"
        free = self._ray.available_resources().get(name, 0.0)
        total = self._ray.cluster_resources().get(name, 0.0)
        need = self._needs[name]
        alive = sum(bool(node.get("Alive")) for node in self._ray.nodes())
        nodes = "" if alive else " (no live node)"
        return f"cannot be placed: needs {need:g} {name}, the cluster has {free:g} free of {total:g}{nodes}"

    def _downlink(self) -> None:
        while not self._finished.is_set():
            try:
                message = self._end.recv()
            except (EOFError, OSError):
                return
            try:
                if self._actor is not None:
                    self._actor.send.remote(message)
            except Exception:  # noqa: BLE001 - the actor is gone; the uplink reports it
                return

    def _finish(self, code: int) -> None:
        if self._finished.is_set():
            return
        self.exitcode = code
        self._finished.set()
        if code == 0:  # asked to stop: the actor process would otherwise stay, idle
            self._kill_actor()
        for close in (self._end.close, lambda: os.close(self._dead_w)):
            try:
                close()
            except OSError:
                pass


class RayLauncher:
    """Starts the pool's workers as Ray actors: one per GPU of the cluster, or one per ``--threads``
    CPUs on CPU-only clusters (see ``cpu_share`` for the threads when --threads is not given). A
    context manager: connects to (or starts) Ray, checks that every node can write the output
    folder and read the input, and disconnects at the end."""

    def __init__(self, address: str | None, output_dir: Path, input_dir: Path) -> None:
        self.address = address
        self.output_dir = output_dir
        self.input_dir = input_dir
        self._ray: Any = None
        self._started_here = False
        self._actor_class: Any = None
        self._gcs: str | None = None
        self._cpus: list[int] = []

    def __enter__(self) -> RayLauncher:
        ray = self._ray = _import_ray(local=not self.address)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
                host = self.address.rsplit(":", 1)[0]
                if host.startswith("127."):  # a cluster on this machine's loopback: join it there
                    kwargs["_node_ip_address"] = host
            else:
                kwargs["object_store_memory"] = 128 * 1024 * 1024  # results are small records
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot connect to the Ray cluster at {self.address}: {exc}") from exc
            self._started_here = True
        self._actor_class = ray.remote(max_concurrency=4, max_restarts=0)(EngineActor)
        self._gcs = gcs_address(ray)
        check_nodes(ray, self.output_dir, self.input_dir)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._started_here:
            if self._gcs and not GcsWatch(self._gcs).answers():
                # The cluster is gone: Ray's shutdown would wait for it. Its own watch ends this
                # process 60 s after the GCS went, so the run's end (exit 1) must come before.
                return
            self._ray.shutdown()

    # -- Launcher ----------------------------------------------------------------------------------

    def start(self, spec: EngineSpec, slot: int, threads: int) -> tuple[WorkerProcess, Connection]:
        pool_end, bridge_end = multiprocessing.Pipe(duplex=True)
        if not GcsWatch(self._gcs).answers():  # asking Ray for an actor now would wait for the GCS
            return RayWorker(self._ray, None, bridge_end, {}, self._gcs), pool_end
        gpu = self._wants_gpu(spec)
        # A CPU actor reserves its threads' CPUs, at most the largest node's (more could never be
        # placed); a GPU actor its GPU and one CPU.
        needs = {"GPU": 1.0, "CPU": 1.0} if gpu else {"CPU": float(min(threads, max(self._node_cpus())))}
        options = {"num_gpus": needs.get("GPU", 0), "num_cpus": needs["CPU"]}
        # Ray gives each GPU actor its own device as cuda:0, so the factory's slot picks nothing.
        factory_slot = 0 if gpu else slot
        actor = self._actor_class.options(**options).remote(spec, factory_slot, threads, list(sys.path))
        return RayWorker(self._ray, actor, bridge_end, needs, self._gcs), pool_end

    def pool_size(self, spec: EngineSpec, cuda: bool, gpu_count: int) -> int:
        if cuda:
            return max(1, int(self._resources().get("GPU", 0)))
        cpus = self._node_cpus()
        return max(1, sum(count // cpu_share(cpus, 1) for count in cpus))

    def threads(self, workers: int) -> int:
        return cpu_share(self._node_cpus(), workers)

    def _node_cpus(self) -> list[int]:
        """The CPUs of each live node that has any (a head started with --num-cpus=0 runs none);
        the last known ones while the GCS does not answer (asking would wait for it)."""
        if self._cpus and not GcsWatch(self._gcs).answers():
            return self._cpus
        cpus = [int(n["Resources"].get("CPU", 0)) for n in self._ray.nodes() if n.get("Alive")]
        self._cpus = [count for count in cpus if count > 0] or [1]
        return self._cpus

    def _wants_gpu(self, spec: EngineSpec) -> bool:
        return spec.config.device != "cpu" and self._resources().get("GPU", 0) >= 1

    def _resources(self) -> dict[str, float]:
        return dict(self._ray.cluster_resources())


def cpu_share(node_cpus: list[int], workers: int) -> int:
    """Torch threads (and CPUs reserved) per CPU actor when --threads is not given: at most 4 and
    at most the smallest node's CPUs, then fewer until ``workers`` actors fit on the nodes, as the
    local pool shares the cores among its workers. One at least: past one actor per CPU the rest
    cannot be placed, and the pool is told so."""
    threads = max(1, min(_CPU_ACTOR_THREADS, *node_cpus))
    while threads > 1 and sum(count // threads for count in node_cpus) < workers:
        threads -= 1
    return threads


def check_nodes(ray: Any, output_dir: Path, input_dir: Path) -> None:
    """Every live node must write ``output_dir`` and read ``input_dir`` (a shared folder): else a
    ConfigError/OutputError naming the node, before any image is touched."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_node)
    calls = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        calls.append(
            (node, probe.options(scheduling_strategy=strategy).remote(str(output_dir), str(input_dir)))
        )
    for node, call in calls:
        problem = ray.get(call, timeout=120)
        if problem:
            where = node.get("NodeManagerAddress") or node["NodeID"][:12]
            raise OutputError(
                f"Ray node {where} cannot use the run's folders: {problem}. Every node must see the input "
                "and output folders at the same path (a shared folder: NFS or SMB)"
            )


def _probe_node(output_dir: str, input_dir: str) -> str | None:
    remote = input_dir.replace("\\", "/").startswith("/vsis3/")  # an S3 prefix: each node reads objects
    if not remote and not os.path.isdir(input_dir):
        return f"the input folder {input_dir} does not exist there"
    probe = os.path.join(output_dir, f".batchseg-node-probe-{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb") as fh:
            fh.write(str(time.time()).encode())
        os.unlink(probe)
    except OSError as exc:
        return f"the output folder {output_dir} is not writable there ({exc.strerror or exc})"
    return None
