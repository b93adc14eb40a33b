"""Tiling inside the worker: a large image runs as windowed items, merged into one result.

For each whole-image item the worker asks ``Tiler.plan``: the upright size comes from the header
(no pixel decoded) and ``--tile`` decides. A tiled image's tiles go to the engine as ``Item``s with
a ``window``, a batch of the engine's task size at a time (the caller restarts the watchdog's clock
after each batch); ``tiles.TileMerger``, in a helper process fed as the engine reports tiles
finished (``tiles.merge_process``; for an image spread over several workers, the helper follows
the image's kept tiles on disk), makes one detection per object, and the worker's
``writer.OutputWriter`` writes the label map as a tiled TIFF and makes the image's one
``ItemResult``, as for a whole image. A task's consecutive tiled images run as one stream of tiles
(``tile_stream.TileStream``), so the engine does not empty its pipeline at each image's edge. A
failing tile fails its image, naming the tile and its window. Torch-free: this runs in the worker,
above any engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__, imageio
from ..config import RunConfig
from ..errors import BadValueError, ConfigError, InvalidImageError
from ..geo.detect import looks_georeferenced
from ..records import Item, ItemResult, Split, Status, failure_result
from ..tiles import merge_process
from ..tiles.grid import (
    MIN_SIDE,
    TilePlan,
    TileSetting,
    parse_overlap,
    parse_tile,
    plan_tiles,
    strip_refusal,
)
from ..tiles.merge import MergeRules
from ..tiles.progress import PROGRESS_DIR, TileProgress
from ..tiles.windows import CONVERT_HINT, upright_size
from .contract import Capabilities
from .tile_stream import Arrived, Handover, RunTiles, TileStream
from .writer import OutputWriter

if TYPE_CHECKING:
    from ..geo.georef import Georef

#: The input side --gsd scales from when the engine states none (SAM3's).
GSD_MODEL_INPUT = 1008

__all__ = ["Arrived", "RunTiles", "Tiler"]


@dataclass(frozen=True)
class Tiler:
    """The run's tiling settings and the engine's model input: which images to tile, and how."""

    setting: TileSetting
    overlap: int  # for tiles of the configured side; a short image's smaller tiles clamp it
    rules: MergeRules  # --tile-match, and --suppress-iou folding across tiles too
    model_input: int | None
    batch: int
    input_root: Path
    output_dir: Path
    max_pixels: int
    max_tiled_pixels: int
    device: str
    fingerprint: str  # of the run's configuration: finished tiles kept on disk are for it only
    writer: OutputWriter  # writes the merged image's label map and makes its result
    gsd: float | None = None  # metres per pixel the model should see on georeferenced inputs
    #: What ``_kept_ids`` read of an image's kept tiles, for its next tile (this process only).
    kept_files: dict[tuple[str, str], dict[str, tuple[tuple[int, int], frozenset[str]]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def for_run(cls, config: RunConfig, capabilities: Capabilities) -> Tiler | None:
        """None when nothing is ever tiled (``--tile off``, or ``auto`` for an engine without a
        model input). The options' own checks are ``check_options``'s (run in the parent first);
        left here: the overlap under ``auto``, whose tile is the engine's input, a ConfigError."""
        setting = cls.check_options(config)
        if setting.mode == "off" or (setting.mode == "auto" and not (capabilities.model_input or config.gsd)):
            return None
        side = setting.side or capabilities.model_input or GSD_MODEL_INPUT
        try:
            overlap = parse_overlap(config.tile_overlap, side)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            setting,
            overlap,
            MergeRules(config.tile_match, config.suppress_iou),
            capabilities.model_input,
            max(1, capabilities.task_size),
            Path(config.input),
            Path(config.output_dir),
            config.max_pixels,
            config.max_tiled_pixels,
            capabilities.device,
            config.fingerprint(),
            OutputWriter(config, capabilities.device),
            config.gsd,
        )

    @staticmethod
    def check_options(config: RunConfig) -> TileSetting:
        """The tiling options' checks that need no engine, which the parent runs before anything
        is written (BadValueError, exit 2): ``--gsd`` without tiles, a match of 0, and an overlap
        of more than half a tile given with ``--tile N``. (Under ``auto`` the tile is the engine's
        input size, known only once it is loaded: ``for_run`` checks that overlap.)"""
        try:
            setting = parse_tile(config.tile or "auto")
        except ValueError as exc:
            raise BadValueError(str(exc)) from None
        if setting.mode == "off" and config.gsd:
            raise BadValueError("--gsd resamples tiles: it needs tiling (--tile auto or N, not off)")
        if not config.tile_match > 0.0:
            raise BadValueError("--tile-match must be more than 0: at 0 every two detections would be one")
        if setting.side is not None:
            try:
                parse_overlap(config.tile_overlap, setting.side)
            except ValueError as exc:
                raise BadValueError(str(exc)) from None
        return setting

    def plan(self, item: Item) -> TilePlan | ItemResult | None:
        """The tiles of a whole-image item, None to run it whole (a window, a small image, or a
        header that cannot be read: the engine then reports the image), or an ``invalid_input``
        result for an image too big for how it can be read. Never raises: a worker must not die
        on a file it merely looked at."""
        try:
            return self._plan(item)
        except Exception:  # noqa: BLE001 - whatever went wrong, the engine's read says it per image
            return None

    def _plan(self, item: Item) -> TilePlan | ItemResult | None:
        if item.window is not None:
            return None
        try:
            width, height, windowed = upright_size(self.input_root / item.path)
        except (InvalidImageError, OSError):
            return None
        try:
            gsd_side = self._gsd_side(item)
        except InvalidImageError:
            return None  # a broken georeference: the engine's read reports it
        if gsd_side:
            side: int | None = gsd_side
        elif self.setting.mode == "auto" and not self.model_input:
            side = None  # --gsd made a tiler for an engine without an input size: plain images run whole
        else:
            side = self.setting.side_for(width, height, self.model_input or 0)
        if side is None or max(width, height) <= side:
            return None  # small, or one --gsd tile covers it: the engine resizes it as it would a tile
        strip = strip_refusal(width, height, side, self.overlap)
        if strip is not None:  # a thin strip would be thousands of slivers: refused, saying what to do
            return failure_result(
                item, Status.INVALID_INPUT, error_type="InvalidImageError", message=strip, device=self.device
            )
        pixels = width * height
        limit, flag = (
            (self.max_tiled_pixels, "--max-tiled-pixels") if windowed else (self.max_pixels, "--max-pixels")
        )
        if pixels > limit:
            how = "images read by window" if windowed else "a format that must be decoded whole"
            hint = "" if windowed else f"; {CONVERT_HINT}"
            message = (
                f"The image is {width} x {height} = {pixels:,} pixels, more than the limit of {limit:,} "
                f"for {how} ({flag}){hint}."
            )
            return failure_result(
                item,
                Status.INVALID_INPUT,
                error_type="InvalidImageError",
                message=message,
                device=self.device,
            )
        # A strip shorter than the tile gets tiles of its short side: the overlap shrinks with them.
        return plan_tiles(width, height, side, min(self.overlap, min(side, width, height) // 2))

    def _gsd_side(self, item: Item) -> int | None:
        """With --gsd, the tile side in source pixels that the model input covers at that ground
        resolution (for a georeferenced input); None otherwise."""
        if not self.gsd:
            return None
        georef = _georef(self.input_root / item.path)
        pixel = None if georef is None else _ground_pixel_size(georef)
        if not pixel:
            return None
        return max(MIN_SIDE, round((self.model_input or GSD_MODEL_INPUT) * self.gsd / pixel))

    def run(self, item: Item, plan: TilePlan, run_tiles: RunTiles) -> ItemResult:
        """Every tile of ``item`` through the engine (those not kept on disk already), merged into
        the image's one result. A task's consecutive tiled images run as one ``TileStream``."""
        return TileStream(self, [(item, plan)], run_tiles).run()[0]

    def georef_of(self, item: Item) -> Georef | None:
        """The input's georeference, None for a plain image (looked for without the geo extra)."""
        return _georef(self.input_root / item.path)

    def split(self, item: Item, plan: TilePlan) -> ItemResult | None:
        """The answer for an image planned as tiles when the pool spreads them: the tiles not yet
        on disk, for the pool to hand out; None when all are (the caller merges them at once)."""
        found = self.progress(item, plan).load()
        todo = tuple((t.id, t.window) for t in plan.tiles if t.id not in found)
        if not todo:
            return None
        geometry = (plan.width, plan.height, plan.side, plan.overlap)
        return ItemResult(
            path=item.path,
            status=Status.OK,
            width=plan.width,
            height=plan.height,
            device=self.device,
            split=Split(geometry, todo, "tile"),
        )

    def run_tile_items(self, items: Sequence[Item], run_tiles: RunTiles) -> list[ItemResult]:
        """Tiles of one image that the pool spread: through the engine, the finished ones kept on
        disk for the image's merge; each answered without its detections (they stay on disk)."""
        first = items[0]
        assert first.part is not None
        plan = plan_tiles(*first.part.plan)
        progress = self.progress(first, plan)
        ids = [item.part.key for item in items if item.part is not None and item.part.key is not None]
        assert len(ids) == len(items), "the pool sends tiles here, each with its id"
        if len(items) == 1 and ids[0] in self._kept_ids(progress):
            # A tile that may have run before comes alone: a retry, or one of the tiles of a task
            # whose worker died or was stopped (the pool heard of none of its tiles, so it runs
            # them again one at a time). Kept on disk, it is done: running it again costs its time.
            return [
                ItemResult(first.path, Status.OK, width=plan.width, height=plan.height, device=self.device)
            ]
        # This worker may take the image's merge: its helper merges the kept tiles (every worker's)
        # as they land, so that little is left when the last one is in.
        helper = merge_process.shared()

        def follow() -> None:
            helper.follow(progress, plan, self.rules)

        follow()
        handover = Handover(progress, {}, None, kept=follow)  # the merge is another task's
        results = run_tiles([replace(item, part=None) for item in items], handover.arrived_of(ids))
        handover.take({i: r.detections for i, r in zip(ids, results, strict=True) if r.status is Status.OK})
        handover.keep()
        return [replace(r, detections=[]) if r.status is Status.OK else r for r in results]

    def _kept_ids(self, progress: TileProgress) -> set[str]:
        """The tiles kept for ``progress``'s image; what was read is remembered for the next tile of
        that image (only one image's: the tiles that come back alone are those of one task)."""
        where = (str(progress.folder), json.dumps(progress.key, sort_keys=True))
        for other in [w for w in self.kept_files if w != where]:
            del self.kept_files[other]
        return progress.kept_ids(self.kept_files.setdefault(where, {}))

    def progress(self, item: Item, plan: TilePlan) -> TileProgress:
        """Where the finished tiles of ``item`` are kept, for this input, configuration and plan."""
        key = {
            "path": item.path,
            "size_bytes": item.size_bytes,
            "mtime_ns": item.mtime_ns,
            "content_hash": item.content_hash,
            "fingerprint": self.fingerprint,
            "batchseg": __version__,  # another version may find other detections
            "plan": [plan.width, plan.height, plan.side, plan.overlap],
        }
        folder = imageio.safe_output_path(self.output_dir, f"{PROGRESS_DIR}/{item.path}")
        return TileProgress(folder, key)


def _georef(path: Path) -> Georef | None:
    """The input's georeference, None for a plain image (looked for without the geo extra)."""
    from ..remote import localize

    readable = localize(path)  # an object in S3: its /vsis3/ path or the worker's local copy
    if not looks_georeferenced(readable):
        return None
    from ..geo.georef import read_georef  # the extra: the parent checked it is installed

    return read_georef(readable)


def _ground_pixel_size(georef: Georef) -> float | None:
    from ..geo.georef import ground_pixel_size

    return ground_pixel_size(georef)
