"""Merging tiles' detections: every drawn shape comes out as exactly one detection.

The shapes sit on seams, on the corner of four tiles, across several tiles, on the image border,
with holes; each tile's detections are made by rasterising the shapes inside the tile's window and
splitting them into connected pieces, as the threshold engine does. No full-size canvas is made."""

from __future__ import annotations

import numpy as np
import pytest
from _tile_shapes import Found, Shape, components, tile_detections

from batchseg import rle
from batchseg.tiles.grid import TilePlan, plan_tiles
from batchseg.tiles.merge import MergeError, TileMerger, describe, merge_tiles
from batchseg.tiles.sparse import SparseMask, intersection_areas, piecewise_ratios, uncovered


def _scene(plan: TilePlan) -> list[Shape]:
    """Shapes placed against this plan's seams (positions computed from the grid)."""
    s, ov = plan.side, plan.overlap
    xs, ys = plan.xs, plan.ys

    def seam_x(c: int) -> float:  # middle of the overlap between columns c and c+1
        return (xs[c + 1] + xs[c] + s) / 2

    def seam_y(r: int) -> float:
        return (ys[r + 1] + ys[r] + s) / 2

    small = max(4.0, ov * 0.3)  # held whole by both tiles of its seam
    wide = ov * 0.9  # wider than the overlap: cut by both tiles, joined across the seam
    shapes = [
        Shape("disc", seam_x(0), ys[0] + s * 0.5, small, small),
        Shape("disc", seam_x(1), ys[0] + s * 0.5, wide, wide * 0.7),
        Shape("ring", seam_x(2), seam_y(0), wide, wide, inner=0.5),  # corner of four tiles
        Shape("disc", seam_x(0), seam_y(1), small, small),  # corner, small
        Shape("ring", xs[3] + s * 0.5, ys[2] + s * 0.9, s * 1.4, s * 0.8, inner=0.8),  # larger than a tile
        Shape("rect", 0.0, seam_y(1), ov * 1.5, ov * 0.4),  # on the left border, across a seam
        Shape("rect", plan.width - 1.0, plan.height - 1.0, ov * 0.7, ov * 1.5),  # bottom-right corner
        Shape("ring", xs[-1] + s * 0.5, ys[0] + s * 0.4, s * 0.2, s * 0.2, inner=0.6),  # inside one tile
        Shape("rect", plan.width * 0.5, ys[-1] + s * 0.5, plan.width * 0.3, ov * 0.3),  # long bar
    ]
    _assert_apart(shapes, plan)
    return shapes


def _assert_apart(shapes: list[Shape], plan: TilePlan) -> None:
    """The scene is valid only if no two shapes touch (the threshold engine would join them)."""
    boxes = [s.bbox(plan.width, plan.height) for s in shapes]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1], (a, b)


def _run(plan: TilePlan, shapes: list[Shape]) -> dict[str, list[Found]]:
    return {t.id: tile_detections(shapes, t, plan.width, plan.height) for t in plan.tiles}


def _check_one_per_shape(plan: TilePlan, shapes: list[Shape]) -> None:
    results = _run(plan, shapes)
    merged = merge_tiles(plan, results)
    assert len(merged) == len(shapes), [(d.box, d.tiles) for d in merged]
    assert [d.index for d in merged] == list(range(1, len(merged) + 1))
    assert all(a.score >= b.score for a, b in zip(merged, merged[1:], strict=False))
    used = set()
    for shape in shapes:
        drawn = shape.sparse(plan.width, plan.height)
        best = max(merged, key=lambda d: d.mask.intersection_area(drawn))
        inter = best.mask.intersection_area(drawn)
        iou = inter / (best.mask.area + drawn.area - inter)
        assert iou >= 0.99, (shape, iou, best.tiles)
        assert best.index not in used
        used.add(best.index)
        assert best.area_px == best.mask.area
        assert best.tiles == sum(1 for t in plan.tiles if _meets(drawn, t.window))
    # The manifest RLE is over the whole image and decodes to the same pixels.
    d = merged[0]
    col, row0, row1 = rle.column_runs(d.mask_rle(plan.width), plan.height, plan.width)
    assert SparseMask.from_columns(col, row0, row1, plan.height).union(d.mask).area == d.area_px


