"""Analytic shapes and a per-tile threshold engine for the tiling tests.

Each shape rasterises itself inside any window, so a tile's detections are made exactly as a
colour-threshold engine makes them (connected components of the drawn pixels inside the tile)
without ever holding the full canvas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchseg import rle
from batchseg.tiles.grid import Tile
from batchseg.tiles.sparse import SparseMask


@dataclass(frozen=True)
class Shape:
    """A disc, ellipse ring (``inner`` > 0: a hole) or rectangle, centre (cx, cy), radii (rx, ry)."""

    kind: str
    cx: float
    cy: float
    rx: float
    ry: float
    inner: float = 0.0  # ring: hole radius as a fraction of the outer radius

    def bbox(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (
            max(0, int(np.floor(self.cx - self.rx))),
            max(0, int(np.floor(self.cy - self.ry))),
            min(width, int(np.ceil(self.cx + self.rx)) + 1),
            min(height, int(np.ceil(self.cy + self.ry)) + 1),
        )

    def raster(self, window: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = window
        x = (np.arange(x0, x1) + 0.5 - self.cx) / self.rx
        y = (np.arange(y0, y1) + 0.5 - self.cy) / self.ry
        if self.kind == "rect":
            return (np.abs(y)[:, None] <= 1) & (np.abs(x)[None, :] <= 1)
        r2 = y[:, None] ** 2 + x[None, :] ** 2
        return (r2 <= 1) & (r2 >= self.inner**2)

    def sparse(self, width: int, height: int) -> SparseMask:
        x0, y0, x1, y1 = self.bbox(width, height)
        return SparseMask.from_rle(rle.encode(self.raster((x0, y0, x1, y1))), (x0, y0, x1, y1), height)


@dataclass(frozen=True)
class Found:
    prompt: str
    score: float
    mask_rle: str
    folded: tuple[str, ...] = ()  # prompts the tile's engine folded into it (--suppress-iou)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean array, by union of overlapping runs in adjacent columns."""
    col, row0, row1 = rle.column_runs(rle.encode(mask), *mask.shape)
    parent = np.arange(col.size)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    bounds = np.searchsorted(col, np.arange(mask.shape[1] + 1))
    for c in range(mask.shape[1] - 1):
        a = np.arange(bounds[c], bounds[c + 1])
        b = np.arange(bounds[c + 1], bounds[c + 2])
        if not a.size or not b.size:
            continue
        meet = (row0[a][:, None] < row1[b][None, :]) & (row0[b][None, :] < row1[a][:, None])
        for i, j in zip(*np.nonzero(meet), strict=True):
            ra, rb = find(int(a[i])), find(int(b[j]))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(col.size)], dtype=np.int64)
    out = []
    for root in np.unique(roots):
        piece = np.zeros(mask.shape, bool)
        sel = roots == root
        rle.paint_runs(piece, col[sel], row0[sel], row1[sel])
        out.append(piece)
    return out


def tile_detections(shapes: list[Shape], tile: Tile, width: int, height: int) -> list[Found]:
    """What the threshold engine returns for one tile: a detection per connected piece of each
    shape inside the window, its RLE over the window; score from the shape's position in the list."""
    found = []
    for k, shape in enumerate(shapes):
        sx0, sy0, sx1, sy1 = shape.bbox(width, height)
        x0, y0, x1, y1 = max(sx0, tile.x0), max(sy0, tile.y0), min(sx1, tile.x1), min(sy1, tile.y1)
        if x0 >= x1 or y0 >= y1:
            continue
        local = shape.raster((x0, y0, x1, y1))
        for piece in components(local):
            full = np.zeros((tile.y1 - tile.y0, tile.x1 - tile.x0), bool)
            full[y0 - tile.y0 : y1 - tile.y0, x0 - tile.x0 : x1 - tile.x0] = piece
            found.append(Found("shape", 0.99 - k * 1e-3, rle.encode(full)))
    return found
