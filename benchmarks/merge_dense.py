"""What merging costs on a dense scene: ``tiles.merge_tiles`` on the detections the full-size SAM3
(random weights, bfloat16, threshold 0) found on nine 1008x1008 tiles, repeated over a bigger plan.

    python benchmarks/merge_dense.py [--side 20000]
    python benchmarks/merge_dense.py --scene tiff   # every tile of the GPU benchmark's dense TIFF

``data/sam3-random-dense-tiles.jsonl.gz`` holds, per tile of a 2520x2520 tiled TIFF (--tile 1008,
overlap 252: 3 x 3 tiles), its window and its 100 detections (prompt, index, score, box, area,
RLE), captured on an H200 by an engine that wrapped the SAM3 engine through the engine contract.
Random weights give each tile one mask covering nearly all of it and 99 small fragmented ones:
every near-full mask touches its tile's edges, so they all link into one group across the image.
Each tile of a ``--side`` x ``--side`` plan takes the detections of the captured tile in its
position (corner, edge, interior). ``--scene tiff`` instead takes
``data/sam3-random-dense-tiff-20000.jsonl.gz``: the detections of all 729 tiles of the 20000x20000
TIFF that ``benchmarks/tiles.py --phases tiff_dense`` runs, captured the same way; its fragmented
masks need far more piece-by-piece matching than the nine tiles above. Prints the tiles, the
detections in and out and the time: ``add_s`` is the part a worker does as tiles finish (beside the
engine), ``finish_s`` what is left after the last tile; ``--profile`` adds cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import json
import pstats
import time
from pathlib import Path

from batchseg.records import Detection
from batchseg.tiles.grid import TilePlan, plan_tiles
from batchseg.tiles.merge import TileMerger

DATA = Path(__file__).parent / "data" / "sam3-random-dense-tiles.jsonl.gz"
TIFF_SCENE = Path(__file__).parent / "data" / "sam3-random-dense-tiff-20000.jsonl.gz"


def _rows(path: Path) -> list[tuple[tuple[int, ...], list[Detection]]]:
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return [
        (tuple(r["window"]), [Detection(p, i, s, tuple(b), a, c) for p, i, s, b, a, c in r["dets"]])
        for r in rows
    ]


def repeated_scene(side: int) -> tuple[TilePlan, dict[str, list[Detection]]]:
    """Each tile of a side x side plan gets the captured tile of its position (corner, edge, inside)."""
    captured = plan_tiles(2520, 2520, 1008, 252)
    by_window = dict(_rows(DATA))
    by_place = {(t.row, t.col): by_window[t.window] for t in captured.tiles}
    plan = plan_tiles(side, side, 1008, 252)

    def place(k: int, n: int) -> int:
        return 0 if k == 0 else 2 if k == n - 1 else 1

    return plan, {t.id: by_place[place(t.row, len(plan.ys)), place(t.col, len(plan.xs))] for t in plan.tiles}


def tiff_scene() -> tuple[TilePlan, dict[str, list[Detection]]]:
    """Every tile of the 20000x20000 TIFF as the full model saw it."""
    plan = plan_tiles(20000, 20000, 1008, 252)
    by_window = dict(_rows(TIFF_SCENE))
    return plan, {t.id: by_window[t.window] for t in plan.tiles}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--scene", choices=("nine", "tiff"), default="nine")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    plan, results = tiff_scene() if args.scene == "tiff" else repeated_scene(args.side)
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profile:
        profile.enable()
    merger = TileMerger(plan)
    for tile in plan.tiles:  # what a worker does as each tile finishes
        merger.add(tile.id, results[tile.id])
    added = time.perf_counter()
    merged = merger.finish()  # what is left after the last tile
    if profile:
        profile.disable()
    end = time.perf_counter()
    n_in = sum(len(v) for v in results.values())
    print(
        json.dumps(
            {
                "tiles": len(plan.tiles),
                "detections_in": n_in,
                "detections_out": len(merged),
                "merge_s": round(end - start, 2),
                "add_s": round(added - start, 2),
                "finish_s": round(end - added, 2),
            }
        )
    )
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()