def _meets(mask: SparseMask, window: tuple[int, int, int, int]) -> bool:
    return bool(mask.clip(window))


@pytest.mark.parametrize(("side", "overlap"), [(1008, 252), (512, 64), (700, 200)])
def test_every_shape_is_one_detection_on_a_6000x4000_image(side: int, overlap: int) -> None:
    plan = plan_tiles(6000, 4000, side, overlap)
    _check_one_per_shape(plan, _scene(plan))


@pytest.mark.parametrize(("side", "overlap"), [(1008, 252), (1500, 100)])
def test_every_shape_is_one_detection_on_a_20000x15000_image(side: int, overlap: int) -> None:
    plan = plan_tiles(20000, 15000, side, overlap)
    shapes = _scene(plan)
    # Far from the first tiles too: a ring bigger than two tiles in the middle of the image.
    shapes.append(Shape("ring", 11000.0, 8000.0, side * 1.6, side * 1.2, inner=0.7))
    _check_one_per_shape(plan, shapes)


def test_tiles_that_miss_a_piece_leave_it_as_its_own_detection() -> None:
    """A cut piece that no neighbour confirms is kept, not silently dropped."""
    plan = plan_tiles(3000, 1000, 1000, 200)
    shape = Shape("disc", 900.0, 500.0, 150.0, 150.0)  # crosses the seam at x = 800..1000
    results = _run(plan, [shape])
    results["r000c001"] = []  # the right tile saw nothing
    merged = merge_tiles(plan, results)
    assert len(merged) == 1 and merged[0].tiles == 1
    assert merged[0].mask.bbox == (750, 350, 1000, 650)


def test_overlapping_objects_give_the_pixels_to_the_better_score() -> None:
    plan = plan_tiles(2000, 1000, 1000, 200)
    near = [Shape("disc", 300.0, 500.0, 100.0, 100.0), Shape("disc", 380.0, 500.0, 100.0, 100.0)]
    results = {"r000c000": tile_detections(near, plan.tile(0, 0), 2000, 1000)}
    merged = merge_tiles(plan, results)
    assert len(merged) == 2
    a, b = (s.sparse(2000, 1000) for s in near)
    assert merged[0].area_px == a.area
    assert merged[1].area_px == b.area - a.intersection_area(b)
    assert merged[0].mask.intersection_area(merged[1].mask) == 0


def test_match_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match="match threshold"):
        merge_tiles(plan_tiles(100, 100, 64, 8), {}, match=0.0)


def test_an_image_without_detections_merges_to_nothing() -> None:
    assert merge_tiles(plan_tiles(5000, 5000, 1008, 252), {}) == []


def _window_rle(plan: TilePlan, tile_id: str, shape: Shape, *, erode: int = 0) -> str:
    """RLE over a tile's window of a shape (optionally shrunk, as a model's second view may be)."""
    tile = plan.by_id(tile_id)
    smaller = Shape(shape.kind, shape.cx, shape.cy, shape.rx - erode, shape.ry - erode, shape.inner)
    return rle.encode(smaller.raster(tile.window))


def test_views_that_disagree_slightly_still_make_one_detection_with_the_best_score() -> None:
    plan = plan_tiles(1800, 1000, 1000, 200)  # two tiles, overlapping on x = 800..1000
    disc = Shape("disc", 880.0, 500.0, 60.0, 60.0)  # whole in both tiles, 59 px from the left tile's edge
    results = {
        "r000c000": [Found("roof", 0.7, _window_rle(plan, "r000c000", disc))],
        "r000c001": [Found("roof", 0.9, _window_rle(plan, "r000c001", disc, erode=3))],
    }
    merged = merge_tiles(plan, results)
    assert len(merged) == 1 and merged[0].score == 0.9 and merged[0].tiles == 2
    # The left view is farther from its tile's inner edge (59 px against 20): its mask is kept, not
    # the union of the views (which would inflate the shape).
    assert merged[0].area_px == disc.sparse(1800, 1000).area


