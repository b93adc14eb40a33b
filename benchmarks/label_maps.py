"""Write a dense tiled label map as a COG and print its time, size and the process's peak memory.

    python benchmarks/label_maps.py --size 20000 --out /tmp/labels.tif

The map is a grid of rectangles (500 columns x 1000 rows each, 900 rows painted): every 512 x 512
block of every level holds labels, the worst case for painting and compressing. The file is
checked with rio-cogeo's validator when it is installed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

from batchseg.tiles.labelmap import write_label_map
from batchseg.tiles.merge import MergedDetection
from batchseg.tiles.sparse import SparseMask


def detections(side: int) -> list[MergedDetection]:
    found = []
    for cx in range(side // 500):
        for ry in range(side // 1000):
            cols = np.arange(cx * 500, cx * 500 + 500, dtype=np.int64)
            starts = cols * side + ry * 1000 + 50
            mask = SparseMask(starts, starts + 900, side)
            found.append(MergedDetection(len(found) + 1, "p", 1.0, (0.0, 0.0, 1.0, 1.0), 1, 1, mask))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="side of the square map in pixels")
    parser.add_argument("--out", default="labels-benchmark.tif", help="where the map is written")
    args = parser.parse_args(argv)
    dets = detections(args.size)
    started = time.perf_counter()
    write_label_map(args.out, dets, args.size, args.size)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    size = os.path.getsize(args.out) / 1e6
    print(
        f"{args.size}x{args.size}, {len(dets)} detections: {elapsed:.2f} s, {size:.1f} MB, "
        f"peak RSS {peak:.0f} MB"
    )
    try:
        from rio_cogeo.cogeo import cog_validate
    except ImportError:
        return 0
    import warnings as python_warnings

    from rasterio.errors import NotGeoreferencedWarning

    with python_warnings.catch_warnings():  # a map without georeference: GDAL says so
        python_warnings.simplefilter("ignore", NotGeoreferencedWarning)
        valid, errors, warnings = cog_validate(args.out, quiet=True)
    print(f"COG: {'valid' if valid else 'INVALID'} {errors} {warnings}")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
