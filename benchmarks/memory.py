"""Worker memory over a long run: does a worker's RSS grow while it processes 1,000 images?

Runs ``batchseg run`` (tiny model, threshold 0 so every image has detections, masks and RLEs) on
generated images and samples the worker process's RSS with psutil. Reports the RSS once the first
10% of the images are done (allocator and caches warmed up) and at the end, and the growth between.

    python benchmarks/memory.py --images 1000 --work .bench/memory
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
from throughput import make_images

from batchseg.random_sam3 import build_tiny_checkpoint


def done_count(output: Path) -> int:
    try:
        with sqlite3.connect(f"file:{output / 'checkpoint.sqlite'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0])
    except sqlite3.Error:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", default="1024x768")
    parser.add_argument("--work", type=Path, default=Path(".bench/memory"))
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_size.split("x"))
    images = make_images(args.work / f"images-{args.image_size}", args.images, (width, height))
    model = build_tiny_checkpoint(args.work / "tiny")
    output = args.work / f"out-{time.time_ns()}"
    command = [
        sys.executable,
        "-m",
        "batchseg",
        "run",
        str(images),
        "--prompt",
        "roof",
        "--prompt",
        "car",
        "--model",
        str(model),
        "--output",
        str(output),
        "--device",
        "cpu",
        "--threshold",
        "0",
        "--progress-interval",
        "30",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    samples: list[tuple[int, int, int]] = []  # (images done, worker pid, worker rss)
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            workers = [c for c in parent.children() if "python" in c.name().lower()]
            rss = [(w.pid, w.memory_info().rss) for w in workers]
        except psutil.Error:
            continue
        if rss:
            pid, value = max(rss, key=lambda r: r[1])
            samples.append((done_count(output), pid, value))
    warm = next(s for s in samples if s[0] >= args.images // 10)
    last = [s for s in samples if s[1] == warm[1]][-1]
    report = {
        "images": args.images,
        "exit_code": proc.returncode,
        "worker_pid": warm[1],
        "rss_mb_after_10pct": warm[2] / 2**20,
        "images_at_first_sample": warm[0],
        "rss_mb_at_end": last[2] / 2**20,
        "images_at_last_sample": last[0],
        "growth_pct": 100 * (last[2] - warm[2]) / warm[2],
        "peak_rss_mb": max(s[2] for s in samples) / 2**20,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