def test_no_merging_across_prompts_or_below_the_threshold() -> None:
    plan = plan_tiles(1800, 1000, 1000, 200)
    disc = Shape("disc", 900.0, 500.0, 60.0, 60.0)
    shifted = Shape("disc", 960.0, 500.0, 60.0, 60.0)  # overlaps the disc by about a third
    results = {
        "r000c000": [Found("roof", 0.7, _window_rle(plan, "r000c000", disc))],
        "r000c001": [
            # A little smaller than the roof, so the roof keeps pixels of its own (rule 5).
            Found("tree", 0.9, _window_rle(plan, "r000c001", disc, erode=3)),
            Found("roof", 0.8, _window_rle(plan, "r000c001", shifted)),
        ],
    }
    merged = merge_tiles(plan, results)
    assert sorted((d.prompt, d.score) for d in merged) == [("roof", 0.7), ("roof", 0.8), ("tree", 0.9)]
    assert len(merge_tiles(plan, results, match=0.2)) == 2  # a looser threshold joins the roofs


def test_with_fold_iou_one_object_keeps_one_prompt_across_tiles() -> None:
    """--suppress-iou on a tiled image: the disc one tile calls a roof and its neighbour a tree is
    one object under the better score, naming the folded prompt (with what the tiles had folded
    already); an object of another prompt that overlaps less than the threshold stays."""
    plan = plan_tiles(1800, 1000, 1000, 200)
    disc = Shape("disc", 900.0, 500.0, 60.0, 60.0)
    shifted = Shape("disc", 960.0, 500.0, 60.0, 60.0)  # overlaps the disc by about a third
    results = {
        "r000c000": [Found("roof", 0.7, _window_rle(plan, "r000c000", disc), folded=("house",))],
        "r000c001": [
            Found("tree", 0.9, _window_rle(plan, "r000c001", disc, erode=3)),
            Found("roof", 0.8, _window_rle(plan, "r000c001", shifted)),
        ],
    }
    merged = merge_tiles(plan, results, fold_iou=0.5)
    assert [(d.index, d.prompt, d.score, d.folded) for d in merged] == [
        (1, "tree", 0.9, ("house", "roof")),
        (2, "roof", 0.8, ()),
    ]
    unfolded = merge_tiles(plan, results)  # off: the roof keeps the rim of pixels the tree left it
    listed = [(d.prompt, d.score, d.folded) for d in unfolded]
    assert listed == [("tree", 0.9, ()), ("roof", 0.8, ()), ("roof", 0.7, ("house",))]
    strict = merge_tiles(plan, results, fold_iou=0.99)  # the eroded view is not that close
    assert [(d.prompt, d.score, d.folded) for d in strict] == listed


def test_an_object_that_better_ones_cover_entirely_is_no_detection() -> None:
    """Two prompts on the same pixels: the better score owns them all, and the other object, left
    without a pixel, is dropped rather than kept as a row of area 0; numbering has no gap."""
    plan = plan_tiles(1800, 1000, 1000, 200)
    disc = Shape("disc", 900.0, 500.0, 60.0, 60.0)
    far = Shape("disc", 300.0, 300.0, 20.0, 20.0)
    results = {
        "r000c000": [
            Found("roof", 0.7, _window_rle(plan, "r000c000", disc)),
            Found("roof", 0.5, _window_rle(plan, "r000c000", far)),
        ],
        "r000c001": [Found("tree", 0.9, _window_rle(plan, "r000c001", disc))],
    }
    merged = merge_tiles(plan, results)
    assert [(d.index, d.prompt, d.score) for d in merged] == [(1, "tree", 0.9), (2, "roof", 0.5)]
    assert all(d.area_px == d.mask.area > 0 for d in merged)


