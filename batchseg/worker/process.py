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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait

from ..errors import BatchsegError, ConfigError
from ..logs import about_image, capture_library_output
from ..records import FINAL_FAILURES, FailureCategory, Item, ItemResult, Status, failure_result
from ..tiles import merge_process
from ..tiles.grid import TilePlan, plan_tiles
from .contract import Capabilities, Engine, EngineSpec, load_factory
from .messages import Ack, Done, Heartbeat, LoadFailed, Ready, Task, Threads
from .tiling import Arrived, RunTiles, Tiler
from .writer import OutputWriter, WritingBeat

__all__ = [
    "THREAD_ENV_VARS",
    "configure_openmp",
    "run_items",
    "run_task",
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
    restore = _collect_warnings()
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
        _send_quietly(conn, LoadFailed(detail, trace, config_error=isinstance(exc, ConfigError)))
        return None
    if not _send_quietly(conn, Ready(os.getpid(), capabilities)):
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
        if not _send_quietly(conn, Ack(message.task_id)):
            return
        beat = _Beat(conn, message.task_id, capabilities, live=capabilities.heartbeat_every > 0)
        results = run_items(engine, capabilities, message.items, beat, tiler, writer, message.may_split)
        if not _send_done(conn, message.task_id, message.items, results, capabilities):
            return


def run_items(
    engine: Engine,
    capabilities: Capabilities,
    items: Sequence[Item],
    heartbeat: _Beat,
    tiler: Tiler | None,
    writer: OutputWriter,
    may_split: bool = False,
) -> list[ItemResult]:
    """Run a task's items; never raises. Whole images go in runs of consecutive items through
    ``run_task``; an image the tiler plans as tiles runs through its tiles here (``Tiler.run``) or,
    with ``may_split``, is answered with its tiles for the pool to spread (``Tiler.split``); tiles
    the pool sent run one image's at a time (``Tiler.run_tile_items``), and an image whose tiles are
    all in is merged (``Tiler.run`` again, finding them on disk)."""
    plans = [_plan(tiler, item) if item.part is None else None for item in items] if tiler else []
    if tiler is None or all(p is None and i.part is None for p, i in zip(plans, items, strict=True)):
        return run_task(engine, capabilities, items, heartbeat, writer)
    results: list[ItemResult] = []
    whole: list[int] = []
    tiles: list[int] = []
    run_tiles = _tile_runner(engine, capabilities, heartbeat, writer)

    def flush() -> None:
        if whole:
            batch = [items[i] for i in whole]
            results.extend(run_task(engine, capabilities, batch, heartbeat.shifted(whole[0]), writer))
            whole.clear()
        if tiles:
            heartbeat((), tiles[-1] + 1)
            started = time.time()
            batch = [items[i] for i in tiles]
            try:
                done = tiler.run_tile_items(batch, run_tiles)
            except Exception as exc:  # noqa: BLE001 - the worker never raises across the pipe
                done = [failure_result(tile, Status.ERROR, exc=exc) for tile in batch]
            for result in done:
                _stamp(result, capabilities, started, time.time())
            results.extend(done)
            heartbeat(list(zip(tiles, done, strict=True)))
            tiles.clear()

    for k, (item, plan) in enumerate(zip(items, plans, strict=True)):
        if item.part is not None and item.part.key is not None:  # a tile the pool sent
            if whole or (tiles and items[tiles[0]].path != item.path):
                flush()
            tiles.append(k)
            continue
        if plan is None and item.part is None:
            if tiles:
                flush()
            whole.append(k)
            continue
        flush()
        heartbeat((), k + 1)  # nothing past this image is touched yet
        upcoming = items[k + 1] if k + 1 < len(items) and isinstance(plans[k + 1], TilePlan) else None
        started = time.time()
        try:
            with about_image(tiler.input_root / item.path):  # what libraries say names it
                result = _tiled_image(tiler, item, plan, may_split, run_tiles, _prefetcher(engine, upcoming))
        except Exception as exc:  # noqa: BLE001 - the worker never raises across the pipe
            result = failure_result(item, Status.ERROR, exc=exc)
        _stamp(result, capabilities, started, time.time())
        results.append(result)
        heartbeat([(k, result)])
    flush()
    return results


def _plan(tiler: Tiler, item: Item) -> TilePlan | ItemResult | None:
    with about_image(tiler.input_root / item.path):  # a header a library finds odd names its image
        return tiler.plan(item)


def _tiled_image(
    tiler: Tiler,
    item: Item,
    plan: TilePlan | ItemResult | None,
    may_split: bool,
    run_tiles: RunTiles,
    running: Callable[[], None] | None = None,
) -> ItemResult:
    """One image planned as tiles (or refused by the plan), or the merge of one the pool spread;
    ``running`` is called once its tiles run here (not for an image spread over the workers)."""
    if isinstance(plan, ItemResult):
        return plan
    if item.part is not None:  # every tile is in: the merge
        return tiler.run(replace(item, part=None), plan_tiles(*item.part.plan), run_tiles)
    assert plan is not None
    if may_split:
        answer = tiler.split(item, plan)
        if answer is not None:
            return answer
    return tiler.run(item, plan, run_tiles, running)


def _prefetcher(engine: Engine, upcoming: Item | None) -> Callable[[], None] | None:
    """What tells an engine that has ``prefetch`` (see ``Engine``) that the image ``upcoming``
    runs as tiles next; called once the current image's tiles run (its own decode is done then)."""
    prefetch = getattr(engine, "prefetch", None)
    if prefetch is None or upcoming is None:
        return None
    item = upcoming

    def tell() -> None:
        try:
            prefetch(item)
        except Exception as exc:  # noqa: BLE001 - a hint: the image is read when its tiles come anyway
            warnings.warn(f"prefetch of {item.path} failed: {exc!r}", RuntimeWarning, stacklevel=2)

    return tell


def _tile_runner(
    engine: Engine, capabilities: Capabilities, heartbeat: _Beat, writer: OutputWriter
) -> RunTiles:
    def run_tiles(items: Sequence[Item], arrived: Arrived | None = None) -> list[ItemResult]:
        beat = _TileBeat(heartbeat.conn, heartbeat.task_id, capabilities, arrived=arrived)
        done = run_task(engine, capabilities, items, beat, writer)
        beat()  # the watchdog's budget is per batch of tiles
        return done

    return run_tiles


def run_task(
    engine: Engine, capabilities: Capabilities, items: Sequence[Item], heartbeat: _Beat, writer: OutputWriter
) -> list[ItemResult]:
    """Run the engine on a batch; never raises.

    When ``engine.process`` raises on a batch of several items, each item it has not already
    reported through ``heartbeat`` is run again on its own, so only the image that raises fails.
    """
    try:
        return _process(engine, capabilities, items, heartbeat, writer)
    except BaseException as exc:  # noqa: BLE001 - the worker never raises across the pipe
        if len(items) == 1:
            return [failure_result(items[0], Status.ERROR, exc=exc, device=capabilities.device)]
    streamed = heartbeat.sent
    return [
        streamed[k]
        if k in streamed
        else run_task(engine, capabilities, [item], heartbeat.shifted(k), writer)[0]
        for k, item in enumerate(items)
    ]


def _process(
    engine: Engine, capabilities: Capabilities, items: Sequence[Item], heartbeat: _Beat, writer: OutputWriter
) -> list[ItemResult]:
    """The engine's outcomes, each segmentation written (``writer``) as it is reported or returned."""
    started = time.time()
    writing = WritingBeat(writer, items, heartbeat)
    outcomes = engine.process(items, writing)
    if not isinstance(outcomes, list) or len(outcomes) != len(items):
        count = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
        raise TypeError(f"engine returned {count} results for {len(items)} items")
    results = writing.results(outcomes)
    finished = time.time()
    for result in results:
        _stamp(result, capabilities, started, finished)
    return results


def _stamp(result: object, capabilities: Capabilities, started: float, finished: float) -> None:
    """Check a result and fill in what the engine left out (worker, device, times, category)."""
    if not isinstance(result, ItemResult):
        raise TypeError(f"engine returned a {type(result).__name__}, not an ItemResult")
    result.worker_pid = result.worker_pid or os.getpid()
    result.device = result.device or capabilities.device
    result.started_at = result.started_at if result.started_at is not None else started
    result.finished_at = result.finished_at if result.finished_at is not None else finished
    if result.status in FINAL_FAILURES and result.category is None:
        result.category = FailureCategory.IMAGE


class _Beat:
    """The ``heartbeat`` an engine's ``process`` gets: ``beat(finished=(), reached=None)`` sends a
    Heartbeat with the results finished since the last one (index in the task, result). Remembers
    what it sent, so a task that fails later reruns none of those items. Not ``live`` (the engine
    declared ``heartbeat_every=0``): a no-op."""

    def __init__(
        self, conn: Connection, task_id: int, capabilities: Capabilities, live: bool, offset: int = 0
    ) -> None:
        self.conn, self.task_id, self.capabilities = conn, task_id, capabilities
        self.live, self.offset = live, offset
        self.started = time.time()
        self.sent: dict[int, ItemResult] = {}  # by index in the call to process

    def __call__(self, finished: Sequence[tuple[int, ItemResult]] = (), reached: int | None = None) -> None:
        if not self.live:
            return
        now = time.time()
        for _index, result in finished:
            _stamp(result, self.capabilities, self.started, now)
        results = tuple((self.offset + index, result) for index, result in finished)
        where = None if reached is None else self.offset + reached
        notes = _take_notes()
        try:
            self.conn.send(Heartbeat(self.task_id, results, where, notes))
        except (EOFError, OSError):
            return  # the pool is gone; the worker ends at its next receive
        except Exception:  # noqa: BLE001 - an unpicklable result: it will travel in Done instead
            _send_quietly(self.conn, Heartbeat(self.task_id, (), where, notes))
            return
        self.sent.update(finished)

    def shifted(self, offset: int) -> _Beat:
        """The heartbeat for item ``offset`` of this task run on its own."""
        return _Beat(self.conn, self.task_id, self.capabilities, self.live, self.offset + offset)


class _TileBeat(_Beat):
    """The heartbeat of a batch of tiles: restarts the watchdog's clock and keeps what the engine
    reported (so a failing batch reruns only the tiles not reported), but sends no results: a
    tile's result is not an image's. The tiles reported go to ``arrived`` (index in the batch,
    result) at once, so the image's merge goes on while the engine runs the next sub-batch."""

    def __init__(
        self,
        conn: Connection,
        task_id: int,
        capabilities: Capabilities,
        offset: int = 0,
        arrived: Arrived | None = None,
    ) -> None:
        super().__init__(conn, task_id, capabilities, True, offset)
        self.arrived = arrived

    def __call__(self, finished: Sequence[tuple[int, ItemResult]] = (), reached: int | None = None) -> None:
        now = time.time()
        for _index, result in finished:
            _stamp(result, self.capabilities, self.started, now)
        self.sent.update(finished)
        if finished and self.arrived is not None:
            try:
                self.arrived([(self.offset + index, result) for index, result in finished])
            except Exception as exc:  # noqa: BLE001 - the engine must not see it; the tiler adds them later
                message = f"finished tiles not handed on as they came: {exc!r}"
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        _send_quietly(self.conn, Heartbeat(self.task_id, (), None, _take_notes()))

    def shifted(self, offset: int) -> _TileBeat:
        return _TileBeat(self.conn, self.task_id, self.capabilities, self.offset + offset, self.arrived)


def _send_done(
    conn: Connection,
    task_id: int,
    items: Sequence[Item],
    results: list[ItemResult],
    capabilities: Capabilities,
) -> bool:
    notes = _take_notes()
    try:
        conn.send(Done(task_id, results, notes))
        return True
    except (EOFError, OSError):
        return False
    except Exception as exc:  # noqa: BLE001 - an unpicklable result must not kill the worker
        # Pickling happens before any byte is written, so the pipe is still clean here.
        failed = [failure_result(item, Status.ERROR, exc=exc, device=capabilities.device) for item in items]
        return _send_quietly(conn, Done(task_id, failed, notes))


#: Warnings and library messages of this worker (by any thread), each naming the image being
#: read, sent with its next Heartbeat or Done, so they reach the run log instead of a console
#: nobody reads at night, where a folder of odd TIFFs printed thousands of lines over the progress.
_NOTES: list[str] = []


def _collect_warnings() -> Callable[[], None]:
    """Keep shown warnings and library log records for the next message; returns what undoes it."""
    return capture_library_output(_NOTES.append)  # list.append is atomic: any thread


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
