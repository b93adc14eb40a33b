"""The one place a result becomes files: label maps, RLE, polygons and the ok ``ItemResult``.

Engines find instances (``contract.Segmentation``) and write nothing; the worker hands each item's
segmentation here, and the tiler its merged detections. A whole image gets its label map (a 16-bit
PNG, with world-file sidecars for a world-file image; a GeoTIFF on the source grid for an input
with its own georeference) and, with ``--vectors``, its polygons part file; a window gets RLE of
its own map and boxes in the whole image's frame, no file; a merged tiled image gets a tiled TIFF
(or GeoTIFF). Nodata pixels, and detections whose pixels all went to better ones, carry no
detection.

One rule decides whose failure a write is: an ``OSError`` while writing into the output folder
(read-only, disk full, path too long) is the run's (``FailureCategory.OUTPUT``: the run stops, the
image stays pending); anything else is the image's ``error``, a ``FileHeldError`` (a file another
program held past every retry) and a polygon that cannot be made included.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .. import imageio, rle
from ..config import RunConfig
from ..errors import OutputError
from ..records import FINAL_FAILURES, Detection, FailureCategory, Item, ItemResult, Status, failure_result
from ..tiles.labelmap import label_map_relpath, write_label_map
from .contract import Outcome, Segmentation

if TYPE_CHECKING:
    from ..geo.georef import Georef
    from ..tiles.merge import MergedDetection

__all__ = [
    "OutputWriter",
    "WritingBeat",
    "drop_nodata",
    "drop_unpainted",
    "mask_relpath",
    "save_label_map",
    "write_vectors",
]

T = TypeVar("T")


class OutputWriter:
    """Writes the outputs of one worker's items into ``config.output_dir`` (see the module)."""

    def __init__(self, config: RunConfig, device: str) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.device = device

    def result(self, item: Item, outcome: Outcome) -> ItemResult:
        """The item's result: a failure as the engine gave it, a segmentation written. An engine's
        own ``ok`` ItemResult is refused (the image fails): an ok row without the writer's files
        would be a row the folder contradicts."""
        if isinstance(outcome, ItemResult):
            if outcome.status in FINAL_FAILURES:
                return outcome
            message = (
                f"the engine returned a {outcome.status!s} ItemResult; an engine returns what it found "
                "(a Segmentation, which the worker writes) or a failure (records.failure_result)"
            )
            return failure_result(item, Status.ERROR, error_type="EngineContractError", message=message)
        if isinstance(outcome, Segmentation):
            return self.write(item, outcome)
        raise TypeError(f"engine returned a {type(outcome).__name__}, not a Segmentation or an ItemResult")

    def write(self, item: Item, seg: Segmentation) -> ItemResult:
        """One image's (or window's) outputs and its ok result, or its failure."""
        started = seg.started_at
        try:
            labels, detections = self._describe(item, seg)
        except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
            return self.failure(item, exc, started)
        height, width = labels.shape
        width, height = seg.size or (width, height)
        if item.window is not None:  # a tile: its detections go to the merge, no file
            return self._ok(item, width, height, detections, None, started, None)
        mask_rel = mask_relpath(item.path, seg.georef)
        try:
            target = imageio.safe_output_path(self.output_dir, mask_rel)
            save_label_map(target, labels, seg.georef)
            write_vectors(self.output_dir, item.path, labels, seg.georef, detections, self.config)
        except Exception as exc:  # noqa: BLE001 - the rule of the module docstring decides whose
            return self.failure(item, exc, started, self.output_dir / mask_rel)
        return self._ok(item, width, height, detections, mask_rel, started, seg.georef)

    def write_merged(
        self,
        item: Item,
        size: tuple[int, int],
        merged: Sequence[MergedDetection],
        detections: list[Detection],
        georef: Georef | None,
        started: float,
    ) -> ItemResult:
        """A tiled image's label map (a tiled TIFF on the source grid) from its merged detections,
        and its ok result; polygons (--vectors) are made from the map at the next export."""
        mask_rel = label_map_relpath(item.path, tiled=True)
        try:
            target = imageio.safe_output_path(self.output_dir, mask_rel)
            write_label_map(target, merged, size[0], size[1], georef=georef)
        except Exception as exc:  # noqa: BLE001 - the rule of the module docstring decides whose
            return self.failure(item, exc, started, self.output_dir / mask_rel)
        return self._ok(item, size[0], size[1], detections, mask_rel, started, georef)

    def failure(
        self, item: Item, exc: BaseException, started: float | None, writing: Path | None = None
    ) -> ItemResult:
        """The failure of ``item``: an OSError while ``writing`` its outputs (the label map's path)
        is the output folder's, anything else the image's."""
        category = FailureCategory.IMAGE
        if writing is not None and isinstance(exc, OSError):
            category = FailureCategory.OUTPUT
            exc = _output_error(exc, writing)
        return failure_result(
            item, Status.ERROR, exc=exc, category=category, device=self.device, started_at=started
        )

    def _describe(self, item: Item, seg: Segmentation) -> tuple[np.ndarray, list[Detection]]:
        """The label map to write and each detection (RLE, area, box in the whole image's frame)."""
        shrunk = np.zeros(len(seg.instances), bool)
        if seg.valid is not None:  # nodata pixels never carry a detection
            labels, instances, areas, shrunk = drop_nodata(seg.labels, seg.instances, seg.valid)
        else:  # nor does a detection whose pixels all went to better-scored ones
            counted = seg.areas
            if counted is None:
                counted = np.bincount(seg.labels.ravel(), minlength=len(seg.instances) + 1)[1:]
            labels, instances, areas = drop_unpainted(seg.labels, seg.instances, counted)
        left, top = (float(item.window[0]), float(item.window[1])) if item.window is not None else (0.0, 0.0)
        counts = rle.encode_labels(labels, n_labels=len(instances))
        needed = shrunk.any() or any(i.box is None for i in instances)
        found = _boxes(labels, len(instances)) if needed else []
        detections = []
        for k, inst in enumerate(instances, start=1):
            x0, y0, x1, y1 = inst.box if inst.box is not None else found[k]
            if shrunk[k - 1]:  # nodata took some of its pixels: its box stops where they stop
                x0, y0, x1, y1 = _within((x0, y0, x1, y1), found[k])
            box = (x0 + left, y0 + top, x1 + left, y1 + top)
            area = int(areas[k - 1])
            detections.append(Detection(inst.prompt, k, inst.score, box, area, counts[k], folded=inst.folded))
        return labels, detections

    def _ok(
        self,
        item: Item,
        width: int,
        height: int,
        detections: list[Detection],
        mask_rel: str | None,
        started: float | None,
        georef: Georef | None,
    ) -> ItemResult:
        return ItemResult(
            path=item.path,
            status=Status.OK,
            width=width,
            height=height,
            detections=detections,
            mask_path=mask_rel,
            started_at=started,
            finished_at=time.time(),
            worker_pid=os.getpid(),
            device=self.device,
            **georef_fields(georef),
        )