def test_two_objects_of_one_tile_stay_two_when_a_neighbour_sees_them_as_one() -> None:
    """A model may return one mask in one tile for what it splits into two in another: the two
    detections of the same tile are never folded into each other."""
    plan = plan_tiles(1800, 1000, 1000, 200)
    left = Shape("rect", 880.0, 500.0, 30.0, 40.0)
    right = Shape("rect", 940.0, 500.0, 30.0, 40.0)
    both = Shape("rect", 910.0, 500.0, 60.0, 40.0)
    results = {
        "r000c000": [
            Found("p", 0.9, _window_rle(plan, "r000c000", left)),
            Found("p", 0.8, _window_rle(plan, "r000c000", right)),
        ],
        "r000c001": [Found("p", 0.7, _window_rle(plan, "r000c001", both))],
    }
    merged = merge_tiles(plan, results)
    # The wide view is folded into the best detection it matches; the other one stays.
    assert [(d.score, d.tiles) for d in merged] == [(0.9, 2), (0.8, 1)]
    assert merged[0].area_px == left.sparse(1800, 1000).area
    assert merged[1].area_px == right.sparse(1800, 1000).area


def test_one_view_per_tile_is_folded_into_an_object() -> None:
    """When a tile holds two detections matching one object of its neighbour (a model that sees a
    roof once in one tile and twice in another), only the better-overlapping one is folded in."""
    plan = plan_tiles(1800, 1000, 1000, 200)
    big = Shape("rect", 900.0, 500.0, 60.0, 40.0)
    part = Shape("rect", 900.0, 500.0, 60.0, 30.0)  # inside big, 3/4 of it
    sliver = Shape("rect", 870.0, 535.0, 20.0, 10.0)  # mostly inside big, a quarter below it
    results = {
        "r000c000": [Found("p", 0.9, _window_rle(plan, "r000c000", big))],
        "r000c001": [
            Found("p", 0.8, _window_rle(plan, "r000c001", part)),
            Found("p", 0.6, _window_rle(plan, "r000c001", sliver)),
        ],
    }
    merged = merge_tiles(plan, results)
    assert [(d.score, d.tiles) for d in merged] == [(0.9, 2), (0.6, 1)]


def _rects(plan: TilePlan, tile_id: str, rects: list[tuple[int, int, int, int]]) -> list[Found]:
    """The threshold engine's detections of a union of rectangles (x0, y0, x1, y1) in one tile."""
    tile = plan.by_id(tile_id)
    canvas = np.zeros((tile.y1 - tile.y0, tile.x1 - tile.x0), bool)
    for x0, y0, x1, y1 in rects:
        canvas[max(y0 - tile.y0, 0) : max(y1 - tile.y0, 0), max(x0 - tile.x0, 0) : max(x1 - tile.x0, 0)] = (
            True
        )
    return [Found("p", 0.9, rle.encode(piece)) for piece in components(canvas)]


def test_a_shape_that_two_tiles_split_differently_in_the_overlap_is_still_one() -> None:
    """In the overlap (x 800..1000) the shape has three pieces: the left tile joins the first two
    (through x < 800), the right tile joins the last two (through x >= 1000). Whole masks share only
    the thin middle piece; piece by piece they match."""
    plan = plan_tiles(1800, 1000, 1000, 200)
    rects = [
        (700, 100, 790, 510),  # left bar, outside the overlap
        (790, 100, 900, 300),  # first piece
        (790, 500, 1010, 510),  # thin middle piece, across the whole overlap
        (900, 700, 1010, 900),  # last piece
        (1010, 500, 1100, 900),  # right bar, outside the overlap
    ]
    results = {tile_id: _rects(plan, tile_id, rects) for tile_id in ("r000c000", "r000c001")}
    assert [len(v) for v in results.values()] == [2, 2]
    merged = merge_tiles(plan, results)
    assert len(merged) == 1 and merged[0].tiles == 2
    assert merged[0].area_px == sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects)


def test_components_of_a_sparse_mask() -> None:
    canvas = np.zeros((50, 60), bool)
    canvas[5:10, 5:20] = True  # a bar
    canvas[10:30, 18:20] = True  # touching it below: same piece
    canvas[40:45, 30:50] = True  # apart
    canvas[0:3, 55:60] = True  # apart, at the top
    canvas[3, 54] = True  # diagonal to the last one only: a piece of its own (4-connected)
    mask = SparseMask.from_rle(rle.encode(canvas), (0, 0, 60, 50), 50)
    pieces = mask.components()
    assert sorted(p.area for p in pieces) == sorted([15 * 5 + 20 * 2, 100, 15, 1])
    assert SparseMask.empty(50).union(*pieces).to_rle(60) == mask.to_rle(60)


