"""Does full-size SAM3 run in float16 at batch 1 on a 4 GiB card (our users' GTX 1050 Ti)?

Caps this process at 4 GiB of the GPU with torch.cuda.set_per_process_memory_fraction, loads the
full-size model through batchseg's engine in float16, and segments 2048x1536 JPEGs one at a time with
threshold 0 (the densest case: max_detections masks per image). Prints the peak memory.

    python benchmarks/small_card.py --model-dir .bench/models/full-bf16 --images-dir .bench/images-2048x1536
    python benchmarks/small_card.py ... --batch 16 --images 16   # OOM halving: 16 does not fit in 4 GiB
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch

from batchseg.config import RunConfig
from batchseg.engines.sam3.engine import load_engine
from batchseg.records import Item
from batchseg.worker.contract import EngineSpec
from batchseg.worker.writer import OutputWriter, WritingBeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--images-dir", type=Path, required=True)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass to start with")
    args = parser.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.gib * 2**30 / total, 0)
    config = RunConfig(
        input=args.images_dir.resolve(),
        prompts=("roof",),
        model=str(args.model_dir),
        output=Path(tempfile.mkdtemp(prefix="batchseg-small-card-")),
        device="cuda:0",
        dtype="float16",
        threshold=0.0,
        batch_size=args.batch,
    )
    engine = load_engine(EngineSpec(config=config), 0)
    loaded_gib = torch.cuda.memory_allocated() / 2**30  # weights on the GPU, text tower released
    paths = sorted(args.images_dir.glob("*.jpg"))[: args.images]
    items = [Item(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # One task of all images: a batch that does not fit is halved until it does (CUDA OOM).
        writing = WritingBeat(OutputWriter(config, engine.device), items, lambda *_: None)  # no watchdog
        results = writing.results(engine.process(items, writing))
    print(
        json.dumps(
            {
                "cap_gib": args.gib,
                "statuses": [str(r.status) for r in results],
                "detections": [len(r.detections) for r in results],
                "errors": [r.error_message for r in results if r.error_message],
                "allocated_after_load_gib": loaded_gib,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                "device": engine.device,
                "batch_started": args.batch,
                "batch_after": engine.max_batch,
                "warnings": [str(w.message) for w in caught],
            }
        )
    )


if __name__ == "__main__":
    main()
