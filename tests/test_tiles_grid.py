"""The tile plan: edges shifted inward, deterministic ids, cores that partition the image."""

from __future__ import annotations

import numpy as np
import pytest
from _tile_shapes import Found

from batchseg import rle
from batchseg.tiles.grid import (
    AUTO_FACTOR,
    Tile,
    TilePlan,
    axis_starts,
    default_overlap,
    parse_overlap,
    parse_tile,
    plan_tiles,
    strip_floor,
    strip_refusal,
)
from batchseg.tiles.merge import TileMerger


@pytest.mark.parametrize(
    ("length", "side", "overlap", "starts"),
    [
        (1008, 1008, 252, [0]),
        (2000, 1008, 252, [0, 756, 992]),  # the last tile shifted back to end on the border
        (1764, 1008, 252, [0, 756]),  # exact fit
        (6000, 1000, 0, [0, 1000, 2000, 3000, 4000, 5000]),
    ],
)
def test_axis_starts(length: int, side: int, overlap: int, starts: list[int]) -> None:
    assert axis_starts(length, side, overlap) == starts


@pytest.mark.parametrize(
    ("width", "height", "side", "overlap"),
    [(6000, 4000, 1008, 252), (20000, 15000, 512, 64), (3001, 1009, 1008, 2)],
)
def test_tiles_cover_the_image_and_cores_partition_it(
    width: int, height: int, side: int, overlap: int
) -> None:
    plan = plan_tiles(width, height, side, overlap)
    cover_x = np.zeros(width, int)
    for x in plan.xs:
        cover_x[x : x + side] += 1
    assert cover_x.min() >= 1 and plan.xs[-1] + side == width
    for tile in plan.tiles:
        assert tile.x1 - tile.x0 == side == tile.y1 - tile.y0  # every tile is a full square
        assert 0 <= tile.x0 and tile.x1 <= width and 0 <= tile.y0 and tile.y1 <= height
        x0, y0, x1, y1 = plan.core(tile)
        assert tile.x0 <= x0 < x1 <= tile.x1 and tile.y0 <= y0 < y1 <= tile.y1
        assert plan.by_id(tile.id) == tile
    area = sum((c[2] - c[0]) * (c[3] - c[1]) for c in map(plan.core, plan.tiles))
    assert area == width * height  # with each core inside its own cell, the cores partition the image
    ids = [t.id for t in plan.tiles]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("width", "height", "side", "overlap"),
    [
        (6000, 4000, 1008, 252),
        (5000, 5000, 1008, 252),  # the last row, shifted back, overlaps the row two above too
        (3001, 1009, 1008, 2),
        (5000, 600, 1008, 252),  # a strip: tiles of its short side
        (700, 6000, 256, 0),  # no overlap: tiles that only touch are no neighbours
        (1000, 1000, 400, 100),
        (777, 333, 64, 32),  # half the side: the shifted last tiles overlap two others
        (64, 9000, 64, 31),
    ],
)
def test_neighbours_are_the_overlapping_later_tiles(width: int, height: int, side: int, overlap: int) -> None:
    plan = plan_tiles(width, height, side, overlap)
    pairs = {(t.id, n.id) for t in plan.tiles for n in plan.neighbours(t)}
    brute = {
        (a.id, b.id)
        for i, a in enumerate(plan.tiles)
        for b in plan.tiles[i + 1 :]
        if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
    }
    assert pairs == brute
    for tile in plan.tiles:
        both = {n.id for n in plan.overlapping(tile)}
        assert both == {b for a, b in brute if a == tile.id} | {a for a, b in brute if b == tile.id}


class _CountingPlan(TilePlan):
    """A plan that counts its tile lookups."""

    lookups = 0

    def tile(self, row: int, col: int) -> Tile:
        type(self).lookups += 1
        return super().tile(row, col)


def _counting(plan: TilePlan) -> _CountingPlan:
    return _CountingPlan(plan.width, plan.height, plan.side, plan.overlap, plan.xs, plan.ys)