def _random_mask(rng: np.random.Generator, height: int, width: int, fill: float) -> np.ndarray:
    """Blobs and speckle: many pieces, pieces joined only through a long path, holes."""
    mask = rng.random((height, width)) < fill
    mask[rng.integers(height), :] = True  # a line across that joins many pieces
    return mask


def test_components_match_a_reference_on_speckle_combs_and_snakes() -> None:
    rng = np.random.default_rng(7)
    snake = np.zeros((40, 41), bool)
    snake[:, ::4] = True  # columns joined alternately at the bottom and the top: one long path
    snake[-1, 0::8] = snake[-1, 1::8] = snake[-1, 2::8] = snake[-1, 3::8] = True
    snake[0, 4::8] = snake[0, 5::8] = snake[0, 6::8] = snake[0, 7::8] = True
    canvases = [snake, snake[::-1], snake.T.copy()]
    canvases += [_random_mask(rng, 37, 53, fill) for fill in (0.05, 0.3, 0.55, 0.7)]
    for canvas in canvases:
        h, w = canvas.shape
        pieces = SparseMask.from_rle(rle.encode(canvas), (0, 0, w, h), h).components()
        expected = sorted(rle.encode(piece) for piece in components(canvas))
        assert sorted(piece.to_rle(w) for piece in pieces) == expected
        starts = [int(piece.starts[0]) for piece in pieces]
        assert starts == sorted(starts)  # in order of their first run
    assert len(SparseMask.from_rle(rle.encode(snake), (0, 0, 41, 40), 40).components()) == 1
    assert SparseMask.empty(10).components() == []


def test_batched_intersections_equal_pixel_counts() -> None:
    rng = np.random.default_rng(3)
    h, w = 30, 45
    canvases = [_random_mask(rng, h, w, fill) for fill in (0.0, 0.02, 0.3, 0.6, 0.95)]
    canvases.append(np.zeros((h, w), bool))
    masks = [SparseMask.from_rle(rle.encode(c), (0, 0, w, h), h) for c in canvases]
    pairs = [(i, j) for i in range(len(masks)) for j in range(len(masks))]
    got = intersection_areas([(masks[i], masks[j]) for i, j in pairs])
    assert got.tolist() == [int((canvases[i] & canvases[j]).sum()) for i, j in pairs]
    assert intersection_areas([]).size == 0
    assert intersection_areas([(masks[-1], masks[-1])]).tolist() == [0]  # nothing but empty masks


def test_tiles_added_in_any_order_merge_to_the_same_result() -> None:
    plan = plan_tiles(6000, 4000, 1008, 252)
    results = _run(plan, _scene(plan))
    expected = merge_tiles(plan, results)
    order = list(results)
    np.random.default_rng(1).shuffle(order)
    merger = TileMerger(plan)
    for tile_id in order:
        merger.add(tile_id, results[tile_id])
    got = merger.finish()
    assert [(m.index, m.prompt, m.score, m.box, m.area_px, m.tiles, m.mask_rle(plan.width)) for m in got] == [
        (m.index, m.prompt, m.score, m.box, m.area_px, m.tiles, m.mask_rle(plan.width)) for m in expected
    ]
    with pytest.raises(ValueError, match="added twice"):
        merger.add(order[0], results[order[0]])


def test_piecewise_ratio_is_the_best_pair_of_pieces() -> None:
    rng = np.random.default_rng(11)
    h, w = 40, 50
    for fill_a, fill_b in [(0.3, 0.3), (0.55, 0.2), (0.05, 0.7), (0.0, 0.5)]:
        ca, cb = _random_mask(rng, h, w, fill_a), _random_mask(rng, h, w, fill_b)
        a = SparseMask.from_rle(rle.encode(ca), (0, 0, w, h), h)
        b = SparseMask.from_rle(rle.encode(cb), (0, 0, w, h), h)
        best = 0.0
        for pa in components(ca):
            for pb in components(cb):
                best = max(best, float((pa & pb).sum()) / min(pa.sum(), pb.sum()))
        assert piecewise_ratios([(a, b)])[0] == pytest.approx(best)
    assert piecewise_ratios([(SparseMask.empty(h), SparseMask.empty(h))])[0] == 0.0


