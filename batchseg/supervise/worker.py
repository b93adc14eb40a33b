"""The worker process: loads one Engine, then runs the tasks the supervisor sends it.

A worker is started by ``batchseg.supervise.pool`` with the ``spawn`` method and talks to its supervisor over
one duplex pipe, in small dataclasses only::

    supervisor -> worker   Task(task_id, items) | Shutdown()
    worker -> supervisor   Ready(pid, device, gpu_count) | LoadFailed(error_type, message, traceback)
                           Ack(task_id) | Heartbeat(task_id) | Done(task_id, results)

The worker never raises across the pipe: a failed load becomes ``LoadFailed``, a failing image
becomes an ``error`` result carrying the exception's class, message and traceback. Hangs and hard
crashes are the supervisor's business (it watches the clock and the process).

This module is imported by the parent too (the messages, the entry point): it must not import torch.
The engine factory imports it, inside the worker, after the thread limits are in the environment.

A worker never outlives its supervisor: it ignores SIGINT (Ctrl-C reaches the whole process group;
the supervisor decides between draining and killing), asks Linux to SIGKILL it when the parent dies,
and a watcher thread exits the process as soon as the parent's sentinel closes or it is re-parented.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from ..records import Item, ItemResult, Status
from .contract import Engine, EngineSpec, load_factory

__all__ = [
    "Ack",
    "Done",
    "Heartbeat",
    "LoadFailed",
    "Ready",
    "Shutdown",
    "Task",
    "THREAD_ENV_VARS",
    "configure_openmp",
    "run_task",
    "serve_connection",
    "worker_main",
]

#: Read by OpenMP / MKL / OpenBLAS when torch is imported; set before the engine factory runs.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: Exit status of a worker that noticed its supervisor is gone.
ORPHAN_EXIT_CODE = 70

_PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class Task:
    """A batch of one or more items for the engine; the watchdog budget is timeout x len(items)."""

    task_id: int
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Shutdown:
    """Close the engine and exit."""


@dataclass(frozen=True)
class Ready:
    """The engine loaded; ``device`` is the engine's device string, ``gpu_count`` the CUDA devices seen.

    ``task_size`` is the engine's suggested number of items per task (its ``preferred_task_size``,
    e.g. from free GPU memory), used where the user set none. ``heartbeat_every``: the engine sends
    a Heartbeat after every that many items of a task (its ``heartbeat_every``; 0 = never), so the
    watchdog budget covers that many items instead of the whole task.
    """

    pid: int
    device: str
    gpu_count: int
    task_size: int = 1
    heartbeat_every: int = 0


@dataclass(frozen=True)
class LoadFailed:
    """The engine factory raised; the worker exits right after sending this."""

    error_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Ack:
    """The worker took the task: the supervisor starts its clock now."""

    task_id: int


@dataclass(frozen=True)
class Heartbeat:
    """Part of the task is done (``Ready.heartbeat_every`` more items): the clock starts again.

    ``results``: items finished since the last message, as (index in the task, result); the
    supervisor records them at once, so a crash later in the task costs none of them.
    ``reached``: the engine has touched no item at or past this index (None: it does not say), so
    after a crash those go back to the queue as fresh work instead of being suspects."""

    task_id: int
    results: tuple[tuple[int, ItemResult], ...] = ()
    reached: int | None = None
    notes: tuple[str, ...] = ()  # warnings raised in the worker since its last message


@dataclass(frozen=True)
class Done:
    """One result per item of the task, in order."""

    task_id: int
    results: list[ItemResult]
    notes: tuple[str, ...] = ()  # warnings raised in the worker since its last message


def worker_main(spec: EngineSpec, slot: int, conn: Connection, threads: int | None) -> None:
    """Entry point of a worker process: load the engine once, then serve tasks until told to stop."""
    _detach_from_terminal_signals()
    _exit_with_parent()
    serve_connection(spec, slot, conn, threads)


def serve_connection(spec: EngineSpec, slot: int, conn: Connection, threads: int | None) -> None:
    """A worker's life on one connection: load the engine, serve tasks, close. Run by a worker
    process (above) and, on a thread, by a Ray actor (``batchseg.supervise.ray_backend``)."""
    configure_openmp(threads)
    engine = _load(spec, slot, conn, threads)
    if engine is None:
        return
    # While serving tasks, warnings go to the supervisor (the run log); while loading and closing,
    # with no message to carry them, to stderr as usual.
    show = _collect_warnings()
    try:
        _serve(engine, conn)
    finally:
        warnings.showwarning = show
        try:
            engine.close()
        except Exception:  # noqa: S110 - closing is best effort; the process ends anyway
            pass


def _load(spec: EngineSpec, slot: int, conn: Connection, threads: int | None) -> Engine | None:
    try:
        engine: Engine = load_factory(spec)(spec, slot)
        device = str(engine.device)
        ready = Ready(
            os.getpid(),
            device,
            _gpu_count(engine, device),
            task_size=_positive_attr(engine, "preferred_task_size"),
            heartbeat_every=_positive_attr(engine, "heartbeat_every") if _takes_heartbeat(engine) else 0,
        )
        _set_torch_threads(threads)
    except BaseException as exc:  # noqa: BLE001 - whatever the factory raises must reach the supervisor
        _send_quietly(conn, LoadFailed(type(exc).__name__, str(exc), traceback.format_exc()))
        return None
    if not _send_quietly(conn, ready):
        return None
    return engine


def _serve(engine: Engine, conn: Connection) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the supervisor is gone
        if not isinstance(message, Task):
            return
        if not _send_quietly(conn, Ack(message.task_id)):
            return
        beat = _Beat(conn, message.task_id, engine) if _takes_heartbeat(engine) else None
        results = run_task(engine, message.items, beat)
        if not _send_done(conn, message.task_id, message.items, results):
            return


def run_task(engine: Engine, items: Sequence[Item], heartbeat: _Beat | None = None) -> list[ItemResult]:
    """Run the engine on a batch; never raises.

    When ``engine.process`` raises on a batch of several items, each item it has not already
    reported through ``heartbeat`` is run again on its own, so only the image that raises is
    marked ``error``.
    """
    try:
        return _process(engine, items, heartbeat)
    except BaseException as exc:  # noqa: BLE001 - the worker never raises across the pipe
        if len(items) == 1:
            return [error_result(items[0], exc, engine)]
    streamed = heartbeat.sent if heartbeat is not None else {}
    return [
        streamed[k] if k in streamed else run_task(engine, [item], heartbeat and heartbeat.shifted(k))[0]
        for k, item in enumerate(items)
    ]


def _process(engine: Engine, items: Sequence[Item], heartbeat: _Beat | None) -> list[ItemResult]:
    started = time.time()
    results = engine.process(items, heartbeat=heartbeat) if heartbeat else engine.process(items)
    finished = time.time()
    if not isinstance(results, list) or len(results) != len(items):
        count = len(results) if isinstance(results, list) else type(results).__name__
        raise TypeError(f"engine returned {count} results for {len(items)} items")
    for result in results:
        _stamp(result, engine, started, finished)
    return results


def _stamp(result: object, engine: Engine, started: float, finished: float) -> None:
    """Check a result and fill in what the engine left out (worker, device, times)."""
    if not isinstance(result, ItemResult):
        raise TypeError(f"engine returned a {type(result).__name__}, not an ItemResult")
    result.worker_pid = result.worker_pid or os.getpid()
    result.device = result.device or str(engine.device)
    result.started_at = result.started_at if result.started_at is not None else started
    result.finished_at = result.finished_at if result.finished_at is not None else finished


class _Beat:
    """The ``heartbeat`` an engine's ``process`` gets: ``beat(finished=(), reached=None)`` sends a
    Heartbeat with the results finished since the last one (index in the task, result). Remembers
    what it sent, so a task that fails later reruns none of those items."""

    def __init__(self, conn: Connection, task_id: int, engine: Engine, offset: int = 0) -> None:
        self.conn, self.task_id, self.engine, self.offset = conn, task_id, engine, offset
        self.started = time.time()
        self.sent: dict[int, ItemResult] = {}  # by index in the call to process

    def __call__(self, finished: Sequence[tuple[int, ItemResult]] = (), reached: int | None = None) -> None:
        now = time.time()
        for _index, result in finished:
            _stamp(result, self.engine, self.started, now)
        results = tuple((self.offset + index, result) for index, result in finished)
        where = None if reached is None else self.offset + reached
        notes = _take_notes()
        try:
            self.conn.send(Heartbeat(self.task_id, results, where, notes))
        except (EOFError, OSError):
            return  # the supervisor is gone; the worker ends at its next receive
        except Exception:  # noqa: BLE001 - an unpicklable result: it will travel in Done instead
            _send_quietly(self.conn, Heartbeat(self.task_id, (), where, notes))
            return
        self.sent.update(finished)

    def shifted(self, offset: int) -> _Beat:
        """The heartbeat for item ``offset`` of this task run on its own."""
        return _Beat(self.conn, self.task_id, self.engine, self.offset + offset)


def error_result(item: Item, exc: BaseException, engine: Engine | None = None) -> ItemResult:
    """The ``error`` result of an exception, with its class, message and traceback text."""
    now = time.time()
    return ItemResult(
        path=item.path,
        status=Status.ERROR,
        error_type=type(exc).__name__,
        error_message=str(exc) or repr(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        started_at=now,
        finished_at=now,
        worker_pid=os.getpid(),
        device=str(getattr(engine, "device", "")) or None,
    )


def _send_done(conn: Connection, task_id: int, items: Sequence[Item], results: list[ItemResult]) -> bool:
    notes = _take_notes()
    try:
        conn.send(Done(task_id, results, notes))
        return True
    except (EOFError, OSError):
        return False
    except Exception as exc:  # noqa: BLE001 - an unpicklable result must not kill the worker
        # Pickling happens before any byte is written, so the pipe is still clean here.
        return _send_quietly(conn, Done(task_id, [error_result(item, exc) for item in items], notes))


#: Warnings shown in this worker (by any thread), sent with its next Heartbeat or Done, so they
#: reach the run log instead of a console nobody reads at night.
_NOTES: list[str] = []


def _collect_warnings() -> Callable[..., None]:
    """Keep shown warnings for the next message; returns the ``showwarning`` it replaced."""

    def keep(message: Warning | str, category: type[Warning], *_where: object, **_kw: object) -> None:
        _NOTES.append(f"{category.__name__}: {message}")  # list.append is atomic: any thread

    previous = warnings.showwarning
    warnings.showwarning = keep  # the filters still decide what is shown (once per place, ...)
    return previous


def _take_notes() -> tuple[str, ...]:
    count = len(_NOTES)  # only these: another thread may append meanwhile
    taken = tuple(_NOTES[:count])
    del _NOTES[:count]
    return taken


def _send_quietly(conn: Connection, message: object) -> bool:
    try:
        conn.send(message)
        return True
    except (EOFError, OSError):
        return False


def _takes_heartbeat(engine: Engine) -> bool:
    try:
        return "heartbeat" in inspect.signature(engine.process).parameters
    except (TypeError, ValueError):
        return False


def _positive_attr(engine: Engine, name: str) -> int:
    value = getattr(engine, name, 1)
    return value if isinstance(value, int) and value >= 1 else 1


def _gpu_count(engine: Engine, device: str) -> int:
    declared = getattr(engine, "gpu_count", None)
    if isinstance(declared, int):
        return declared
    torch = sys.modules.get("torch")  # only if the engine imported it; never import it here
    if torch is None or not device.startswith("cuda"):
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - a broken CUDA setup shows up in the engine, not here
        return 0


def configure_openmp(threads: int | None) -> None:
    """OpenMP's settings for this worker, made before torch is imported (they are read then).

    ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise: an idle OpenMP thread sleeps
    instead of spinning on a core an I/O thread needs. Measured on 2 cores: the full-size model's
    forward unchanged (14.5 s against 14.9 s per image, three runs each); the tiny test model end
    to end 60 -> 77-86 img/s on 2048x1536 JPEGs, but 104-125 -> 74-78 on 640x480 ones, where
    waking the threads for each of its tiny operations costs more than the decoding they slowed."""
    if threads:
        for name in THREAD_ENV_VARS:
            os.environ[name] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _set_torch_threads(threads: int | None) -> None:
    torch = sys.modules.get("torch")
    if threads and torch is not None:
        torch.set_num_threads(threads)


def _detach_from_terminal_signals() -> None:
    # Ctrl-C is delivered to every process of the foreground group; only the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGBREAK"):
        signal.signal(signal.SIGBREAK, signal.SIG_IGN)


def _exit_with_parent() -> None:
    parent_pid = os.getppid()
    _request_parent_death_signal()
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None

    def watch() -> None:
        while True:
            if sentinel is not None and wait([sentinel], timeout=_PARENT_POLL_S):
                os._exit(ORPHAN_EXIT_CODE)
            elif sentinel is None:
                time.sleep(_PARENT_POLL_S)
            if os.name != "nt" and os.getppid() != parent_pid:
                os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="batchseg-parent-watch", daemon=True).start()


def _request_parent_death_signal() -> None:
    """Linux only: the kernel SIGKILLs this process when its parent dies, even if a C call holds the GIL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # noqa: BLE001, S110 - the watcher thread still covers this case
        pass
