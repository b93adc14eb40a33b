"""What merging costs on a dense scene: ``tiles.merge_tiles`` on the detections the full-size SAM3
(random weights, bfloat16, threshold 0) found on nine 1008x1008 tiles, repeated over a bigger plan.

    python benchmarks/merge_dense.py [--side 20000]

``data/sam3-random-dense-tiles.jsonl.gz`` holds, per tile of a 2520x2520 tiled TIFF (--tile 1008,
overlap 252: 3 x 3 tiles), its window and its 100 detections (prompt, index, score, box, area,
RLE), captured on an H200 by an engine that wrapped the SAM3 engine through the engine contract.
Random weights give each tile one mask covering nearly all of it and 99 small fragmented ones: every
near-full mask touches its tile's edges, so they all link into one group across the image. Each tile
of a ``--side`` x ``--side`` plan takes the detections of the captured tile in its position (corner,
edge, interior). Prints the tiles, the detections in and out and the time: ``add_s`` is the part a
worker does as tiles finish (beside the engine), ``finish_s`` what is left after the last tile;
``--profile`` adds cProfile.
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
from batchseg.tiles.grid import plan_tiles
from batchseg.tiles.merge import TileMerger

DATA = Path(__file__).parent / "data" / "sam3-random-dense-tiles.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    captured = plan_tiles(2520, 2520, 1008, 252)
    by_place = {}
    with gzip.open(DATA, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            tile = next(t for t in captured.tiles if list(t.window) == row["window"])
            by_place[tile.row, tile.col] = [
                Detection(p, i, s, tuple(b), a, r) for p, i, s, b, a, r in row["dets"]
            ]
    plan = plan_tiles(args.side, args.side, 1008, 252)

    def place(k: int, n: int) -> int:
        return 0 if k == 0 else 2 if k == n - 1 else 1

    results = {t.id: by_place[place(t.row, len(plan.ys)), place(t.col, len(plan.xs))] for t in plan.tiles}
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