@pytest.mark.parametrize("cell", [4, 16, 256])
def test_uncovered_is_each_mask_minus_every_earlier_one(cell: int) -> None:
    """Against pixel arithmetic: blobs that overlap, one inside another, masks that touch, boxes
    that meet where the masks do not, a mask hidden whole, an earlier mask far away; grid cells
    smaller and larger than the masks."""
    rng = np.random.default_rng(5)
    h, w = 40, 60
    canvases = [_random_mask(rng, h, w, fill) for fill in (0.02, 0.3, 0.6)]
    block = np.zeros((h, w), bool)
    block[5:20, 10:30] = True
    inside = np.zeros((h, w), bool)
    inside[8:12, 15:18] = True  # hidden whole by the block
    beside = np.zeros((h, w), bool)
    beside[5:20, 30:33] = True  # touches the block
    ring = np.zeros((h, w), bool)
    ring[25:35, 40:50] = True
    ring[27:33, 42:48] = False
    hole = np.zeros((h, w), bool)
    hole[28:32, 43:47] = True  # inside the ring's box, not on it
    far = np.zeros((h, w), bool)
    far[38:40, 0:2] = True
    canvases = [block, inside, beside, ring, hole, far, *canvases]
    masks = [SparseMask.from_rle(rle.encode(c), (0, 0, w, h), h) for c in canvases]
    boxes = np.array([m.bbox for m in masks])
    got = uncovered(masks, boxes, cell)
    painted = np.zeros((h, w), bool)
    for canvas, mask in zip(canvases, got, strict=True):
        assert mask.to_rle(w) == rle.encode(canvas & ~painted)
        painted |= canvas
    assert got[1].area == 0 and got[0] is masks[0] and got[5] is masks[5]  # nothing earlier meets them
    assert uncovered([], np.zeros((0, 4)), cell) == []


def test_uncovered_when_the_last_column_of_the_masks_stops_above_the_bottom() -> None:
    """A box's columns end at x1 * height, past every run when no mask reaches the bottom row of
    the last column: the runs looked up there must not come from the next mask (they did: a pixel
    in two detections, or runs that could not be encoded). The masks of a case the property test
    found (an 8 x 15 image, column-major runs)."""
    h, w = 15, 8
    runs = [
        ([3, 18, 34, 49, 65, 80, 95, 110], [12, 27, 42, 56, 70, 84, 97, 112]),
        ([75, 90, 105], [83, 98, 113]),
        ([3, 18, 34, 49, 65, 82], [7, 23, 38, 53, 68, 83]),
        ([6, 21, 36, 51, 66, 81, 96, 111], [7, 22, 37, 52, 67, 82, 97, 112]),  # hidden whole
    ]
    masks = [SparseMask(np.array(a, np.int64), np.array(b, np.int64), h) for a, b in runs]
    canvases = []
    for mask in masks:
        canvas = np.zeros((h, w), bool)
        rle.paint_runs(canvas, *mask.columns())
        canvases.append(canvas)
    got = uncovered(masks, np.array([m.bbox for m in masks]), 256)
    painted = np.zeros((h, w), bool)
    for canvas, mask in zip(canvases, got, strict=True):
        assert mask.to_rle(w) == rle.encode(canvas & ~painted)
        painted |= canvas
    assert got[2].area == got[3].area == 0


def _box_view(plan: TilePlan, tile_id: str, box: tuple[int, int, int, int], score: float = 0.9) -> Found:
    """A tile's view of the rectangle ``box`` (x0, y0, x1, y1 in image pixels), cut to its window."""
    tile = plan.by_id(tile_id)
    canvas = np.zeros((tile.y1 - tile.y0, tile.x1 - tile.x0), bool)
    x0, y0, x1, y1 = (max(box[0], tile.x0), max(box[1], tile.y0), min(box[2], tile.x1), min(box[3], tile.y1))
    canvas[y0 - tile.y0 : y1 - tile.y0, x0 - tile.x0 : x1 - tile.x0] = True
    return Found("p", score, rle.encode(canvas))


