"""Tiled images as one stream of tiles, so the engine's pipeline carries on from image to image.

A task's consecutive tiled images run as one sequence of tiles, cut into batches of the engine's
task size whatever image each tile belongs to. The engine then reads and runs the next image's
first tiles while the last ones of the image before are still decoded, instead of emptying its
pipeline at every image's edge (a 6000x4000 photograph is only 40 tiles: a few sub-batches).

Each image is finished (merged, its label map written, its result told through ``finished``) as
soon as its last tile is in: from the engine's heartbeat, while the device runs the tiles queued
behind it. Merges take the worker's one merge helper an image at a time, in stream order; the tiles
of the images behind wait in their ``Handover`` (kept on disk as usual) until their image's merge
begins. A failing tile fails its image alone: the image's tiles not yet run are dropped, and the
other images go on. Torch-free: this runs in the worker, above any engine.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from ..errors import InvalidImageError
from ..logs import about_image
from ..records import Detection, Item, ItemResult, Status, failure_result, part_failure
from ..tiles import merge_process
from ..tiles.grid import Tile, TilePlan
from ..tiles.merge_process import RemoteMerge
from ..tiles.progress import TileProgress

if TYPE_CHECKING:
    from pathlib import Path

    from ..geo.georef import Georef
    from ..tiles.merge import MergeRules
    from .writer import OutputWriter

__all__ = ["KEEP_EVERY_S", "Arrived", "Handover", "RunTiles", "TileStream"]

#: ``arrived(finished)``: tiles of a batch that the engine reported finished, as (index in the
#: batch, result), told while the batch still runs.
Arrived = Callable[[Sequence[tuple[int, ItemResult]]], None]

#: Finished tiles are written to disk (for a resume) at most this often while a batch runs, and at
#: its end: on a GPU a dense image's tiles then go to disk beside the engine, in a few files.
KEEP_EVERY_S = 1.0


class RunTiles(Protocol):
    """The engine on one batch of windowed items, one result each; ``arrived`` hears of the tiles
    as the engine reports them (its heartbeats), before the batch ends."""

    def __call__(self, items: Sequence[Item], arrived: Arrived | None = None) -> list[ItemResult]: ...


class Tiler(Protocol):
    """What a stream needs of the run's ``tiling.Tiler`` (a frozen dataclass: read-only fields)."""

    @property
    def rules(self) -> MergeRules: ...
    @property
    def batch(self) -> int: ...
    @property
    def input_root(self) -> Path: ...
    @property
    def device(self) -> str: ...
    @property
    def writer(self) -> OutputWriter: ...

    def progress(self, item: Item, plan: TilePlan) -> TileProgress: ...

    def georef_of(self, item: Item) -> Georef | None: ...


@dataclass(eq=False)
class _Image:
    """One image of the stream: its tiles, where they are kept, and how it ended."""

    position: int  # in the stream
    item: Item
    plan: TilePlan
    handover: Handover
    started: float = field(default_factory=time.time)
    failed: tuple[Tile, ItemResult] | None = None  # its first failing tile
    result: ItemResult | None = None

    @property
    def complete(self) -> bool:
        return len(self.handover.taken) >= len(self.plan.tiles)