def test_neighbours_of_a_strip_of_131585_tiles_cost_what_they_find() -> None:
    """The strip that kept a merge helper busy for over 35 minutes (neighbours scanned the whole
    row for every tile): each lookup now is a tile that overlaps, and a merge starts with no work
    per tile. Counted, not timed."""
    _CountingPlan.lookups = 0
    short = _counting(plan_tiles(48_024, 48, 1008, 252))  # 2,000 tiles: a scan would fail here fast
    assert sum(len(short.neighbours(tile)) for tile in short.tiles) == _CountingPlan.lookups // 2 == 1999
    _CountingPlan.lookups = 0
    counting = _counting(plan_tiles(3_158_064, 48, 1008, 252))
    assert len(counting) == 131_585
    merger = TileMerger(counting)
    assert "tiles" not in vars(counting) and _CountingPlan.lookups == 0  # nothing per tile yet
    pairs = sum(len(counting.neighbours(tile)) for tile in counting.tiles)
    assert pairs == len(counting) - 1  # a row whose step is half a tile: each tile overlaps the next
    assert _CountingPlan.lookups == 2 * pairs  # every lookup found an overlapping tile (each way)
    # The far end merges like the start: a bar across the last seam, seen by the last two tiles.
    a, b = counting.tiles[-2], counting.tiles[-1]
    bar = (b.x0, 10, a.x1, 20)
    _CountingPlan.lookups = 0
    for tile in (a, b):
        canvas = np.zeros((48, 48), bool)
        canvas[bar[1] : bar[3], bar[0] - tile.x0 : bar[2] - tile.x0] = True
        merger.add(tile.id, [Found("p", 0.9, rle.encode(canvas))])
    assert _CountingPlan.lookups <= 2 * 3  # by id, then the overlapping tiles of each
    (merged,) = merger.finish()
    assert merged.box == tuple(float(v) for v in bar) and merged.tiles == 2


def test_a_strip_thinner_than_a_quarter_of_the_tile_is_refused_saying_what_to_do() -> None:
    assert strip_floor(1008) == 252 and strip_floor(256) == 64 == strip_floor(64)
    message = strip_refusal(3_158_064, 48, 1008, 252)
    assert message is not None
    for part in ("3158064 x 48", "131,585 tiles of 48 x 48 px", "at least 252 px", "--tile off"):
        assert part in message, message
    assert "--tile of at most" not in message  # under 64 px no tile side would do
    assert strip_refusal(5000, 252, 1008, 252) is None  # at the floor: tiles of 252
    assert strip_refusal(5000, 251, 1008, 252) is not None
    assert strip_refusal(251, 5000, 1008, 252) is not None  # a column is a strip too
    assert strip_refusal(5000, 600, 1008, 252) is None
    assert "or a --tile of at most 400" in (strip_refusal(20000, 100, 512, 128) or "")
    assert strip_refusal(500, 40, 512, 128) is None  # not tiled at all: processed whole
    assert strip_refusal(20000, 5000, 1008, 252) is None


def test_an_image_shorter_than_a_tile_gets_square_tiles_of_its_short_side() -> None:
    plan = plan_tiles(5000, 600, 1008, 252)
    assert plan.side == 600 and plan.ys == (0,) and plan.xs[-1] == 4400
    assert all(t.x1 - t.x0 == 600 for t in plan.tiles)
    assert plan.interior_edges(plan.tile(0, 1)) == (True, False, True, False)


def test_tile_options() -> None:
    assert str(parse_tile("auto")) == "auto" and str(parse_tile("OFF")) == "off"
    assert parse_tile("1008").side == 1008 and str(parse_tile(512)) == "512"
    for bad in ("0", "63", "big", "-5", "1008.5"):
        with pytest.raises(ValueError, match="--tile must be auto, off or a tile side"):
            parse_tile(bad)
    assert parse_overlap(None, 1008) == default_overlap(1008) == 252
    assert parse_overlap("100", 1008) == 100
    for bad in ("1", "505", "x"):
        with pytest.raises(ValueError, match="--tile-overlap must be from 2 to half the tile side"):
            parse_overlap(bad, 1008)


def test_which_images_are_tiled() -> None:
    auto, off, fixed = parse_tile("auto"), parse_tile("off"), parse_tile("512")
    limit = int(AUTO_FACTOR * 1008)
    assert auto.side_for(limit, limit, 1008) is None
    assert auto.side_for(limit + 1, 10, 1008) == 1008
    assert off.side_for(100_000, 100_000, 1008) is None
    assert fixed.side_for(512, 512, 1008) is None and fixed.side_for(513, 100, 1008) == 512


@pytest.mark.parametrize(("side", "overlap"), [(1008, 252), (512, 64)])
def test_objects_up_to_overlap_minus_one_are_whole_in_some_tile(side: int, overlap: int) -> None:
    """The documented capacity of an overlap: checked at every position along a row of tiles."""
    plan = plan_tiles(5 * side, side, side, overlap)

    def whole_somewhere(a: int, w: int) -> bool:
        for tile in plan.tiles:
            left, _, right, _ = plan.interior_edges(tile)
            if (
                tile.x0 <= a
                and a + w <= tile.x1
                and not (left and a == tile.x0)
                and not (right and a + w == tile.x1)
            ):
                return True
        return False

    assert all(whole_somewhere(a, overlap - 1) for a in range(0, plan.width - overlap + 2))
    assert not all(whole_somewhere(a, overlap) for a in range(0, plan.width - overlap + 1))