def test_an_object_only_the_tiles_that_cut_it_report_is_what_they_saw() -> None:
    """Tiles of 400, overlap 100 (cores cut at 350): a 30 x 50 object at x 360-390, y 370-420 lies
    in the core of r001c001. Only the two upper tiles report it, cut at their bottom edge (y 400),
    both outside their own cores; the lower tiles, which own it, missed it, as a model does."""
    plan = plan_tiles(1000, 1000, 400, 100)
    box = (360, 370, 390, 420)
    results = {t: [_box_view(plan, t, box)] for t in ("r000c000", "r000c001")}
    (merged,) = merge_tiles(plan, results)
    assert (merged.box, merged.area_px, merged.tiles) == ((360.0, 370.0, 390.0, 400.0), 900, 2)
    # A lower tile that sees it whole gives the object its mask (rule 3), with the group's best score.
    results["r001c000"] = [_box_view(plan, "r001c000", box, score=0.5)]
    (merged,) = merge_tiles(plan, results)
    assert (merged.box, merged.area_px, merged.score) == ((360.0, 370.0, 390.0, 420.0), 1500, 0.9)


def test_a_cut_object_takes_each_pixel_from_its_owner_when_it_saw_it_else_from_the_others() -> None:
    """2 x 2 tiles of 1000 (cores cut at x = 900 and y = 900). The upper tiles see a bar across
    their seam, cut, and disagree: the left view is taller (y 850-950) than the right (860-940).
    Inside an upper tile's core its own view counts, even where it says no; below y 900 the lower
    tiles own the pixels but gave no view, so the views that saw them count (their union)."""
    plan = plan_tiles(1800, 1800, 1000, 200)
    left = _box_view(plan, "r000c000", (600, 850, 1000, 950))  # cut at x 1000
    right = _box_view(plan, "r000c001", (800, 860, 1300, 940))  # cut at x 800
    (obj,) = merge_tiles(plan, {"r000c000": [left], "r000c001": [right]})
    assert obj.mask.clip((600, 0, 900, 1800)).area == 300 * 100  # the left view, above and below 900
    assert obj.mask.clip((900, 850, 1000, 860)).area == 0  # in r000c001's core: its view says no
    assert obj.mask.clip((900, 0, 1300, 900)).area == 400 * 40  # r000c001's own view, rows 860-900
    assert obj.mask.clip((900, 900, 1300, 1800)).area == 400 * 40 + 100 * 10  # both views' union
    assert obj.area_px == obj.mask.area == 300 * 100 + 400 * 80 + 100 * 10


def test_a_failing_tile_is_named_with_what_went_wrong() -> None:
    plan = plan_tiles(3000, 1000, 1000, 200)
    merger = TileMerger(plan)
    with pytest.raises(MergeError) as caught:
        merger.add("r000c001", [Found("p", 0.9, "not an RLE")])
    text = str(caught.value)
    assert text.startswith("ValueError: ") and text.endswith("(tile r000c001, window x 800-1800, y 0-1000)")
    assert "r000c001" not in merger  # a tile that failed is not half added
    with pytest.raises(ValueError, match="'r009c000' is not a tile of this plan"):
        merger.add("r009c000", [])


def test_a_failure_without_a_message_is_described_by_where_it_was_raised() -> None:
    def check() -> None:
        raise AssertionError  # as a bare ``assert`` does (pytest rewrites those in tests)

    try:
        check()
    except AssertionError as exc:
        text = describe(exc)
    assert text.startswith("AssertionError: raised in check (test_tiles_merge.py, line "), text
    assert describe(KeyError("r001c002")) == "KeyError: 'r001c002'"
    assert describe(MergeError("tile r000c000", ValueError("bad"))) == "ValueError: bad (tile r000c000)"