class TileStream:
    """The tiles of ``images`` through ``run_tiles``; ``run`` gives one result per image, in order.

    ``finished(position, result)`` hears of each image's result as soon as it is made;
    ``touched(position)`` is told, before a batch goes to the engine, the last image it has tiles
    of; ``prefetch(item)`` hears of the image whose tiles come next once the engine has reported a
    tile of the one before (so it is open, and its own prefetch used)."""

    def __init__(
        self,
        tiler: Tiler,
        images: Sequence[tuple[Item, TilePlan]],
        run_tiles: RunTiles,
        *,
        finished: Callable[[int, ItemResult], None] | None = None,
        touched: Callable[[int], None] | None = None,
        prefetch: Callable[[Item], None] | None = None,
    ) -> None:
        self.tiler, self.run_tiles = tiler, run_tiles
        self.finished, self.touched, self.prefetch = finished, touched, prefetch
        self.images = [self._image(k, item, plan) for k, (item, plan) in enumerate(images)]
        self.current = 0  # the image whose merge runs (the ones before it are finished)
        self.merging: RemoteMerge | None = None
        self.hinted: set[int] = set()  # the images ``prefetch`` was told of

    def _image(self, position: int, item: Item, plan: TilePlan) -> _Image:
        progress = self.tiler.progress(item, plan)
        found = progress.load()  # tiles finished before a kill, a crash or a failing tile
        return _Image(position, item, plan, Handover(progress, found, len(plan.tiles)))

    def run(self) -> list[ItemResult]:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - the worker never raises: each image left fails
            for image in self.images:
                if image.result is None:
                    image.result = failure_result(image.item, Status.ERROR, exc=exc, device=self.tiler.device)
                    self._tell(image)
        finally:
            if self.merging is not None:
                self.merging.close()
        return [image.result for image in self.images if image.result is not None]

    def _run(self) -> None:
        self._read_ahead(0)
        self._begin()
        todo = [(image, tile) for image in self.images for tile in image.plan.tiles]
        todo = [(image, tile) for image, tile in todo if tile.id not in image.handover.taken]
        while todo:
            batch, todo = todo[: self.tiler.batch], todo[self.tiler.batch :]
            if self.touched is not None:
                self.touched(batch[-1][0].position)
            items = [replace(image.item, window=tile.window) for image, tile in batch]
            results = self.run_tiles(items, self._arrived_of(batch))
            self._take(batch, list(enumerate(results)))
            for image in {image for image, _ in batch}:
                image.handover.keep()
            self._advance()
            todo = [(image, tile) for image, tile in todo if image.failed is None]  # a failed image's rest
        for image in self.images[self.current :]:  # only if the engine's results missed some tiles
            self._finish(image)

    def _arrived_of(self, batch: Sequence[tuple[_Image, Tile]]) -> Arrived:
        def arrived(done: Sequence[tuple[int, ItemResult]]) -> None:
            self._arrived(batch, done)

        return arrived

    def _arrived(self, batch: Sequence[tuple[_Image, Tile]], done: Sequence[tuple[int, ItemResult]]) -> None:
        """Tiles the engine reported while the batch runs: taken, kept now and then, and each
        image whose last tile this was finished at once."""
        self._take(batch, done)
        for image in {batch[i][0] for i, _ in done}:
            if time.monotonic() - image.handover.kept_at >= KEEP_EVERY_S:
                image.handover.keep()
        self._advance()

    def _take(self, batch: Sequence[tuple[_Image, Tile]], done: Sequence[tuple[int, ItemResult]]) -> None:
        by_image: dict[_Image, dict[str, list[Detection]]] = {}
        for i, result in done:
            image, tile = batch[i]
            if result.status is Status.OK:
                by_image.setdefault(image, {})[tile.id] = result.detections
            elif image.failed is None:  # the image fails; its finished tiles stay kept for the next attempt
                image.failed = (tile, result)
        for image, tiles in by_image.items():
            image.handover.take(tiles)
        for index in sorted({batch[i][0].position for i, _ in done}):
            self._read_ahead(index)

    def _read_ahead(self, index: int) -> None:
        """Image ``index`` is open (a tile of it came back, or it is the first): the image after it
        is opened ahead, once; an earlier hint would drop one opened ahead and not yet read."""
        if self.prefetch is not None and index + 1 < len(self.images) and index + 1 not in self.hinted:
            self.hinted.add(index + 1)
            self.prefetch(self.images[index + 1].item)

    def _begin(self) -> None:
        """The current image's merge begins (with its tiles in so far); an image whose tiles are
        all in already (kept on disk), or that failed, is finished at once and the next begins."""
        while self.current < len(self.images):
            image = self.images[self.current]
            image.started = time.time()  # its share of the stream's time starts when the one before ends
            if image.failed is None:
                helper = merge_process.shared()
                self.merging = helper.begin(image.plan, self.tiler.rules, image.handover.progress)
                image.handover.attach(self.merging)
            if not (image.failed or image.complete):
                return
            self._finish(image)
            self.current += 1

    def _advance(self) -> None:
        """Finish the current image if its tiles are all in (or one failed), and the next ones too."""
        if self.current < len(self.images):
            image = self.images[self.current]
            if image.failed or image.complete:
                self._finish(image)
                self.current += 1
                self._begin()

    def _finish(self, image: _Image) -> None:
        """The image's result, made once and told; never raises (the stream goes on)."""
        if image.result is not None:
            return
        merging, self.merging = self.merging, None
        try:
            with about_image(self.tiler.input_root / image.item.path):  # what libraries say names it
                image.result = self._result(image, merging)
        except Exception as exc:  # noqa: BLE001 - the image's error; the stream goes on
            image.result = failure_result(image.item, Status.ERROR, exc=exc, device=self.tiler.device)
        finally:
            image.handover.merging = None  # tiles of a failed image still coming are kept, not merged
            if merging is not None:
                merging.close()
        self._tell(image)

    def _tell(self, image: _Image) -> None:
        if self.finished is not None and image.result is not None:
            self.finished(image.position, image.result)

    def _result(self, image: _Image, merging: RemoteMerge | None) -> ItemResult:
        item, plan, progress, started = image.item, image.plan, image.handover.progress, image.started
        device = self.tiler.device
        if image.failed is not None:
            tile, result = image.failed
            return part_failure(item, "tile", tile.id, tile.window, result, started)
        if merging is None or not image.complete:
            missing = len(plan.tiles) - len(image.handover.taken)
            raise RuntimeError(f"{missing} of the image's {len(plan.tiles)} tiles came back without a result")
        try:
            georef = self.tiler.georef_of(item)  # the label map lands on the source grid
        except InvalidImageError as exc:
            return failure_result(item, Status.INVALID_INPUT, exc=exc, device=device, started_at=started)
        try:
            merged, rles = merging.result()
            detections = [
                Detection(m.prompt, m.index, m.score, m.box, m.area_px, rle, m.tiles, folded=m.folded)
                for m, rle in zip(merged, rles, strict=True)
            ]
        except Exception as exc:  # noqa: BLE001 - a merge failure is this image's result
            # Its kept tiles go too: one of them may be what broke it (a damaged file), and
            # keeping them would fail the image the same way at every attempt.
            progress.clear()
            return failure_result(item, Status.ERROR, exc=exc, device=device, started_at=started)
        size = (plan.width, plan.height)
        result = self.tiler.writer.write_merged(item, size, merged, detections, georef, started)
        if result.status is Status.OK:
            progress.clear()
        return result


