"""The worker process: loads one Engine, then runs the tasks the pool sends it (messages.py).

The worker never raises across the pipe: a failed load becomes ``LoadFailed``, a failing image a
failed result with the exception's class, message and traceback. Hangs and hard crashes are the
pool's business. Imported by the parent too (the entry point): it must not import torch.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from ..errors import BatchsegError, ConfigError
from ..records import Item, ItemResult, Status, failure_result
from ..tiles import merge_process
from .contract import Capabilities, Engine, EngineSpec, load_factory
from .messages import Ack, Done, LoadFailed, Ready, Task, Threads
from .task_items import Beat, collect_warnings, run_items, send_quietly, take_notes
from .tiling import Tiler
from .writer import OutputWriter

__all__ = [
    "THREAD_ENV_VARS",
    "configure_openmp",
    "serve_connection",
    "set_torch_threads",
    "worker_main",
]

#: Read by OpenMP / MKL / OpenBLAS when torch is imported; set before the engine factory runs.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: Exit status of a worker that noticed its pool is gone.
ORPHAN_EXIT_CODE = 70

_PARENT_POLL_S = 1.0


def worker_main(spec: EngineSpec, slot: int, conn: Connection, threads: int | None) -> None:
    """Entry point of a worker process: load the engine once, then serve tasks until told to stop."""
    _detach_from_terminal_signals()
    _exit_with_parent()
    serve_connection(spec, slot, conn, threads)


def serve_connection(spec: EngineSpec, slot: int, conn: Connection, threads: int | None) -> None:
    """A worker's life on one connection: load the engine, serve tasks, close it. Run by a worker
    process (above) and, on a thread, by a Ray actor (``batchseg.supervise.ray_backend``)."""
    configure_openmp(threads)
    loaded = _load(spec, slot, conn, threads)
    if loaded is None:
        return
    engine, capabilities, tiler = loaded
    writer = OutputWriter(spec.config, capabilities.device)
    # While serving tasks, warnings go to the pool (the run log); while loading and closing, with
    # no message to carry them, to stderr as usual.
    restore = collect_warnings()
    try:
        _serve(engine, capabilities, conn, tiler, writer)
    finally:
        restore()
        merge_process.stop_shared()  # a Ray actor's process outlives this call: so would the helper
        try:
            engine.close()
        except Exception:  # noqa: S110 - closing is best effort; the process ends anyway
            pass


def _load(
    spec: EngineSpec, slot: int, conn: Connection, threads: int | None
) -> tuple[Engine, Capabilities, Tiler | None] | None:
    try:
        engine = load_factory(spec)(spec, slot)
        capabilities = _capabilities(engine)
        tiler = Tiler.for_run(spec.config, capabilities)  # ConfigError: a bad --tile-overlap
        set_torch_threads(threads)
    except BaseException as exc:  # noqa: BLE001 - whatever the factory raises must reach the pool
        detail = str(exc) if isinstance(exc, BatchsegError) else f"{type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        send_quietly(conn, LoadFailed(detail, trace, config_error=isinstance(exc, ConfigError)))
        return None
    if not send_quietly(conn, Ready(os.getpid(), capabilities)):
        return None
    return engine, capabilities, tiler


def _capabilities(engine: Engine) -> Capabilities:
    capabilities = engine.capabilities
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"the engine's capabilities is a {type(capabilities).__name__}, not a Capabilities")
    return capabilities


def _serve(
    engine: Engine, capabilities: Capabilities, conn: Connection, tiler: Tiler | None, writer: OutputWriter
) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the pool is gone
        if isinstance(message, Threads):
            # torch takes the new count at once; OpenMP read its variables at import, but what
            # this process starts from now on (and the engine, if it asks) sees the new count.
            configure_openmp(message.count)
            set_torch_threads(message.count)
            continue
        if not isinstance(message, Task):
            return  # Shutdown
        if not send_quietly(conn, Ack(message.task_id)):
            return
        beat = Beat(conn, message.task_id, capabilities, live=capabilities.heartbeat_every > 0)
        results = run_items(engine, capabilities, message.items, beat, tiler, writer, message.may_split)
        if not _send_done(conn, message.task_id, message.items, results, capabilities):
            return


def _send_done(
    conn: Connection,
    task_id: int,
    items: Sequence[Item],
    results: list[ItemResult],
    capabilities: Capabilities,
) -> bool:
    notes = take_notes()
    try:
        conn.send(Done(task_id, results, notes))
        return True
    except (EOFError, OSError):
        return False
    except Exception as exc:  # noqa: BLE001 - an unpicklable result must not kill the worker
        # Pickling happens before any byte is written, so the pipe is still clean here.
        failed = [failure_result(item, Status.ERROR, exc=exc, device=capabilities.device) for item in items]
        return send_quietly(conn, Done(task_id, failed, notes))


def configure_openmp(threads: int | None) -> None:
    """OpenMP's settings for this worker, made before torch is imported (they are read then).

    ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise: an idle OpenMP thread sleeps
    instead of spinning on a core an I/O thread needs (measured: docs/how-it-works.md, "Threads")."""
    if threads:
        for name in THREAD_ENV_VARS:
            os.environ[name] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_torch_threads(threads: int | None) -> None:
    """torch's intra-op and inter-op thread counts, where torch is loaded (None: as they are). The
    one place a worker's thread count reaches torch: after the engine loads (OpenMP's variables,
    set before, covered the load) and whenever the pool sends ``Threads``."""
    torch = sys.modules.get("torch")
    if not threads or torch is None:
        return
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        # Settable only before the first parallel op; the first value stays, which is harmless
        # (inter-op threads are idle in inference).
        pass


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
