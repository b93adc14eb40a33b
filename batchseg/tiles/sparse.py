"""Masks of any size as sorted column-major runs of the whole image, never as pixel arrays.

A mask is the set of positions ``column * height + row`` of the full image, stored as disjoint
runs [start, end) that never cross a column. A union is one sorted sweep over the run ends,
intersections and what earlier masks leave of later ones are found run against run in one
vectorised pass for many masks at once; clipping to a rectangle works per run. Memory is 16 bytes
per run (about one per column an object spans), whatever the image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .. import rle

__all__ = ["SparseMask", "boxes_meet", "intersection_areas", "piecewise_ratios", "uncovered"]


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
        return _union([self, *others])

    def intersection_area(self, other: SparseMask) -> int:
        return int(intersection_areas([(self, other)])[0])

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


def uncovered(masks: Sequence[SparseMask], boxes: np.ndarray, cell: int = 256) -> list[SparseMask]:
    """For every k, ``masks[k]`` minus the union of ``masks[:k]``: what each mask shows when they
    are painted in order and no pixel is painted twice. ``boxes`` (n, 4) are the masks' tight
    boxes (x0, y0, x1, y1); pairs whose boxes meet are found on a grid of ``cell`` pixels.

    All pairs in one pass: every run of a later mask is cut by the runs of the earlier masks it
    meets (found as in ``intersection_areas``), and what is left of it is kept. A dense image's
    thousands of objects took a Python step each before (half of a merge's end)."""
    if not masks:
        return []
    height = masks[0].height
    later, earlier = meeting_pairs(boxes, cell)
    if not later.size:
        return list(masks)
    every = _Concatenated(masks)
    # Only the columns the two boxes share matter: each side of a pair is an index range of runs.
    x0 = np.maximum(boxes[later, 0], boxes[earlier, 0]).astype(np.int64) * height
    x1 = np.minimum(boxes[later, 2], boxes[earlier, 2]).astype(np.int64) * height
    a_lo, a_hi = every.range_of(later, x0, x1)
    b_lo, b_hi = every.range_of(earlier, x0, x1)
    ia, ib = rle.ranges(a_lo, a_hi), rle.ranges(b_lo, b_hi)
    span = every.span
    pair_a = np.repeat(np.arange(later.size), a_hi - a_lo)
    pair_b = np.repeat(np.arange(later.size), b_hi - b_lo)
    sa, ea = every.starts[ia] + pair_a * span, every.ends[ia] + pair_a * span  # pairs never meet
    sb, eb = every.starts[ib] + pair_b * span, every.ends[ib] + pair_b * span
    ka, kb = _meets(sa, ea, sb, eb)
    run = ia[ka]  # the later mask's run that is cut, and the cut [cut0, cut1) in image positions
    cut0 = np.maximum(sa[ka], sb[kb]) - pair_a[ka] * span
    cut1 = np.minimum(ea[ka], eb[kb]) - pair_a[ka] * span
    if not run.size:
        return list(masks)
    starts, ends, runs = _left_of_runs(every.starts, every.ends, run, cut0, cut1)
    owner = every.owner[runs]
    bounds = np.searchsorted(owner, np.arange(len(masks) + 1))
    cut_masks = set(every.owner[run].tolist())  # the others stay as they were
    return [
        SparseMask(starts[bounds[k] : bounds[k + 1]], ends[bounds[k] : bounds[k + 1]], height)
        if k in cut_masks
        else mask
        for k, mask in enumerate(masks)
    ]


def meeting_pairs(boxes: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (later, earlier) pair of indices, later > earlier, whose boxes share a pixel."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    cx0, cy0 = boxes[:, 0] // cell, boxes[:, 1] // cell
    nx, ny = (boxes[:, 2] - 1) // cell - cx0 + 1, (boxes[:, 3] - 1) // cell - cy0 + 1
    count = nx * ny
    obj = np.repeat(np.arange(boxes.shape[0]), count)
    local = rle.ranges(np.zeros_like(count), count)
    cells = (cy0[obj] + local // nx[obj]) * (int(cx0.max() + nx.max()) + 1) + cx0[obj] + local % nx[obj]
    order = np.lexsort((obj, cells))  # by cell, then object
    cells, obj = cells[order], obj[order]
    first = np.flatnonzero(np.concatenate(([True], cells[1:] != cells[:-1])))
    run_start = np.repeat(first, np.diff(np.concatenate((first, [cells.size]))))
    before = np.arange(cells.size) - run_start  # objects of the same cell earlier in the order
    later = np.repeat(obj, before)
    earlier = obj[rle.ranges(run_start, run_start + before)]
    code = np.unique(later * boxes.shape[0] + earlier)
    later, earlier = code // boxes.shape[0], code % boxes.shape[0]
    meet = boxes_meet(boxes[later], boxes[earlier])
    return later[meet], earlier[meet]


def boxes_meet(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether boxes (..., 4) as (x0, y0, x1, y1), ends exclusive, share a pixel, elementwise with
    numpy's broadcasting (``a[:, None]`` against ``b[None, :]`` compares every pair)."""
    meet: np.ndarray = (
        (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])
    )
    return meet


class _Concatenated:
    """The runs of many masks in one array, mask k's lifted by k times ``span`` (so all are sorted
    and no two masks' runs meet); ``owner`` is each run's mask."""

    def __init__(self, masks: Sequence[SparseMask]) -> None:
        sizes = np.array([m.starts.size for m in masks], np.int64)
        self.span = max((int(m.ends[-1]) for m in masks if m.ends.size), default=0) + 1
        self.owner = np.repeat(np.arange(len(masks)), sizes)
        self.starts = np.concatenate([m.starts for m in masks]).astype(np.int64)
        self.ends = np.concatenate([m.ends for m in masks]).astype(np.int64)
        self._lifted = self.starts + self.owner * self.span

    def range_of(self, which: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each mask ``which[i]``, the index range of its runs starting in [lo[i], hi[i])."""
        base = which * self.span
        # Every position is below ``span``: a bound past it (the end of a box's last column, below
        # every run's end) would reach into the next mask's runs.
        lo, hi = np.minimum(lo, self.span), np.minimum(hi, self.span)
        return np.searchsorted(self._lifted, base + lo), np.searchsorted(self._lifted, base + hi)


def _meets(sa: np.ndarray, ea: np.ndarray, sb: np.ndarray, eb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) of a run [sa[i], ea[i]) and a run [sb[j], eb[j]) that share a position,
    each side sorted and disjoint: the runs of b that a run of a meets are one index range."""
    lo = np.searchsorted(eb, sa, side="right")
    hi = np.searchsorted(sb, ea, side="left")
    return np.repeat(np.arange(sa.size), np.maximum(hi - lo, 0)), rle.ranges(lo, hi)


def _left_of_runs(
    starts: np.ndarray, ends: np.ndarray, run: np.ndarray, cut0: np.ndarray, cut1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every run [starts[g], ends[g]) minus its cuts (run[i] is cut by [cut0[i], cut1[i])), as
    (starts, ends, run of each piece), in run order then position."""
    span = int(ends.max()) + 1
    order = np.lexsort((cut0, run))
    run, cut0, cut1 = run[order], cut0[order], cut1[order]
    # The union of each run's cuts: a cut opens a new stretch where it starts past every earlier
    # cut's end of the same run (lifted by run, so one running maximum serves all runs).
    reach = np.maximum.accumulate(cut1 + run * span)
    opens = np.concatenate(([True], cut0[1:] + run[1:] * span > reach[:-1]))
    closes = np.concatenate((opens[1:], [True]))
    u_run, u0, u1 = run[opens], cut0[opens], reach[closes] - run[closes] * span
    # The pieces between a run's start, its stretches and its end; uncut runs stay whole.
    first = np.concatenate(([True], u_run[1:] != u_run[:-1]))
    last = np.concatenate((first[1:], [True]))
    piece_start = np.where(first, starts[u_run], np.concatenate(([0], u1[:-1])))
    tail_run = u_run[last]
    uncut = np.setdiff1d(np.arange(starts.size), u_run, assume_unique=False)
    all_run = np.concatenate((u_run, tail_run, uncut))
    all_start = np.concatenate((piece_start, u1[last], starts[uncut]))
    all_end = np.concatenate((u0, ends[tail_run], ends[uncut]))
    keep = all_end > all_start
    all_run, all_start, all_end = all_run[keep], all_start[keep], all_end[keep]
    order = np.lexsort((all_start, all_run))
    return all_start[order], all_end[order], all_run[order]


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
        ia, ib = _meets(self.sa, self.ea, self.sb, self.eb)
        return ia, ib, np.minimum(self.ea[ia], self.eb[ib]) - np.maximum(self.sa[ia], self.sb[ib])


def _piece_labels(starts: np.ndarray, ends: np.ndarray, height: int) -> np.ndarray:
    """For every run of sorted, disjoint column-major runs, the index of the first run of its
    4-connected piece. Runs in neighbouring columns that share a row are joined; for each run the
    runs of the next column that it touches form one index range, found by search."""
    left, right = _meets(starts + height, ends + height, starts, ends)  # a run moved one column on
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


def _union(masks: list[SparseMask]) -> SparseMask:
    """The union by a sweep over the run ends: the stretches between consecutive ends that some
    mask covers. Runs within one mask are disjoint."""
    height = masks[0].height
    points = np.concatenate([np.concatenate((m.starts, m.ends)) for m in masks])
    if not points.size:
        return SparseMask.empty(height)
    deltas = np.concatenate([np.repeat([1, -1], (m.starts.size, m.ends.size)) for m in masks]).astype(
        np.int64
    )
    order = np.argsort(points, kind="stable")
    points, deltas = points[order], deltas[order]
    unique, first = np.unique(points, return_index=True)
    cover = np.cumsum(deltas)[np.concatenate((first[1:] - 1, [points.size - 1]))]
    inside = (cover > 0)[:-1]
    starts, ends = unique[:-1][inside], unique[1:][inside]
    # Join stretches that touch, then split at column boundaries again.
    if starts.size:
        joined = np.concatenate(([True], starts[1:] != ends[:-1]))
        starts, ends = starts[joined], ends[np.concatenate((joined[1:], [True]))]
    col, row0, row1 = rle.split_columns(starts, ends, height)
    return SparseMask.from_columns(col, row0, row1, height)