class Handover:
    """Finished tiles of one image on their way: to its merge once it is ``attach``ed (those taken
    before wait for it), and to disk for a resume, at most every ``KEEP_EVERY_S`` while a batch runs
    and at its end. Once ``total`` tiles are taken the image is complete and nothing more is kept:
    its merge ends at once (no ``total``: the image is merged by another task, everything is kept).
    Each tile is taken once; ``found`` are those kept on disk before, taken already."""

    def __init__(
        self,
        progress: TileProgress,
        found: dict[str, list[Detection]],
        total: int | None,
        kept: Callable[[], None] | None = None,
    ) -> None:
        self.progress, self.total = progress, total
        self.taken: set[str] = set(found)
        self.waiting: dict[str, list[Detection]] = dict(found)  # for the merge, not attached yet
        self.merging: RemoteMerge | None = None
        self.kept = kept  # told after each file written
        self.unkept: dict[str, list[Detection]] = {}
        self.kept_at = time.monotonic()

    def attach(self, merging: RemoteMerge) -> None:
        """The image's merge has begun: the tiles taken so far go to it, the next ones as they come."""
        waiting, self.waiting, self.merging = self.waiting, {}, merging
        merging.add(waiting)

    def arrived_of(self, batch: Sequence[str]) -> Arrived:
        """What hears of the finished tiles of ``batch`` (their ids) while the engine runs it."""

        def arrived(finished: Sequence[tuple[int, ItemResult]]) -> None:
            self.take({batch[i]: r.detections for i, r in finished if r.status is Status.OK})
            if time.monotonic() - self.kept_at >= KEEP_EVERY_S:
                self.keep()

        return arrived

    def take(self, done: dict[str, list[Detection]]) -> None:
        new = {tile_id: dets for tile_id, dets in done.items() if tile_id not in self.taken}
        if not new:
            return
        if self.merging is not None:
            self.merging.add(new)
        else:
            self.waiting.update(new)
        self.taken.update(new)
        self.unkept.update(new)

    def keep(self) -> None:
        """Write the tiles taken since the last keep, in a file named by the first of them (a tile
        is taken once, so no later file overwrites it); a folder that cannot be written only costs
        them on resume."""
        unkept, self.unkept, self.kept_at = self.unkept, {}, time.monotonic()
        if not unkept or (self.total is not None and len(self.taken) >= self.total):
            return
        try:
            self.progress.save(next(iter(unkept)), unkept)
        except OSError as exc:
            folder = self.progress.folder
            warnings.warn(f"finished tiles not kept in {folder}: {exc}", RuntimeWarning, stacklevel=2)
            return
        if self.kept is not None:
            self.kept()
