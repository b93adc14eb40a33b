"""The merged image's label map, written window by window.

A tiled image gets ``masks/<rel>.tif``: a tiled (512 x 512), DEFLATE-compressed TIFF with the
horizontal predictor, uint16 (uint32 past 65535 detections), BigTIFF when the uncompressed map
would pass 2 GiB. Each 512 x 512 block is painted from the detections' runs and handed to tifffile
as it is made, so memory grows with the detections, never with the image. An image processed whole
keeps ``masks/<rel>.png`` (16-bit PNG, ``imageio.save_label_map``). Both are written atomically.
tifffile lays out the file (IFDs, tile offsets, BigTIFF); the blocks are compressed here, so that
the many empty blocks of a label map are compressed once.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from .. import imageio, rle
from ..atomic import atomic_path
from .merge import MergedDetection
from .source import TiffSource

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

#: Side of the TIFF's internal tiles: GDAL's and QGIS's usual block size.
BLOCK = 512
#: Threads painting and compressing blocks (at most half the machine's cores, or two: other workers
#: may be running their engines meanwhile).
_WRITE_THREADS = 8
_BIGTIFF_FROM = 2**31


def label_dtype(n_labels: int) -> type[np.unsignedinteger]:
    """uint16 up to 65535 detections, uint32 beyond (up to 2**32 - 1)."""
    if n_labels > 2**32 - 1:
        raise ValueError(f"{n_labels} detections do not fit a uint32 label map")
    return np.uint16 if n_labels <= 65535 else np.uint32


def label_map_relpath(rel: str, tiled: bool) -> str:
    """``masks/<rel>.tif`` for a tiled image, ``masks/<rel>.png`` (as today) for a whole one."""
    return f"masks/{rel}.tif" if tiled else imageio.mask_relpath(rel)


class _Runs:
    """Every detection's visible runs, sorted column-major, with its label."""

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
    """Write the label map of merged ``detections`` to ``path`` (``.tif``: tiled TIFF; ``.png``:
    the whole-image PNG, which holds at most 65535 labels). With ``georef`` (a georeferenced
    input: ``GeoSource.georef``) a ``.tif`` is a GeoTIFF on the source grid, a ``.png`` gets
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

    empty = _encode_block(np.zeros((BLOCK, BLOCK), dtype))

    def block(x: int, y: int) -> bytes:
        out = np.zeros((BLOCK, BLOCK), dtype)  # edge blocks are padded, as TIFF tiles are
        return _encode_block(out) if runs.paint(out, x, y) else empty  # most blocks: compressed once

    corners = ((x, y) for y in range(0, height, BLOCK) for x in range(0, width, BLOCK))
    blocks = _in_order(block, corners)
    bigtiff = width * height * np.dtype(dtype).itemsize >= _BIGTIFF_FROM
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            blocks,
            shape=(height, width),
            dtype=dtype,
            tile=(BLOCK, BLOCK),
            byteorder="<",
            compression="zlib",
            predictor=True,
            bigtiff=bigtiff,
            photometric="minisblack",
            metadata=None,
        )
        _fsync(tmp)


def write_geo_label_map(
    path: str | os.PathLike[str], detections: Sequence[MergedDetection], georef: Georef
) -> None:
    """The label map of a georeferenced input: a GeoTIFF with its CRS and transform, painted block by
    block (``geo.raster``), or for ``.png`` the PNG plus world file, ``.prj`` and ``.aux.xml``."""
    from ..geo.raster import open_label_geotiff, write_png_sidecars

    if os.fspath(path).endswith(".png"):
        write_label_map(path, detections, georef.width, georef.height)
        write_png_sidecars(path, georef)
        return
    runs = _Runs(detections, georef.height)
    with open_label_geotiff(path, georef, len(detections)) as writer:
        for y in range(0, georef.height, BLOCK):
            for x in range(0, georef.width, BLOCK):
                block = np.zeros((min(BLOCK, georef.height - y), min(BLOCK, georef.width - x)), np.uint32)
                if runs.paint(block, x, y):
                    writer.write(x, y, block)


def _in_order(make: Callable[[int, int], bytes], corners: Iterator[tuple[int, int]]) -> Iterator[bytes]:
    """``make(x, y)`` for every block, in order, made by a few threads (numpy's sums and zlib let go
    of the GIL: a dense 20000 x 20000 map took 4 s in one thread), with a bounded number in flight
    so that memory stays a few blocks, whatever the map's size."""
    cores = os.cpu_count() or 1
    threads = min(_WRITE_THREADS, cores, max(2, cores // 2))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batchseg-labels") as pool:
        pending: deque[Future[bytes]] = deque()
        for x, y in corners:
            pending.append(pool.submit(make, x, y))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _encode_block(block: np.ndarray) -> bytes:
    """One TIFF tile as tifffile would store it, but faster: the horizontal predictor (differences
    along each row, modulo the type's range), then DEFLATE level 1 with the run-length strategy,
    which suits label maps (zeros and flat blobs) and costs about half of tifffile's level 6."""
    little = block.astype(block.dtype.newbyteorder("<"), copy=False)
    diff = np.empty_like(little)
    diff[:, 0] = little[:, 0]
    np.subtract(little[:, 1:], little[:, :-1], out=diff[:, 1:])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return deflate.compress(diff.data) + deflate.flush()  # the array's buffer: no copy to bytes


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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
