"""COCO compressed RLE for every label of a label map in one vectorised pass.

COCO RLE reads the mask column by column (Fortran order) and alternates run lengths, starting with a
run of 0s (0 when the mask starts with a 1). The compressed ``counts`` string stores each count,
from the third on as the difference to the count two places before, in 5-bit groups, least
significant first, with a continuation bit (0x20) and an offset of 48 (pycocotools' rleToString).
The result is what ``pycocotools.mask.decode({"size": [h, w], "counts": s})`` reads.

Only numpy; no pixel-level Python loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "area",
    "column_runs",
    "decode",
    "decode_window",
    "encode",
    "encode_labels",
    "encode_runs",
    "encode_runs_many",
    "is_empty",
    "paint_runs",
    "ranges",
    "split_columns",
]

# 64-bit counts need at most 13 groups of 5 bits; real images need far fewer.
_MAX_GROUPS = 13


def encode_labels(labels: np.ndarray, n_labels: int | None = None) -> dict[int, str]:
    """COCO RLE ``counts`` of ``labels == k`` for every label k > 0 in a 2-D integer map.

    With ``n_labels``, every k in 1..n_labels gets an entry, empty ones included (an empty mask is
    one run of zeros); without, only the labels present."""
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    if n_labels == 0:
        return {}  # nothing to encode: the common image without detections costs nothing here
    height, width = labels.shape
    total = height * width
    run_labels, run_starts, run_lengths = _column_major_runs(labels)
    fg = run_labels != 0
    run_labels, run_starts, run_lengths = run_labels[fg], run_starts[fg], run_lengths[fg]
    # Group runs by label; the stable sort keeps each label's runs in pixel order.
    order = np.argsort(run_labels, kind="stable")
    run_labels, run_starts, run_lengths = run_labels[order], run_starts[order], run_lengths[order]
    present, first_run = np.unique(run_labels, return_index=True)
    counts, counts_per_label = _label_counts(run_labels, run_starts, run_lengths, first_run, total)
    strings = _to_strings(counts, counts_per_label)
    result = {int(k): s for k, s in zip(present.tolist(), strings, strict=True)}
    if n_labels is not None:
        empty = _to_strings(np.array([total], np.int64), np.array([1]))[0]
        result = {k: result.get(k, empty) for k in range(1, n_labels + 1)}
    return result


def encode(mask: np.ndarray) -> str:
    """COCO RLE ``counts`` of one 2-D boolean mask."""
    return encode_labels(np.asarray(mask, dtype=bool).astype(np.uint8), n_labels=1)[1]


def _column_major_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal values in column-major order: (value, start, length) of each.

    Found without transposing the map (a strided copy of every pixel): changes down each column
    come from one contiguous comparison, changes across column boundaries from another, and only
    the change positions (far fewer than pixels) are sorted into column-major order."""
    height, width = labels.shape
    total = height * width
    if total == 0:
        empty = np.zeros(0, np.int64)
        return labels.ravel(), empty, empty
    rows, cols = np.nonzero(labels[1:, :] != labels[:-1, :])
    down = cols.astype(np.int64) * height + rows.astype(np.int64) + 1
    across = (np.flatnonzero(labels[0, 1:] != labels[-1, :-1]).astype(np.int64) + 1) * height
    change = np.sort(np.concatenate((down, across)))
    starts = np.concatenate(([0], change)).astype(np.int64)
    ends = np.concatenate((change, [total])).astype(np.int64)
    return labels[starts % height, starts // height], starts, ends - starts


def _label_counts(
    run_labels: np.ndarray, starts: np.ndarray, lengths: np.ndarray, first_run: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """All labels' count sequences concatenated, and how many counts each label has.

    For a label whose runs are (s1, l1), (s2, l2), ...: s1, l1, s2 - (s1 + l1), l2, ..., then the
    trailing zeros total - (s_m + l_m) if there are any."""
    n_runs = run_labels.size
    ends = starts + lengths
    new_label = np.zeros(n_runs, bool)
    new_label[first_run] = True
    previous_end = np.concatenate(([0], ends[:-1]))
    previous_end[new_label] = 0
    gaps = starts - previous_end
    pairs = np.stack([gaps, lengths], axis=1)  # (n_runs, 2)
    last_run = np.concatenate((first_run[1:] - 1, [n_runs - 1])) if n_runs else first_run
    trailing = total - ends[last_run] if n_runs else np.zeros(0, np.int64)
    # Interleave: each label's pairs, then its trailing count (dropped where it is 0).
    label_of_run = np.cumsum(new_label) - 1
    slots = 2 * np.bincount(label_of_run, minlength=first_run.size) + (trailing > 0)
    out = np.empty(int(slots.sum()), np.int64)
    offsets = np.concatenate(([0], np.cumsum(slots)[:-1]))
    run_position = np.arange(n_runs) - first_run[label_of_run]
    pair_index = offsets[label_of_run] + 2 * run_position
    out[pair_index] = pairs[:, 0]
    out[pair_index + 1] = pairs[:, 1]
    has_trailing = trailing > 0
    out[(offsets + slots - 1)[has_trailing]] = trailing[has_trailing]
    return out, slots


def _to_strings(counts: np.ndarray, counts_per_label: np.ndarray) -> list[str]:
    """pycocotools' rleToString for many count sequences at once."""
    if counts.size == 0:
        return [""] * counts_per_label.size
    label_start = np.concatenate(([0], np.cumsum(counts_per_label)[:-1]))
    position = np.arange(counts.size) - np.repeat(label_start, counts_per_label)
    values = counts.copy()
    delta = position > 2
    values[delta] -= counts[np.flatnonzero(delta) - 2]
    # Only as many 5-bit groups as the largest value needs (plus its sign bit).
    n_groups = min(_MAX_GROUPS, max(1, (int(np.abs(values).max()).bit_length() + 5) // 5))
    shifts = 5 * np.arange(n_groups, dtype=np.int64)
    groups = (values[:, None] >> shifts[None, :]) & 0x1F  # arithmetic shift: negatives stay negative
    rest = values[:, None] >> (shifts[None, :] + 5)
    last = np.where(groups & 0x10, rest == -1, rest == 0)
    n_chars = np.argmax(last, axis=1) + 1
    used = np.arange(n_groups)[None, :] < n_chars[:, None]
    more = np.arange(n_groups)[None, :] < (n_chars[:, None] - 1)
    chars = (groups | np.where(more, 0x20, 0)) + 48
    text = chars[used].astype(np.uint8).tobytes().decode("ascii")
    chars_per_label = np.add.reduceat(n_chars, label_start)
    bounds = np.concatenate(([0], np.cumsum(chars_per_label))).tolist()
    return [text[bounds[i] : bounds[i + 1]] for i in range(counts_per_label.size)]


def _parse(counts: str) -> np.ndarray:
    """pycocotools' rleFrString: the counts string back to run lengths, without a Python loop.

    Each value is a group of 5-bit characters (continuation bit 0x20, sign bit 0x10 in the last);
    from the fourth value on, each is stored as the difference to the value two places before, so
    the two interleaved chains are cumulative sums."""
    chars = np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, np.int64)
    last = (chars & 0x20) == 0
    ends = np.flatnonzero(last)
    if ends.size == 0 or ends[-1] != chars.size - 1:
        raise ValueError("RLE counts string ends inside a value")
    starts = np.concatenate(([0], ends[:-1] + 1))
    position = np.arange(chars.size) - np.repeat(starts, ends - starts + 1)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    n_groups = ends - starts + 1
    negative = (chars[ends] & 0x10) != 0
    values[negative] |= -1 << (5 * n_groups[negative])
    out = values.copy()
    out[1::2] = np.cumsum(values[1::2])
    out[2::2] = np.cumsum(values[2::2])
    return out


def decode(counts: str, height: int, width: int) -> np.ndarray:
    """The boolean (height, width) mask of a COCO RLE ``counts`` string."""
    runs = _parse(counts)
    if runs.sum() != height * width or (runs < 0).any():
        raise ValueError(f"RLE counts do not describe a {height}x{width} mask")
    values = np.arange(runs.size) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def area(counts: str) -> int:
    """Number of foreground pixels of a COCO RLE ``counts`` string."""
    return int(_parse(counts)[1::2].sum())


def is_empty(counts: str, height: int, width: int) -> bool:
    """Whether ``counts`` is the empty (height, width) mask: one run of zeros, read without numpy
    (most of a dense scene's low-score detections are empty, and parsing each costs ~60 us)."""
    value, shift = 0, 0
    for position, char in enumerate(counts):
        code = ord(char) - 48
        value |= (code & 0x1F) << shift
        shift += 5
        if not code & 0x20:
            if code & 0x10:
                value |= -1 << shift
            return position == len(counts) - 1 and value == height * width
    return False


# --- runs per column: the sparse form that tiling works on ------------------------------------


def column_runs(counts: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The foreground of a (height, width) COCO RLE as runs that never cross a column.

    Returns int64 arrays (column, first row, end row) in column-major order: a run that wraps from
    the bottom of one column to the top of the next is split. Memory grows with the runs, never with
    the mask's size, so masks of any size can be moved between frames and windows."""
    runs = _parse(counts)
    if runs.sum() != height * width or (runs < 0).any():
        raise ValueError(f"RLE counts do not describe a {height}x{width} mask")
    ends = np.cumsum(runs)
    starts, ends = (ends - runs)[1::2], ends[1::2]
    keep = ends > starts
    return split_columns(starts[keep], ends[keep], height)


def split_columns(
    starts: np.ndarray, ends: np.ndarray, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-major runs [start, end) of a mask ``height`` rows high as (column, row0, row1) pieces."""
    first_col, last_col = starts // height, (ends - 1) // height
    pieces = last_col - first_col + 1
    owner = np.repeat(np.arange(starts.size), pieces)
    col = ranges(first_col, last_col + 1)
    row0 = np.maximum(starts[owner] - col * height, 0)
    row1 = np.minimum(ends[owner] - col * height, height)
    return col.astype(np.int64), row0.astype(np.int64), row1.astype(np.int64)


def ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The integers lo[0]..hi[0]-1, lo[1]..hi[1]-1, ... in one array (empty where hi <= lo), without
    a Python loop: the index arithmetic of many run operations here and in ``tiles.sparse``."""
    count = np.maximum(hi - lo, 0)
    first = np.cumsum(count) - count
    out: np.ndarray = np.repeat(lo - first, count) + np.arange(int(count.sum()))
    return out


def encode_runs(starts: np.ndarray, ends: np.ndarray, height: int, width: int) -> str:
    """COCO RLE ``counts`` of a (height, width) mask given its foreground as sorted, disjoint
    column-major runs [start, end) (positions ``column * height + row``); touching runs are joined."""
    return encode_runs_many([(starts, ends)], height, width)[0]


def encode_runs_many(runs: Sequence[tuple[np.ndarray, np.ndarray]], height: int, width: int) -> list[str]:
    """``encode_runs`` for many masks of one (height, width) image in one vectorised pass (a dense
    merged image has thousands of masks; numpy's cost per call was the time). An empty mask is one
    run of zeros."""
    if not runs:
        return []
    total = height * width
    n = np.array([starts.size for starts, _ in runs], np.int64)
    owner = np.repeat(np.arange(len(runs)), n)
    starts = np.concatenate([a for a, _ in runs]).astype(np.int64)
    ends = np.concatenate([b for _, b in runs]).astype(np.int64)
    same = np.concatenate(([False], owner[1:] == owner[:-1]))[: starts.size]  # as the run before
    bad = (ends <= starts).any() or (same[1:] & (starts[1:] < ends[:-1])).any()
    if starts.size and (bad or starts.min() < 0 or ends.max() > total):
        raise ValueError("runs must be sorted, disjoint, non-empty and inside the mask")
    begins = ~(same & np.concatenate(([False], starts[1:] == ends[:-1]))[: starts.size])  # join touching
    last = np.concatenate((np.flatnonzero(begins)[1:] - 1, [starts.size - 1]))[: int(begins.sum())]
    s, e, o = starts[begins], ends[last], owner[begins]
    first = np.concatenate(([True], o[1:] != o[:-1]))
    gaps = s - np.where(first, 0, np.concatenate(([0], e[:-1])))
    per_mask = np.bincount(o, minlength=len(runs))
    last_end = np.zeros(len(runs), np.int64)
    final = np.concatenate((o[1:] != o[:-1], [True]))[: o.size]
    last_end[o[final]] = e[final]
    tail = total - last_end  # an empty mask is one run of zeros: [total]
    slots = 2 * per_mask + (tail > 0)
    offsets = np.cumsum(slots) - slots
    counts = np.zeros(int(slots.sum()), np.int64)
    at = offsets[o] + 2 * ranges(np.zeros_like(per_mask), per_mask)  # each run's place in its mask
    counts[at], counts[at + 1] = gaps, e - s
    counts[(offsets + slots - 1)[tail > 0]] = tail[tail > 0]
    return _to_strings(counts, slots)


def paint_runs(
    out: np.ndarray, col: np.ndarray, row0: np.ndarray, row1: np.ndarray, values: np.ndarray | int = 1
) -> None:
    """Set ``out[row0:row1, col] = value`` for every run, in place, without a Python loop, on an
    ``out`` that is all zeros (a fresh mask or block: every caller paints one).

    Runs are in ``out``'s own frame and must not overlap each other: each run's start (and end)
    is then a position of its own, marked by plain assignment, and one cumulative sum per column,
    in place, paints them (4-byte sums when the values allow: label maps are painted block by
    block); the columns are then written across ``out``'s rows in one pass."""
    height, width = out.shape
    if col.size == 0:
        return
    value = np.broadcast_to(np.asarray(values, np.int64), col.shape)
    kind = np.int32 if int(np.abs(value).max()) < 2**31 else np.int64
    diff = np.zeros((width, height + 1), kind)
    flat = diff.reshape(-1)
    base = col.astype(np.int64) * (height + 1)
    flat[base + row0] = value.astype(kind)  # starts of disjoint runs never repeat
    flat[base + row1] -= value.astype(kind)  # nor do their ends (an end may be another run's start)
    np.cumsum(diff, axis=1, out=diff)
    out.T[...] = diff[:, :height]


def decode_window(counts: str, height: int, width: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """The part ``window`` = (x0, y0, x1, y1) of a (height, width) COCO RLE mask as a boolean array,
    without decoding the rest of the mask."""
    x0, y0, x1, y1 = window
    col, row0, row1 = column_runs(counts, height, width)
    keep = (col >= x0) & (col < x1) & (row1 > y0) & (row0 < y1)
    out = np.zeros((y1 - y0, x1 - x0), bool)
    paint_runs(
        out, col[keep] - x0, np.maximum(row0[keep], y0) - y0, np.minimum(row1[keep], y1) - y0, values=1
    )
    return out
