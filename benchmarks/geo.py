"""What polygons cost: a georeferenced scene run with and without ``--vectors``.

    python benchmarks/geo.py --model full --device cuda [--size 10000] [--threshold 0]

Writes a tiled, north-up UTM GeoTIFF of ``--size`` x ``--size`` pixels (0.3 m per pixel) made from
a generated photograph, runs ``batchseg run --tile 1008`` on it twice (the second time with
``--vectors``) and reports each run's wall time, its span from the image's start to its end in
images.parquet, the polygons written and the share of the wall time the polygon step adds.
Needs batchseg[geo].
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from throughput import build_model, make_images  # noqa: E402


def make_geotiff(path: Path, side: int) -> Path:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = make_images(path.parent.parent / "geo-seed", 1, (2048, 1536))  # outside the input folder
    block = np.asarray(Image.open(seed / "img_00000.jpg").convert("RGB").resize((1024, 1024)))
    profile = {
        "driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32633", "transform": from_origin(500000.0, 5000000.0, 0.3, 0.3),
        "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "photometric": "RGB",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, side, 1024):
            for x in range(0, side, 1024):
                w, h = min(1024, side - x), min(1024, side - y)
                dst.write(np.moveaxis(block[:h, :w], 2, 0), window=Window(x, y, w, h))
    return path


def run(args: argparse.Namespace, folder: Path, vectors: bool) -> dict[str, Any]:
    import pyarrow.parquet as pq

    output = Path(tempfile.mkdtemp(prefix="batchseg-geo-", dir=args.work))
    command = [
        sys.executable, "-m", "batchseg", "run", str(folder), "--prompt", "roof",
        "--model", str(args.model_dir), "--output", str(output), "--device", args.device,
        "--tile", "1008", "--threshold", str(args.threshold), "--timeout", "900",
    ]  # fmt: skip
    if vectors:
        command.append("--vectors")
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"batchseg run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    row = pq.read_table(output / "manifest" / "images.parquet").to_pylist()[0]
    polygons = output / "manifest" / "polygons.parquet"
    return {
        "wall_s": round(wall, 1),
        "image_s": round(row["finished_at"].timestamp() - row["started_at"].timestamp(), 1),
        "detections": row["n_detections"],
        "polygons": pq.read_metadata(polygons).num_rows if polygons.exists() else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--threshold", type=float, default=0.0, help="0: every query kept (dense)")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.model_dir = build_model(args.model, args.work / "models")
    scene = make_geotiff(args.work / f"geo-{args.size}" / "scene.tif", args.size)
    report = {
        "without_vectors": run(args, scene.parent, False),
        "with_vectors": run(args, scene.parent, True),
    }
    # Polygons of a tiled image are made from its merged label map at the run's last export, so
    # the run's wall time (start and model load included) is what they add to.
    base, more = report["without_vectors"]["wall_s"], report["with_vectors"]["wall_s"]
    report["polygons_add"] = f"{100 * (more - base) / base:.1f}% of the wall time"
    out = args.out or args.work / "geo.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
