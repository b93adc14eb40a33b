"""COCO RLE of label maps, checked against pycocotools (the reference decoder users will have)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from batchseg.rle import (
    area,
    decode,
    encode,
    encode_labels,
    encode_runs,
    encode_runs_many,
    is_empty,
    paint_runs,
)

# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def coco_counts(mask: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def assert_matches_coco(labels: np.ndarray, n_labels: int | None = None) -> dict[int, str]:
    height, width = labels.shape
    encoded = encode_labels(labels, n_labels=n_labels)
    present = set(np.unique(labels[labels > 0]).tolist())
    expected = present if n_labels is None else set(range(1, n_labels + 1))
    assert set(encoded) == expected
    for k, counts in encoded.items():
        mask = labels == k
        assert counts == coco_counts(mask), k
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
        assert np.array_equal(coco_mask.decode(rle).astype(bool), mask), k
        assert np.array_equal(decode(counts, height, width), mask), k
        assert area(counts) == int(mask.sum())
    return encoded


@pytest.mark.parametrize("shape", [(5, 7), (1, 9), (9, 1), (64, 48), (1, 1), (2, 2)])
def test_random_label_maps_match_pycocotools(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for trial in range(15):
        labels = rng.integers(0, 5, shape).astype(np.uint16)
        if trial % 3 == 0:  # sparse maps: long background runs
            labels[rng.random(shape) < 0.7] = 0
        assert_matches_coco(labels)
        assert_matches_coco(labels, n_labels=6)


def test_empty_map_has_no_labels_unless_asked() -> None:
    labels = np.zeros((4, 6), np.uint16)
    assert encode_labels(labels) == {}
    assert encode_labels(labels, n_labels=0) == {}
    encoded = assert_matches_coco(labels, n_labels=2)
    assert encoded[1] == encoded[2] == coco_counts(np.zeros((4, 6), bool))


def test_full_map_starts_with_a_zero_run() -> None:
    labels = np.full((3, 5), 7, np.uint16)
    encoded = assert_matches_coco(labels)
    assert list(encoded) == [7]


def test_label_on_first_and_last_pixel() -> None:
    labels = np.zeros((4, 5), np.uint16)
    labels[0, 0] = 1  # first pixel in column-major order
    labels[-1, -1] = 2  # last pixel
    labels[1, 0] = 2
    assert_matches_coco(labels)


def test_same_label_in_separate_runs_and_columns() -> None:
    labels = np.zeros((6, 4), np.uint16)
    labels[0:2, 0] = 3
    labels[4:6, 0] = 3
    labels[:, 2] = 3
    labels[2:4, 1] = 1
    labels[5, 3] = 1
    assert_matches_coco(labels)


def test_large_counts_beyond_two_to_the_twenty() -> None:
    labels = np.zeros((1, 3_000_000), np.uint16)
    labels[0, 2_000_000:2_600_000] = 1
    labels[0, 2_999_999] = 65535  # the largest label value too
    encoded = assert_matches_coco(labels)
    assert area(encoded[1]) == 600_000


def test_column_major_order_on_a_tall_map() -> None:
    labels = np.zeros((1500, 3), np.uint16)
    labels[1400:, 0] = 1
    labels[:100, 1] = 1  # continues the run of column 0 in Fortran order
    assert_matches_coco(labels)


def test_encode_single_mask() -> None:
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    assert encode(mask) == coco_counts(mask)


def test_decode_rejects_counts_of_another_size() -> None:
    counts = encode_labels(np.ones((2, 2), np.uint16))[1]
    with pytest.raises(ValueError, match="3x3"):
        decode(counts, 3, 3)


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_labels(np.zeros((2, 2, 2), np.uint16))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1008, 1008), (30000, 40000)])
def test_is_empty_only_for_the_empty_mask_of_that_size(shape: tuple[int, int]) -> None:
    h, w = shape
    blank = np.zeros((min(h, 50), min(w, 50)), bool)
    empty = encode_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), h, w)
    assert is_empty(empty, h, w)
    coco = coco_mask.encode(np.asfortranarray(blank.astype(np.uint8)))["counts"].decode()
    assert is_empty(coco, *blank.shape)
    assert not is_empty(empty, h, w + 1)  # a count of another size: not this mask
    blank[0, 0] = True
    assert not is_empty(encode(blank), *blank.shape)
    last = np.zeros_like(blank)
    last[-1, -1] = True
    assert not is_empty(encode(last), *last.shape)


def test_many_masks_encode_as_each_alone() -> None:
    """Empty, full, touching runs (joined) and masks of one pixel, in one pass."""
    rng = np.random.default_rng(5)
    h, w = 23, 17
    runs = []
    for fill in (0.0, 0.05, 0.5, 0.95, 1.0):
        flat = (rng.random((h, w)) < fill).T.reshape(-1).astype(np.int8)
        edges = np.diff(np.concatenate(([0], flat, [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs.append((starts, ends))
        if starts.size and ends[0] - starts[0] > 1:  # the same mask with its first run in two touching parts
            cut = starts[0] + 1
            runs.append((np.insert(starts, 1, cut), np.insert(ends, 0, cut)))
    runs.append((np.array([h * w - 1]), np.array([h * w])))

    def alone(starts: np.ndarray, ends: np.ndarray) -> str:  # through the label-map encoder
        flat = np.zeros(h * w, bool)
        for s, e in zip(starts, ends, strict=True):
            flat[s:e] = True
        return encode(flat.reshape(w, h).T)

    assert encode_runs_many(runs, h, w) == [alone(s, e) for s, e in runs]
    assert [encode_runs(s, e, h, w) for s, e in runs] == [alone(s, e) for s, e in runs]
    assert decode(encode_runs_many(runs, h, w)[-1], h, w).sum() == 1
    assert encode_runs_many([], h, w) == []
    with pytest.raises(ValueError, match="sorted, disjoint"):
        encode_runs_many([(np.array([5, 3]), np.array([6, 4]))], h, w)


@pytest.mark.parametrize("big", [False, True])
def test_painted_runs_are_the_runs_assigned_one_by_one(big: bool) -> None:
    """Runs that touch (one's end is the next one's start), runs down to the last row, a column's
    only pixel, values past 2**31 (8-byte sums), on a non-square map: as a loop would paint them."""
    rng = np.random.default_rng(7)
    height, width = 37, 23
    cols, row0s, row1s = [], [], []
    for c in range(width):
        cuts = np.sort(rng.choice(np.arange(height + 1), size=6, replace=False))
        if c == 3:
            cuts = np.array([0, 5, 5, 9, 9, height])  # touching runs, to the last row
        if c == 4:
            cuts = np.array([height - 1, height])  # one pixel, the last row
        for a, b in zip(cuts[0::2], cuts[1::2], strict=True):
            if b > a:
                cols.append(c)
                row0s.append(int(a))
                row1s.append(int(b))
    col, row0, row1 = (np.array(v, np.int64) for v in (cols, row0s, row1s))
    values = rng.integers(1, 2**40 if big else 2**16, size=col.size, dtype=np.int64)
    expected = np.zeros((height, width), np.int64)
    for c, a, b, v in zip(col, row0, row1, values, strict=True):
        expected[a:b, c] = v
    out = np.zeros((height, width), np.int64 if big else np.uint16)
    paint_runs(out, col, row0, row1, values)
    assert np.array_equal(out, expected)