def _output_error(exc: OSError, target: Path) -> OutputError:
    """The OSError as the run's failure, naming the file; the OSError stays its cause."""
    error = OutputError(f"cannot write {target}: {exc.strerror or exc}")
    error.__cause__ = exc
    return error


def _boxes(labels: np.ndarray, n: int) -> list[tuple[float, float, float, float]]:
    """The box (pixel edges) of every label 1..n at index k (index 0 unused), for an engine that
    gave none: one pass over the map, not one per label."""
    ys, xs = np.nonzero(labels)
    ks = labels[ys, xs].astype(np.int64)
    lo_x, lo_y = np.full(n + 1, labels.shape[1]), np.full(n + 1, labels.shape[0])
    hi_x, hi_y = np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
    np.minimum.at(lo_x, ks, xs)
    np.minimum.at(lo_y, ks, ys)
    np.maximum.at(hi_x, ks, xs + 1)
    np.maximum.at(hi_y, ks, ys + 1)
    edges = np.stack([lo_x, lo_y, hi_x, hi_y], axis=1).astype(float)
    return [(x0, y0, x1, y1) for x0, y0, x1, y1 in edges.tolist()]


# ---- label maps --------------------------------------------------------------------------------


def drop_nodata(
    labels: np.ndarray, instances: Sequence[T], valid: np.ndarray
) -> tuple[np.ndarray, list[T], np.ndarray, np.ndarray]:
    """``labels`` with the pixels where ``valid`` is False (nodata, from ``valid_of`` or a tile's
    read) cleared, the instances that still have pixels (renumbered 1..N in their order), each
    one's pixel count, and whether it lost pixels to nodata: nodata never carries a detection."""
    before = np.bincount(labels.ravel(), minlength=len(instances) + 1)[1:]
    labels = np.where(valid, labels, 0).astype(labels.dtype)
    after = np.bincount(labels.ravel(), minlength=len(instances) + 1)[1:].astype(np.int64)
    kept = after > 0
    labels, instances, areas = drop_unpainted(labels, instances, after)
    return labels, instances, areas, (after < before)[kept]


