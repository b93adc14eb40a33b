"""Masks of any size as sorted column-major runs of the whole image, never as pixel arrays.

A mask is the set of positions ``column * height + row`` of the full image, stored as disjoint
runs [start, end) that never cross a column. Union, intersection and difference are one sorted
sweep over the run ends; clipping to a rectangle works per run. Memory is 16 bytes per run (about
one per column an object spans), whatever the image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .. import rle

__all__ = ["SparseMask", "intersection_areas", "piecewise_ratios"]


@dataclass(frozen=True, eq=False)
class SparseMask:
    """Foreground runs of a mask of an image ``height`` rows high (``starts``, ``ends`` int64)."""

    starts: np.ndarray
    ends: np.ndarray
    height: int

    @classmethod
    def empty(cls, height: int) -> SparseMask:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), height)

    @classmethod
    def from_rle(cls, counts: str, window: tuple[int, int, int, int], height: int) -> SparseMask:
        """The mask of a COCO RLE ``counts`` of ``window`` (x0, y0, x1, y1) placed in an image
        ``height`` rows high."""
        x0, y0, x1, y1 = window
        col, row0, row1 = rle.column_runs(counts, y1 - y0, x1 - x0)
        return cls.from_columns(col + x0, row0 + y0, row1 + y0, height)

    @classmethod
    def from_columns(cls, col: np.ndarray, row0: np.ndarray, row1: np.ndarray, height: int) -> SparseMask:
        """From (column, first row, end row) runs in image pixels, sorted column-major and disjoint."""
        base = col.astype(np.int64) * height
        return cls(base + row0, base + row1, height)

    @cached_property
    def area(self) -> int:
        return int((self.ends - self.starts).sum())

    def __bool__(self) -> bool:
        return bool(self.starts.size)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(column, first row, end row) of every run."""
        col = self.starts // self.height
        return col, self.starts - col * self.height, self.ends - col * self.height

    @cached_property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """Tight (x0, y0, x1, y1), ends exclusive; None for an empty mask."""
        if not self.starts.size:
            return None
        col, row0, row1 = self.columns()
        return (int(col[0]), int(row0.min()), int(col[-1]) + 1, int(row1.max()))

    def clip(self, window: tuple[int, int, int, int]) -> SparseMask:
        """The part inside ``window`` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = window
        h = self.height
        lo, hi = np.searchsorted(self.starts, [x0 * h, x1 * h])
        starts, ends = self.starts[lo:hi], self.ends[lo:hi]
        col = starts // h
        row0, row1 = starts - col * h, ends - col * h
        row0, row1 = np.maximum(row0, y0), np.minimum(row1, y1)
        keep = row1 > row0
        return SparseMask.from_columns(col[keep], row0[keep], row1[keep], h)

    def union(self, *others: SparseMask) -> SparseMask:
        return _combine([self, *others], lambda cover: cover > 0)

    def intersection_area(self, other: SparseMask) -> int:
        return int(intersection_areas([(self, other)])[0])

    def minus(self, other: SparseMask) -> SparseMask:
        return _combine([self, other], lambda cover: (cover & 1).astype(bool) & (cover < 2), weights=(1, 2))

    def components(self) -> list[SparseMask]:
        """4-connected components, each a mask of its own, in order of their first run."""
        h = self.height
        if not self.starts.size:
            return []
        roots = _piece_labels(self.starts, self.ends, h)
        order = np.argsort(roots, kind="stable")  # runs of each component keep their order
        first = np.flatnonzero(np.diff(roots[order], prepend=-1))
        pieces = np.split(order, first[1:])
        pieces.sort(key=lambda piece: int(piece[0]))
        return [SparseMask(self.starts[piece], self.ends[piece], h) for piece in pieces]

    def to_rle(self, width: int) -> str:
        """COCO RLE counts of this mask over the whole (height, width) image."""
        return rle.encode_runs(self.starts, self.ends, self.height, width)


def intersection_areas(pairs: Sequence[tuple[SparseMask, SparseMask]]) -> np.ndarray:
    """``a.intersection_area(b)`` for every pair in one vectorised pass, linear in the runs.

    Merging a dense scene compares hundreds of thousands of pairs of a few runs each, where numpy's
    cost per call, not the arithmetic, was the time."""
    if not pairs:
        return np.zeros(0, np.int64)
    runs = _Lifted(pairs)
    ia, _, overlap = runs.overlaps()
    return np.bincount(runs.owner_a[ia], weights=overlap, minlength=len(pairs)).astype(np.int64)


def piecewise_ratios(pairs: Sequence[tuple[SparseMask, SparseMask]]) -> np.ndarray:
    """For every pair, the best intersection over the smaller between a 4-connected piece of ``a``
    and one of ``b`` (0 when no piece shares a pixel), all pairs in one pass: runs are labelled
    by piece, and the shared pixels of each pair of pieces are summed from the overlapping runs."""
    out = np.zeros(len(pairs))
    if not pairs:
        return out
    runs = _Lifted(pairs)
    ia, ib, overlap = runs.overlaps()
    if not ia.size:
        return out
    # A piece is named by its first run's place among all runs of its side: unique over all pairs
    # (pairs lie a column apart or more, so no piece reaches into another pair's runs).
    height = pairs[0][0].height
    la, lb = _piece_labels(runs.sa, runs.ea, height), _piece_labels(runs.sb, runs.eb, height)
    area_a = np.bincount(la, weights=runs.ea - runs.sa, minlength=la.size)
    area_b = np.bincount(lb, weights=runs.eb - runs.sb, minlength=lb.size)
    met, which = np.unique(la[ia] * lb.size + lb[ib], return_inverse=True)
    shared = np.bincount(which.reshape(-1), weights=overlap)
    piece_a, piece_b = met // lb.size, met % lb.size
    np.maximum.at(out, runs.owner_a[piece_a], shared / np.minimum(area_a[piece_a], area_b[piece_b]))
    return out


class _Lifted:
    """The runs of many pairs of masks in one sorted array per side: each pair's positions are
    lifted by the pair's number times the image's size, so pairs never meet each other."""

    def __init__(self, pairs: Sequence[tuple[SparseMask, SparseMask]]) -> None:
        last = max((int(m.ends[-1]) for pair in pairs for m in pair if m.ends.size), default=0)
        span = last + 1 + pairs[0][0].height  # a column apart: pieces never join across pairs
        lift = np.arange(len(pairs), dtype=np.int64) * span
        self.n_a = np.array([a.starts.size for a, _ in pairs], np.int64)
        self.n_b = np.array([b.starts.size for _, b in pairs], np.int64)
        self.owner_a = np.repeat(np.arange(len(pairs)), self.n_a)
        lifted_b = np.repeat(lift, self.n_b)
        self.sa = np.concatenate([a.starts for a, _ in pairs]) + lift[self.owner_a]
        self.ea = np.concatenate([a.ends for a, _ in pairs]) + lift[self.owner_a]
        self.sb = np.concatenate([b.starts for _, b in pairs]) + lifted_b
        self.eb = np.concatenate([b.ends for _, b in pairs]) + lifted_b

    def overlaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every run of a meeting a run of b: their indices and the pixels they share. The runs of
        b that a run of a meets are one index range (each side sorted and disjoint per pair)."""
        lo = np.searchsorted(self.eb, self.sa, side="right")
        count = np.maximum(np.searchsorted(self.sb, self.ea, side="left") - lo, 0)
        ia = np.repeat(np.arange(self.sa.size), count)
        ib = np.repeat(lo, count) + (np.arange(ia.size) - np.repeat(np.cumsum(count) - count, count))
        return ia, ib, np.minimum(self.ea[ia], self.eb[ib]) - np.maximum(self.sa[ia], self.sb[ib])


