"""The tile plan of one image: where the tiles lie, which edges are interior, who owns each pixel.

Tiles are squares of ``side`` source pixels on a regular grid of step ``side - overlap``; the last
row and column are shifted inward so they end on the image border (never padded, never resized
here: the engine resizes each tile to its input like any image). An image shorter than ``side``
in one dimension gets square tiles of its short side (a small, isotropic zoom for the model; a
rectangle would be squashed anisotropically into the model's square input), as long as that short
side is at least ``strip_floor(side)``: a thinner strip is refused (``strip_refusal``) rather than
cut into thousands of slivers. An image no larger than ``side`` in both dimensions is not tiled.
Tile ids ``r{row}c{col}`` are deterministic for an image size, side and overlap.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import cached_property

from ..errors import ConfigError
from ..values import TileSide

__all__ = [
    "AUTO_FACTOR",
    "TileSetting",
    "Tile",
    "TilePlan",
    "axis_starts",
    "default_overlap",
    "parse_overlap",
    "parse_tile",
    "plan_tiles",
    "strip_floor",
    "strip_refusal",
]

#: ``--tile auto`` tiles an image whose long side exceeds this many times the model's input
#: (4032 px for SAM3's 1008): past it the model sees objects at less than a quarter of their size.
#: Below it a photograph stays one forward pass: at 2 a 2048x1536 image became 6 tiles and a run
#: 10x slower (docs/aerial-tiles.md).
AUTO_FACTOR = 4.0
#: Smallest tile side and overlap accepted: merging compares masks inside the overlap.
MIN_SIDE = TileSide.minimum
MIN_OVERLAP = 2


@dataclass(frozen=True)
class TileSetting:
    """The ``--tile`` option: ``mode`` is "auto", "off" or "fixed" (then ``side`` is set)."""

    mode: str
    side: int | None = None

    def __str__(self) -> str:
        return str(self.side) if self.mode == "fixed" else self.mode

    def side_for(self, width: int, height: int, model_input: int) -> int | None:
        """The tile side to use on a width x height image, or None to process it whole."""
        if self.mode == "off":
            return None
        if self.mode == "auto":
            return model_input if max(width, height) > AUTO_FACTOR * model_input else None
        assert self.side is not None
        return self.side if max(width, height) > self.side else None


def parse_tile(text: str | int) -> TileSetting:
    """``auto``, ``off`` or a side in pixels (at least 64), read by the option's own parser
    (``values.TileSide``); ValueError with a sentence otherwise."""
    try:
        value = TileSide().from_text(str(text))
    except ConfigError:
        raise ValueError(
            f"--tile must be auto, off or a tile side of at least {MIN_SIDE} pixels, not {text!r}."
        ) from None
    if value is None or value in ("auto", "off"):
        return TileSetting(value or "auto")
    return TileSetting("fixed", int(value))


def default_overlap(side: int) -> int:
    """A quarter of the side (252 px for 1008). An object up to ``overlap - 1`` px across in both
    directions lies, wherever it is, inside some tile without touching that tile's interior edges
    (the grid's step is ``side - overlap``), so one tile holds it whole; larger ones are joined
    across the seams they cross."""
    return side // 4


def parse_overlap(text: str | int | None, side: int) -> int:
    """``--tile-overlap``: None gives ``default_overlap``; from 2 px to half the side."""
    if text is None or str(text).strip().lower() == "auto":
        return default_overlap(side)
    value = str(text).strip()
    if not re.fullmatch(r"\d+", value) or not MIN_OVERLAP <= int(value) <= side // 2:
        raise ValueError(
            f"--tile-overlap must be from {MIN_OVERLAP} to half the tile side ({side // 2}) pixels, "
            f"not {text!r}: tiles are merged by comparing their masks where they overlap."
        )
    return int(value)


def axis_starts(length: int, side: int, overlap: int) -> list[int]:
    """Tile starts along one axis: a step of ``side - overlap``, the last shifted back to end at
    ``length``. ``side`` must not exceed ``length``."""
    if side > length:
        raise ValueError(f"tile side {side} exceeds the axis length {length}")
    step = side - overlap
    count = max(1, math.ceil((length - overlap) / step))
    starts = [min(i * step, length - side) for i in range(count)]
    return sorted(set(starts))


@dataclass(frozen=True)
class Tile:
    """One tile: grid position and window (x0, y0, x1, y1) in pixels of the upright image."""

    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def id(self) -> str:
        return f"r{self.row:03d}c{self.col:03d}"

    @property
    def window(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class TilePlan:
    """All tiles of one image, row-major. ``cores``: the tile owning each pixel, cut at the middle
    of every overlap, so the cores partition the image."""

    width: int
    height: int
    side: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @cached_property
    def tiles(self) -> tuple[Tile, ...]:
        s = self.side
        return tuple(
            Tile(r, c, x, y, x + s, y + s) for r, y in enumerate(self.ys) for c, x in enumerate(self.xs)
        )

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def tile(self, row: int, col: int) -> Tile:
        return self.tiles[row * len(self.xs) + col]

    def by_id(self, tile_id: str) -> Tile:
        match = re.fullmatch(r"r(\d+)c(\d+)", tile_id)
        if not match or int(match[1]) >= len(self.ys) or int(match[2]) >= len(self.xs):
            raise KeyError(tile_id)
        return self.tile(int(match[1]), int(match[2]))

    def interior_edges(self, tile: Tile) -> tuple[bool, bool, bool, bool]:
        """(left, top, right, bottom): whether that edge of ``tile`` lies inside the image."""
        return (tile.x0 > 0, tile.y0 > 0, tile.x1 < self.width, tile.y1 < self.height)

    @cached_property
    def _cuts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        def cuts(starts: tuple[int, ...], length: int) -> tuple[int, ...]:
            # The middle of each overlap.
            inner = [(b + a + self.side) // 2 for a, b in zip(starts, starts[1:], strict=False)]
            return (0, *inner, length)

        return cuts(self.xs, self.width), cuts(self.ys, self.height)

    def core(self, tile: Tile) -> tuple[int, int, int, int]:
        """The part of ``tile`` it owns: its window cut at the middle of each overlap."""
        cx, cy = self._cuts
        return (cx[tile.col], cy[tile.row], cx[tile.col + 1], cy[tile.row + 1])

    def neighbours(self, tile: Tile) -> list[Tile]:
        """Later tiles (row-major) whose windows overlap ``tile``'s: each pair is listed once."""
        return [other for other in self.overlapping(tile) if (other.row, other.col) > (tile.row, tile.col)]

    def overlapping(self, tile: Tile) -> list[Tile]:
        """Every other tile whose window overlaps ``tile``'s, row-major. Along each axis the starts
        less than a side away are one index range, found by bisection: a tile of a strip of
        100,000 tiles costs what one of a 3 x 3 plan does (a scan of the row was quadratic)."""
        rows, cols = _within(self.ys, tile.y0, self.side), _within(self.xs, tile.x0, self.side)
        return [self.tile(r, c) for r in rows for c in cols if (r, c) != (tile.row, tile.col)]


def _within(starts: tuple[int, ...], start: int, side: int) -> range:
    """Indices of the (sorted) starts of tiles that overlap a tile starting at ``start``."""
    return range(bisect_right(starts, start - side), bisect_left(starts, start + side))


def plan_tiles(width: int, height: int, side: int, overlap: int) -> TilePlan:
    """The tiles of a width x height image (rules in the module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if not 0 <= overlap <= side // 2:
        raise ValueError(f"overlap {overlap} must be from 0 to half the tile side {side}")
    side = min(side, width, height)
    overlap = min(overlap, side // 2)
    return TilePlan(
        width,
        height,
        side,
        overlap,
        tuple(axis_starts(width, side, overlap)),
        tuple(axis_starts(height, side, overlap)),
    )


def strip_floor(side: int) -> int:
    """The thinnest image that tiles of ``side`` may cut: a quarter of the side, and never less
    than ``MIN_SIDE``. Below it the tiles, squares of the image's short side, would each be
    enlarged more than four times for the model and a long strip would be tens of thousands of
    them (a 3,158,064 x 48 image was 131,000 tiles of 48 px)."""
    return max(MIN_SIDE, side // 4)


def strip_refusal(width: int, height: int, side: int, overlap: int) -> str | None:
    """Why a width x height image is too thin to be cut into tiles of ``side`` (with ``overlap``
    for tiles of that side), as a sentence saying what to do; None when it may be."""
    short, long = min(width, height), max(width, height)
    floor = strip_floor(side)
    if short >= min(side, floor) or long <= side:  # tiles of the full side, or not tiled
        return None
    count = len(axis_starts(long, short, min(overlap, short // 2)))
    smaller = f", or a --tile of at most {4 * short}" if short >= MIN_SIDE else ""
    return (
        f"The image is {width} x {height} pixels, a strip too thin to tile: tiles of {side} px "
        f"would shrink to its short side: {count:,} tiles of {short} x {short} px. Tiles of {side} px "
        f"need a short side of at least {floor} px: crop it into pieces, pad it, or process it whole "
        f"in a run with --tile off{smaller}."
    )