def _within(
    box: tuple[float, float, float, float], extent: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """``box`` cut to ``extent`` (the pixels a detection kept); the extent where they do not meet."""
    x0, y0 = max(box[0], extent[0]), max(box[1], extent[1])
    x1, y1 = min(box[2], extent[2]), min(box[3], extent[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else extent


def drop_unpainted(
    labels: np.ndarray, instances: Sequence[T], areas: np.ndarray
) -> tuple[np.ndarray, list[T], np.ndarray]:
    """The instances with at least one pixel in ``labels`` (``areas[k - 1]`` pixels of label k),
    renumbered 1..N in their order, and the map renumbered to match: a detection whose pixels all
    went to better ones is no detection (as in a tiled image's merge). The map is only rewritten
    when some instance has no pixel."""
    kept = np.flatnonzero(areas > 0) + 1
    if kept.size == len(instances):
        return labels, list(instances), areas
    lookup = np.zeros(len(instances) + 1, labels.dtype)
    lookup[kept] = np.arange(1, kept.size + 1)
    return lookup[labels], [instances[k - 1] for k in kept.tolist()], areas[kept - 1]


def mask_relpath(rel: str, georef: Georef | None) -> str:
    """``masks/<rel>.tif`` (a cloud-optimized GeoTIFF) for a georeferenced input, its own keys or a
    world file, else ``masks/<rel>.png``."""
    if georef is not None:
        return f"masks/{rel}.tif"
    return imageio.mask_relpath(rel)


def save_label_map(target: str | os.PathLike[str], labels: np.ndarray, georef: Georef | None) -> None:
    """The label map at ``target`` (from ``mask_relpath``): a COG GeoTIFF on the source grid, or the
    plain 16-bit PNG (given a ``georef``, a PNG gets world file, ``.prj`` and ``.aux.xml``)."""
    if georef is not None and os.fspath(target).endswith(".tif"):
        from ..geo.raster import write_label_geotiff

        write_label_geotiff(target, georef, labels)
        return
    imageio.save_label_map(target, labels)
    if georef is not None:
        from ..geo.raster import write_png_sidecars

        write_png_sidecars(target, georef)


# ---- polygons ----------------------------------------------------------------------------------


def write_vectors(
    output_dir: Path,
    rel: str,
    labels: np.ndarray | str | os.PathLike[str],
    georef: Georef | None,
    detections: Sequence[Detection],
    config: RunConfig,
    tiles: Sequence[int] | None = None,
) -> str | None:
    """With ``--vectors``: one polygon per detection of this image to its part file (written every
    time, empty too, so a redone image never keeps stale polygons); returns its path or None.
    ``labels``: the label map in memory or its file; ``tiles``: per detection, tiles it was seen in."""
    if not config.vectors:
        return None
    from ..geo.vectors import DetectionInfo, image_polygons, write_polygons

    infos = [
        DetectionInfo(d.index, d.prompt, float(d.score), tiles[i] if tiles else 1, d.box, d.area_px)
        for i, d in enumerate(detections)
    ]
    source: Any = labels if isinstance(labels, np.ndarray) else Path(labels)
    rows = image_polygons(
        rel, source, georef, infos, run_id="", model=config.model, simplify=config.simplify
    )  # run id and model are set when the parts are combined
    part = imageio.polygons_relpath(rel)
    write_polygons(imageio.safe_output_path(output_dir, part), rows)
    return part


# ---- the engine's heartbeat ------------------------------------------------------------------


class WritingBeat:
    """The heartbeat ``Engine.process`` gets from the worker: each outcome reported is written
    (once) before ``beat`` sends its result; ``write(item, segmentation)`` writes one now, in the
    caller's thread (an engine's I/O threads, beside its model), and returns its result."""

    def __init__(self, writer: OutputWriter, items: Sequence[Item], beat: Any) -> None:
        self.writer, self.items, self.beat = writer, items, beat
        self.done: dict[int, tuple[Outcome, ItemResult]] = {}  # by index: the outcome and its result
        self.made: dict[int, ItemResult] = {}  # results ``write`` made, by id: passed back as outcomes

    def __call__(self, finished: Sequence[tuple[int, Outcome]] = (), reached: int | None = None) -> None:
        self.beat([(k, self.result(k, outcome)) for k, outcome in finished], reached)

    def write(self, item: Item, seg: Segmentation) -> ItemResult:
        result = self.writer.write(item, seg)
        self.made[id(result)] = result  # kept, so the id names this result until the task ends
        return result

    def results(self, outcomes: Sequence[Outcome]) -> list[ItemResult]:
        """What ``Engine.process`` returned, one outcome per item, as results (written once)."""
        return [self.result(k, outcome) for k, outcome in enumerate(outcomes)]

    def result(self, index: int, outcome: Outcome) -> ItemResult:
        """The result of item ``index``: the same outcome reported again is not written again."""
        known = self.done.get(index)
        if known is not None and known[0] is outcome:
            return known[1]
        if isinstance(outcome, ItemResult) and self.made.get(id(outcome)) is outcome:
            result = outcome  # written by ``write`` already
        else:
            result = self.writer.result(self.items[index], outcome)
        self.done[index] = (outcome, result)
        return result


def georef_fields(georef: Georef | None) -> dict[str, Any]:
    """The georeference fields of an ItemResult; empty for an image without one."""
    if georef is None:
        return {}
    return {
        "crs_wkt": georef.crs_wkt,
        "crs_epsg": georef.epsg,
        "transform": json.dumps(list(georef.transform)),
        "georef_source": georef.source,
    }
