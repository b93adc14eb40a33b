"""Where a batch's time goes inside one SAM3 engine: read, pre-process + vision, prompts, post, write.

    python benchmarks/profile_engine.py --model-dir .bench/models/full-bf16 \
        --images-dir .bench/images-2048x1536 --device cuda --batch-size 16 --batches 5

Prints milliseconds per image for each step (median over batches, after one warm-up batch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--images-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args()

    import torch

    from batchseg import imageio
    from batchseg.config import RunConfig
    from batchseg.engines.sam3.engine import load_engine
    from batchseg.records import Item
    from batchseg.worker.contract import EngineSpec
    from batchseg.worker.writer import OutputWriter

    out = Path(tempfile.mkdtemp(prefix="batchseg-profile-"))
    config = RunConfig(
        input=args.images_dir.resolve(),
        prompts=("roof",),
        model=str(args.model_dir),
        output=out,
        device=args.device,
        dtype=args.dtype,
        threshold=args.threshold,
        batch_size=args.batch_size,
    )
    engine = load_engine(EngineSpec(config=config), 0)
    paths = sorted(args.images_dir.glob("*.jpg"))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    steps: dict[str, list[float]] = {}

    def timed(name: str, fn, *a):  # type: ignore[no-untyped-def]
        sync()
        start = time.perf_counter()
        value = fn(*a)
        sync()
        steps.setdefault(name, []).append((time.perf_counter() - start) * 1000 / args.batch_size)
        return value

    def read_all(chunk):  # type: ignore[no-untyped-def]
        return [imageio.read_image(p, 10**9) for p in chunk]

    def post_all(parts, sizes):  # type: ignore[no-untyped-def]
        return [engine.postprocess(p, s) for p, s in zip(parts, sizes, strict=True)]

    writer = OutputWriter(config, engine.device)

    def write_all(items, images, segs):  # type: ignore[no-untyped-def]
        now = time.time()
        found = [engine.found(i, im, s, now) for i, im, s in zip(items, images, segs, strict=True)]
        return [writer.write(i, f) for i, f in zip(items, found, strict=True)]

    for b in range(args.batches + 1):
        chunk = paths[b * args.batch_size : (b + 1) * args.batch_size]
        items = [Item(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in chunk]
        images = timed("read", read_all, chunk)
        encoded = timed("preprocess+vision", engine.encode_images, images)
        sizes = encoded.sizes
        parts = timed("prompts", engine.decode_prompts, encoded)
        segs = timed("postprocess", post_all, parts, sizes)
        timed("write", write_all, items, images, segs)
        if b == 0:
            steps.clear()
    report = {k: float(np.median(v)) for k, v in steps.items()}
    report["total"] = sum(report.values())
    print(json.dumps({"batch_size": args.batch_size, "device": engine.device, "ms_per_img": report}))


if __name__ == "__main__":
    main()
