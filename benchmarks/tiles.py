"""Tiled images end to end: tiles/s of ``batchseg run --tile`` against the model-only forward on
tiles of the same size, wall time and the worker's peak RSS, for big JPEGs and a big tiled TIFF.

    # GPU: sparse and dense (threshold 0) JPEG scenes, a 40000x40000 tiled TIFF, the model-only limit
    python benchmarks/tiles.py --model full --device cuda --phases model_only,sparse,dense,tiff
    # a folder of eight 10000x10000 tiled TIFFs, sparse and dense, one GPU
    python benchmarks/tiles.py --model full --device cuda --tiff-size 10000 --tiffs 8 \
        --phases model_only,tiff,tiff_dense
    # the tiled TIFF dense (threshold 0), on two GPUs
    python benchmarks/tiles.py --model full --device cuda --tiff-size 20000 --phases tiff_dense --workers 2
    # CPU: the tiny model on a 6000x4000 image
    python benchmarks/tiles.py --model tiny --device cpu --jpeg-size 6000x4000 --jpegs 1 --phases sparse
    # the big JPEG's decode alone: Pillow, and nvJPEG on a GPU (seconds, levels from Pillow's pixels)
    python benchmarks/tiles.py --device cuda --jpegs 1 --phases decode

Every run writes its JSON line to ``--out`` (tiles.json). Tiles per image come from the same plan the
run uses (``batchseg.tiles.plan_tiles``); the rate is tiles over the span from the first image's
start to the last one's end in images.parquet (the model load is outside it); the wall time
includes the start and the load. The worker's RSS is sampled every 0.2 s from outside.
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
from throughput import add_compute_rate, build_model, make_images, phase_model_only  # noqa: E402

from batchseg.tiles import parse_overlap, plan_tiles  # noqa: E402

TILE = 1008


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """Big photographs: a generated 2048x1536 scene resized up, so every tile has texture."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = make_images(folder.parent / "seed-2048x1536", 1, (2048, 1536))
    base = Image.open(seeds / "img_00000.jpg").convert("RGB").resize(size, Image.BILINEAR)
    for i in range(count):
        target = folder / f"big_{i:02d}.jpg"
        if not target.exists():
            base.rotate(90 * i, expand=False).save(target, quality=90)
    return folder


def make_tiled_tiff(path: Path, side: int, variant: int = 0) -> Path:
    """An uncompressed RGB tiled TIFF of side x side written tile by tile (never whole in memory);
    another ``variant`` lays the same blocks out in another order (another file, other pixels)."""
    import tifffile

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 255, (512, 512, 3), dtype=np.uint8) // 2 + 64 for _ in range(16)]
    n = -(-side // 512)

    def tiles() -> Any:
        for k in range(n * n):
            yield blocks[(k + variant) % len(blocks)]

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(512, 512), bigtiff=True)
    return path


def tiles_of(size: tuple[int, int]) -> int:
    return len(plan_tiles(size[0], size[1], TILE, parse_overlap(None, TILE)).tiles)


