"""The merged image's label map, written window by window.

A tiled image gets ``masks/<rel>.tif``: a cloud-optimized GeoTIFF (``batchseg.cog``: 512 x 512 tiles,
DEFLATE with the horizontal predictor, nearest-neighbour overviews, IFDs before the data), uint16
(uint32 past 65535 detections), BigTIFF when the uncompressed map would pass 2 GiB; with a
georeference, its CRS and transform. Each block is painted from the detections' runs (sampled for
an overview) and compressed as it is made, so memory grows with the detections, never with the
image. An image processed whole keeps ``masks/<rel>.png`` (16-bit PNG, ``imageio.save_label_map``).
Both are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import imageio, rle
from ..cog import BLOCK, write_cog_atomically
from .merge import MergedDetection
from .windows import TiffSource

if TYPE_CHECKING:
    from ..geo.georef import Georef

__all__ = [
    "BLOCK",
    "label_dtype",
    "label_map_relpath",
    "read_label_window",
    "write_geo_label_map",
    "write_label_map",
]


def label_dtype(n_labels: int) -> type[np.unsignedinteger]:
    """uint16 up to 65535 detections, uint32 beyond (up to 2**32 - 1)."""
    if n_labels > 2**32 - 1:
        raise ValueError(f"{n_labels} detections do not fit a uint32 label map")
    return np.uint16 if n_labels <= 65535 else np.uint32


def label_map_relpath(rel: str, tiled: bool) -> str:
    """``masks/<rel>.tif`` for a tiled image, ``masks/<rel>.png`` (as today) for a whole one."""
    return f"masks/{rel}.tif" if tiled else imageio.mask_relpath(rel)


class _Runs:
    """Every detection's visible runs (each within one column), sorted column-major, with its label;
    a ``cog.Painter``."""

    def __init__(self, detections: Sequence[MergedDetection], height: int) -> None:
        self.height = height
        starts = [d.mask.starts for d in detections]
        ends = [d.mask.ends for d in detections]
        labels = [np.full(d.mask.starts.size, d.index, np.int64) for d in detections]
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        order = np.argsort(self.starts, kind="stable")
        self.starts = self.starts[order]
        self.ends = (np.concatenate(ends) if ends else np.zeros(0, np.int64))[order]
        self.labels = (np.concatenate(labels) if labels else np.zeros(0, np.int64))[order]

    def __call__(self, out: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> bool:
        """Paint the labels at source columns ``cols`` and rows ``rows`` (sorted) into ``out``."""
        if cols[-1] - cols[0] + 1 == cols.size and rows[-1] - rows[0] + 1 == rows.size:
            return self.paint(out, int(cols[0]), int(rows[0]))  # a window at full resolution
        lo = np.searchsorted(self.starts, cols * self.height)
        counts = np.searchsorted(self.starts, (cols + 1) * self.height) - lo
        total = int(counts.sum())
        if total == 0:
            return False
        column = np.repeat(np.arange(cols.size), counts)  # each run's column of ``out``
        run = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
        base = cols[column] * self.height
        first = np.searchsorted(rows, self.starts[run] - base)  # the sampled rows inside each run
        stop = np.searchsorted(rows, self.ends[run] - base)
        keep = stop > first
        rle.paint_runs(out, column[keep], first[keep], stop[keep], self.labels[run][keep])
        return bool(keep.any())

    def paint(self, out: np.ndarray, x0: int, y0: int) -> bool:
        """Paint the runs falling inside the window at (x0, y0) of ``out``'s size; False if none."""
        h, w = out.shape
        lo, hi = np.searchsorted(self.starts, [x0 * self.height, (x0 + w) * self.height])
        col = self.starts[lo:hi] // self.height
        row0 = self.starts[lo:hi] - col * self.height
        row1 = self.ends[lo:hi] - col * self.height
        keep = (row1 > y0) & (row0 < y0 + h)
        rle.paint_runs(
            out,
            col[keep] - x0,
            np.maximum(row0[keep], y0) - y0,
            np.minimum(row1[keep], y0 + h) - y0,
            self.labels[lo:hi][keep],
        )
        return bool(keep.any())


def write_label_map(
    path: str | os.PathLike[str],
    detections: Sequence[MergedDetection],
    width: int,
    height: int,
    georef: Georef | None = None,
) -> None:
    """Write the label map of merged ``detections`` to ``path`` (``.tif``: a COG; ``.png``: the
    whole-image PNG, which holds at most 65535 labels). With ``georef`` (a georeferenced input:
    ``GeoSource.georef``) a ``.tif`` is a COG GeoTIFF on the source grid, a ``.png`` gets
    world-file sidecars."""
    if georef is not None:
        write_geo_label_map(path, detections, georef)
        return
    runs = _Runs(detections, height)
    dtype = label_dtype(len(detections))
    if os.fspath(path).endswith(".png"):
        if dtype != np.uint16:
            raise ValueError("a PNG label map holds at most 65535 detections; write a .tif")
        labels = np.zeros((height, width), np.uint16)
        runs.paint(labels, 0, 0)
        imageio.save_label_map(path, labels)
        return
    write_cog_atomically(path, width, height, dtype, runs)


def write_geo_label_map(
    path: str | os.PathLike[str], detections: Sequence[MergedDetection], georef: Georef
) -> None:
    """The label map of a georeferenced input: a COG GeoTIFF with its CRS and transform, painted
    block by block, or for ``.png`` the PNG plus world file, ``.prj`` and ``.aux.xml``."""
    from ..geo.raster import geotiff_tags, write_png_sidecars

    if os.fspath(path).endswith(".png"):
        write_label_map(path, detections, georef.width, georef.height)
        write_png_sidecars(path, georef)
        return
    runs = _Runs(detections, georef.height)
    dtype = label_dtype(len(detections))
    write_cog_atomically(path, georef.width, georef.height, dtype, runs, geotiff_tags(georef))


def read_label_window(path: str | os.PathLike[str], window: tuple[int, int, int, int]) -> np.ndarray:
    """The labels inside ``window`` (x0, y0, x1, y1) of a label map written by ``write_label_map``."""
    if os.fspath(path).endswith(".png"):
        x0, y0, x1, y1 = window
        return imageio.read_label_map(path)[y0:y1, x0:x1]
    source = TiffSource(path)
    try:
        return source.read_samples(window)[..., 0]
    finally:
        source.close()