def _piece_labels(starts: np.ndarray, ends: np.ndarray, height: int) -> np.ndarray:
    """For every run of sorted, disjoint column-major runs, the index of the first run of its
    4-connected piece. Runs in neighbouring columns that share a row are joined; for each run the
    runs of the next column that it touches form one index range, found by search."""
    lo = np.searchsorted(ends, starts + height, side="right")
    hi = np.searchsorted(starts, ends + height, side="left")
    count = np.maximum(hi - lo, 0)
    left = np.repeat(np.arange(starts.size), count)
    right = np.repeat(lo, count) + (np.arange(left.size) - np.repeat(np.cumsum(count) - count, count))
    return _component_labels(starts.size, left, right)


def _component_labels(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The smallest node of each node's connected component, for ``n`` nodes and edges
    ``left[i]-right[i]``: labels hook onto smaller labels across edges, then jump to their
    label's label, until nothing changes (a few rounds; a Python union-find was the merge's
    bottleneck on masks of thousands of runs)."""
    labels = np.arange(n)
    while left.size:
        low = np.minimum(labels[left], labels[right])
        new = labels.copy()
        for nodes in (left, right, labels[left], labels[right]):
            np.minimum.at(new, nodes, low)  # every label only ever moves to a smaller node of its component
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def _combine(masks: list[SparseMask], rule, weights: tuple[int, ...] | None = None) -> SparseMask:  # type: ignore[no-untyped-def]
    """Boolean combination by a sweep: ``rule(cover)`` on the summed weights of the masks covering
    each stretch between consecutive run ends. Runs within one mask are disjoint."""
    height = masks[0].height
    weights = weights or (1,) * len(masks)
    points = np.concatenate([np.concatenate((m.starts, m.ends)) for m in masks])
    if not points.size:
        return SparseMask.empty(height)
    deltas = np.concatenate(
        [
            np.concatenate((np.full(m.starts.size, w), np.full(m.ends.size, -w)))
            for m, w in zip(masks, weights, strict=True)
        ]
    ).astype(np.int64)
    order = np.argsort(points, kind="stable")
    points, deltas = points[order], deltas[order]
    unique, first = np.unique(points, return_index=True)
    cover = np.cumsum(deltas)[np.concatenate((first[1:] - 1, [points.size - 1]))]
    inside = rule(cover)[:-1]
    starts, ends = unique[:-1][inside], unique[1:][inside]
    # Join stretches that touch, then split at column boundaries again.
    if starts.size:
        joined = np.concatenate(([True], starts[1:] != ends[:-1]))
        starts, ends = starts[joined], ends[np.concatenate((joined[1:], [True]))]
    col, row0, row1 = rle.split_columns(starts, ends, height)
    return SparseMask.from_columns(col, row0, row1, height)
