"""The tile plan: edges shifted inward, deterministic ids, cores that partition the image."""

from __future__ import annotations

import numpy as np
import pytest

from batchseg.tiles.grid import (
    AUTO_FACTOR,
    axis_starts,
    default_overlap,
    parse_overlap,
    parse_tile,
    plan_tiles,
)


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


def test_neighbours_are_the_overlapping_later_tiles() -> None:
    plan = plan_tiles(6000, 4000, 1008, 252)
    pairs = {(t.id, n.id) for t in plan.tiles for n in plan.neighbours(t)}
    brute = {
        (a.id, b.id)
        for i, a in enumerate(plan.tiles)
        for b in plan.tiles[i + 1 :]
        if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
    }
    assert pairs == brute


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
