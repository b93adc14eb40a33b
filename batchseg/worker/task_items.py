"""A task's items through the engine, as the worker runs them: whole images in runs of consecutive
items (``run_task``), consecutive tiled images as one stream of tiles (``tile_stream.TileStream``),
tiles the pool spread (``Tiler.run_tile_items``), and the merge of an image whose tiles are all in.
The heartbeats (``Beat``, ``TileBeat``) carry finished results, how far the task has touched, and
the worker's warnings to the pool. Never raises; torch-free (the engine imports what it needs).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection

from ..logs import about_image, capture_library_output
from ..records import FINAL_FAILURES, FailureCategory, Item, ItemResult, Status, failure_result
from ..tiles.grid import TilePlan, plan_tiles
from .contract import Capabilities, Engine
from .messages import Heartbeat
from .tile_stream import Arrived, RunTiles, TileStream
from .tiling import Tiler
from .writer import OutputWriter, WritingBeat

__all__ = ["Beat", "TileBeat", "collect_warnings", "run_items", "run_task", "send_quietly", "take_notes"]


def run_items(
    engine: Engine,
    capabilities: Capabilities,
    items: Sequence[Item],
    heartbeat: Beat,
    tiler: Tiler | None,
    writer: OutputWriter,
    may_split: bool = False,
) -> list[ItemResult]:
    """Run a task's items; never raises. Whole images go in runs of consecutive items through
    ``run_task``; consecutive images the tiler plans as tiles run here as one stream of tiles
    (``TileStream``, each image's result sent as it is made) or, with ``may_split``, are answered
    with their tiles for the pool to spread (``Tiler.split``); tiles the pool sent run one image's
    at a time (``Tiler.run_tile_items``), and an image whose tiles are all in is merged
    (``Tiler.run`` again, finding them on disk)."""
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

    streamed: list[int] = []  # consecutive tiled images to run here, as one stream of tiles

    def flush_stream() -> None:
        if streamed:
            results.extend(_stream(tiler, engine, capabilities, items, plans, streamed, heartbeat, run_tiles))
            streamed.clear()

    for k, (item, plan) in enumerate(zip(items, plans, strict=True)):
        if item.part is not None and item.part.key is not None:  # a tile the pool sent
            flush_stream()
            if whole or (tiles and items[tiles[0]].path != item.path):
                flush()
            tiles.append(k)
            continue
        if plan is None and item.part is None:
            flush_stream()
            if tiles:
                flush()
            whole.append(k)
            continue
        flush()
        if isinstance(plan, TilePlan) and item.part is None:
            answer = _split(tiler, item, plan) if may_split else None
            if answer is None:  # run here (with may_split: every tile is in, it is merged at once)
                streamed.append(k)
                continue
        else:  # refused by its plan, or the merge of an image spread over the workers
            answer = None
        flush_stream()
        heartbeat((), k + 1)  # nothing past this image is touched yet
        started = time.time()
        if answer is None:
            answer = _tiled_image(tiler, item, plan, run_tiles)
        _stamp(answer, capabilities, started, time.time())
        results.append(answer)
        heartbeat([(k, answer)])
    flush_stream()
    flush()
    return results


def _plan(tiler: Tiler, item: Item) -> TilePlan | ItemResult | None:
    with about_image(tiler.input_root / item.path):  # a header a library finds odd names its image
        return tiler.plan(item)


def _tiled_image(
    tiler: Tiler, item: Item, plan: TilePlan | ItemResult | None, run_tiles: RunTiles
) -> ItemResult:
    """An image refused by its plan, or the merge of one the pool spread (every tile is in)."""
    if isinstance(plan, ItemResult):
        return plan
    assert item.part is not None
    try:
        with about_image(tiler.input_root / item.path):  # what libraries say names it
            return tiler.run(replace(item, part=None), plan_tiles(*item.part.plan), run_tiles)
    except Exception as exc:  # noqa: BLE001 - the worker never raises across the pipe
        return failure_result(item, Status.ERROR, exc=exc)


def _split(tiler: Tiler, item: Item, plan: TilePlan) -> ItemResult | None:
    """The image's tiles not yet on disk, for the pool to spread; None when all are in."""
    try:
        with about_image(tiler.input_root / item.path):
            return tiler.split(item, plan)
    except Exception as exc:  # noqa: BLE001 - the worker never raises across the pipe
        return failure_result(item, Status.ERROR, exc=exc)


def _stream(
    tiler: Tiler,
    engine: Engine,
    capabilities: Capabilities,
    items: Sequence[Item],
    plans: Sequence[TilePlan | ItemResult | None],
    positions: Sequence[int],
    heartbeat: Beat,
    run_tiles: RunTiles,
) -> list[ItemResult]:
    """The tiled images at ``positions`` of the task as one ``TileStream``: each image's result
    goes to the pool as soon as it is made, and the pool hears which images a batch of tiles
    touches before it runs."""
    heartbeat((), positions[0] + 1)  # nothing past the first image is touched yet

    def finished(index: int, result: ItemResult) -> None:
        _stamp(result, capabilities, result.started_at or time.time(), time.time())
        heartbeat([(positions[index], result)])

    def touched(index: int) -> None:
        heartbeat((), positions[index] + 1)

    images = []
    for k in positions:
        plan = plans[k]
        assert isinstance(plan, TilePlan), "only images planned as tiles are streamed"
        images.append((items[k], plan))
    stream = TileStream(
        tiler,
        images,
        run_tiles,
        finished=finished,
        touched=touched,
        prefetch=_prefetcher(engine),
    )
    return stream.run()


def _prefetcher(engine: Engine) -> Callable[[Item], None] | None:
    """What tells an engine that has ``prefetch`` (see ``Engine``) which image runs as tiles next."""
    prefetch = getattr(engine, "prefetch", None)
    if prefetch is None:
        return None

    def tell(item: Item) -> None:
        try:
            prefetch(item)
        except Exception as exc:  # noqa: BLE001 - a hint: the image is read when its tiles come anyway
            warnings.warn(f"prefetch of {item.path} failed: {exc!r}", RuntimeWarning, stacklevel=2)

    return tell


def _tile_runner(
    engine: Engine, capabilities: Capabilities, heartbeat: Beat, writer: OutputWriter
) -> RunTiles:
    def run_tiles(items: Sequence[Item], arrived: Arrived | None = None) -> list[ItemResult]:
        beat = TileBeat(heartbeat.conn, heartbeat.task_id, capabilities, arrived=arrived)
        done = run_task(engine, capabilities, items, beat, writer)
        beat()  # the watchdog's budget is per batch of tiles
        return done

    return run_tiles


def run_task(
    engine: Engine, capabilities: Capabilities, items: Sequence[Item], heartbeat: Beat, writer: OutputWriter
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
    engine: Engine, capabilities: Capabilities, items: Sequence[Item], heartbeat: Beat, writer: OutputWriter
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


class Beat:
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
        notes = take_notes()
        try:
            self.conn.send(Heartbeat(self.task_id, results, where, notes))
        except (EOFError, OSError):
            return  # the pool is gone; the worker ends at its next receive
        except Exception:  # noqa: BLE001 - an unpicklable result: it will travel in Done instead
            send_quietly(self.conn, Heartbeat(self.task_id, (), where, notes))
            return
        self.sent.update(finished)

    def shifted(self, offset: int) -> Beat:
        """The heartbeat for item ``offset`` of this task run on its own."""
        return Beat(self.conn, self.task_id, self.capabilities, self.live, self.offset + offset)


class TileBeat(Beat):
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
        send_quietly(self.conn, Heartbeat(self.task_id, (), None, take_notes()))

    def shifted(self, offset: int) -> TileBeat:
        return TileBeat(self.conn, self.task_id, self.capabilities, self.offset + offset, self.arrived)


#: Warnings and library messages of this worker (by any thread), each naming the image being
#: read, sent with its next Heartbeat or Done, so they reach the run log instead of a console
#: nobody reads at night, where a folder of odd TIFFs printed thousands of lines over the progress.
_NOTES: list[str] = []


def collect_warnings() -> Callable[[], None]:
    """Keep shown warnings and library log records for the next message; returns what undoes it."""
    return capture_library_output(_NOTES.append)  # list.append is atomic: any thread


def take_notes() -> tuple[str, ...]:
    count = len(_NOTES)  # only these: another thread may append meanwhile
    taken = tuple(_NOTES[:count])
    del _NOTES[:count]
    return taken


def send_quietly(conn: Connection, message: object) -> bool:
    try:
        conn.send(message)
        return True
    except (EOFError, OSError):
        return False