def run_tiled(args: argparse.Namespace, folder: Path, threshold: float) -> dict[str, Any]:
    import psutil
    import pyarrow.parquet as pq

    output = Path(tempfile.mkdtemp(prefix="batchseg-tiles-", dir=args.work))
    command = [
        sys.executable, "-m", "batchseg", "run", str(folder), "--prompt", "roof",
        "--model", str(args.model_dir), "--output", str(output), "--device", args.device,
        "--tile", str(TILE), "--threshold", str(threshold),
        "--timeout", "900", "--max-pixels", str(2_000_000_000),
    ]  # fmt: skip
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.workers:
        command += ["--workers", str(args.workers)]  # several: the tiles spread over them
    if args.threads:
        command += ["--threads", str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                peak = max(peak, child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    log = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"batchseg run failed ({proc.returncode}):\n{log[-4000:]}")
    table = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    assert {r["status"] for r in table} == {"ok"}, {r["status"] for r in table}
    tiles = sum(tiles_of((r["width"], r["height"])) for r in table)
    span = max(r["finished_at"].timestamp() for r in table) - min(r["started_at"].timestamp() for r in table)
    detections = pq.read_table(output / "manifest" / "detections.parquet").num_rows
    return {
        "images": len(table),
        "size": f"{table[0]['width']}x{table[0]['height']}",
        "tiles": tiles,
        "tiles_per_s": round(tiles / span, 2),
        "wall_s": round(wall, 1),
        "worker_peak_rss_mib": round(peak / 2**20, 1),
        "detections": detections,
        "threshold": threshold,
    }


def time_decoders(path: Path, device: str, runs: int = 3) -> dict[str, Any]:
    """Seconds to decode one big JPEG into the pixels its tiles are cut from: Pillow (what a CPU
    run uses) and, on a GPU, nvJPEG (``gpu_jpeg``: loaded first, as the engine does at its start),
    and how far nvJPEG's pixels are from Pillow's (levels of 0..255)."""
    from batchseg import imageio

    def timed(decode: Any) -> tuple[list[float], Any]:
        times, pixels = [], None
        for _ in range(runs):
            start = time.perf_counter()
            pixels = decode()
            times.append(round(time.perf_counter() - start, 3))
        return times, pixels

    pillow_s, pillow = timed(lambda: imageio.read_pixels(path, 10**10))
    report: dict[str, Any] = {"image": path.name, "pillow_s": pillow_s}
    if device.startswith("cuda"):
        import torch

        from batchseg.engines.sam3.gpu_jpeg import GpuJpeg

        decoder = GpuJpeg(torch.device(device))
        start = time.perf_counter()
        decoder.warm()
        report["nvjpeg_load_s"] = round(time.perf_counter() - start, 3)
        report["nvjpeg_s"], nvjpeg = timed(lambda: decoder(str(path)))
        if nvjpeg is not None:
            diff = np.abs(nvjpeg.astype(np.int16) - pillow.astype(np.int16))
            report["levels_from_pillow"] = {
                "mean": round(float(diff.mean()), 3),
                "p99_9": float(np.percentile(diff[::7, ::7], 99.9)),
                "max": int(diff.max()),
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, full (full-size, random weights) or a folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="e.g. 2 on two GPUs")
    parser.add_argument("--threads", type=int, default=None, help="--threads of the run (CPU)")
    parser.add_argument("--jpegs", type=int, default=3, help="big JPEGs in the sparse and dense scenes")
    parser.add_argument("--jpeg-size", default="10000x10000")
    parser.add_argument("--tiff-size", type=int, default=40000)
    parser.add_argument(
        "--tiffs", type=int, default=1, help="tiled TIFFs in the tiff scenes (a folder of them)"
    )
    parser.add_argument("--phases", default="model_only,sparse,dense,tiff")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.model_dir = build_model(args.model, args.work / "models")
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    jpegs = args.work / f"jpegs-{width}x{height}-n{args.jpegs}"
    report: dict[str, Any] = {}
    for phase in args.phases.split(","):
        if phase == "model_only":
            tiles = make_images(args.work / f"images-{TILE}x{TILE}", 64, (TILE, TILE))
            ns = argparse.Namespace(
                model_dir=args.model_dir, images_dir=tiles, device=args.device, dtype=args.dtype,
                batch_size=args.batch_size or 16, iters=10, warmup=3, threads=args.threads, compile=False,
                no_cuda_graphs=False, no_fuse_rope=False, no_fuse_gelu=False,
            )  # fmt: skip
            result = phase_model_only(ns)
            report[phase] = {"tiles_per_s": round(result["img_per_s"], 2), "batch_size": result["batch_size"]}
            report[phase].update({k: result[k] for k in ("tflop_per_img", "tflop_per_s", "of_peak")})
        elif phase in ("sparse", "dense"):
            folder = make_jpegs(jpegs, args.jpegs, (width, height))
            report[phase] = run_tiled(args, folder, 0.3 if phase == "sparse" else 0.0)
        elif phase in ("tiff", "tiff_dense"):  # read by window: no whole-image decode
            folder = args.work / (f"tiff-{args.tiff_size}" + (f"-n{args.tiffs}" if args.tiffs > 1 else ""))
            for i in range(args.tiffs):
                make_tiled_tiff(folder / ("ortho.tif" if i == 0 else f"ortho_{i:02d}.tif"), args.tiff_size, i)
            report[phase] = run_tiled(args, folder, 0.3 if phase == "tiff" else 0.0)
        elif phase == "decode":
            folder = make_jpegs(jpegs, args.jpegs, (width, height))
            report[phase] = time_decoders(sorted(folder.glob("*.jpg"))[0], args.device)
        print(json.dumps({phase: report[phase]}), flush=True)
    if "model_only" in report:
        for phase in ("sparse", "dense", "tiff", "tiff_dense"):
            if phase in report:
                ratio = report[phase]["tiles_per_s"] / report["model_only"]["tiles_per_s"]
                report[phase]["vs_model_only"] = round(ratio, 3)
                add_compute_rate(report[phase], report["model_only"], "tiles_per_s")
    out = args.out or args.work / "tiles.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
