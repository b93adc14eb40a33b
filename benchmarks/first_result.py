"""How long after the command the first image is done, and where that time goes.

    python benchmarks/first_result.py --model full --device cuda      # full-size SAM3, random weights

Runs ``batchseg run`` on a folder of 2048x1536 JPEGs in a child process and watches its output
folder from outside: the seconds from the command to the worker's ``worker_ready`` line in the
run log, to the first mask file, and to the end. Then, in a fresh process, the worker's start
itemised: importing torch and transformers, loading the model onto the device, building the
engine (prompts encoded, text tower released, backbone captured as a CUDA graph, warm-up), and
the first sub-batch through the engine. Prints one JSON object (also ``--work``/first_result.json).

    python benchmarks/first_result.py --demo     # batchseg demo: first label map, cold and warm

``--demo`` times ``batchseg demo`` instead (it always runs on the CPU): twice in a fresh folder
(the tiny model built, then kept), the seconds to its first label map and to its end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from throughput import PROMPT, build_model, exactly, make_images  # noqa: E402

BREAKDOWN = r"""
import json, sys, time
start = time.perf_counter()
marks = {}
import torch, transformers  # noqa: E401
marks["import torch + transformers"] = time.perf_counter() - start
from batchseg.config import RunConfig
from batchseg.engines.sam3.model import load_model, resolve_dtype
from batchseg.engines.sam3.pipeline import Sam3Engine
from batchseg.records import Item
from batchseg.worker.writer import OutputWriter, WritingBeat
import batchseg.engines.sam3.pipeline as pipeline
model_dir, images, out, device, batch = sys.argv[1:6]


def timed(name, fn):
    def step(*args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        marks[name] = time.perf_counter() - t
        return result
    return step


pipeline.speed_up = timed("  of which the rotary kernel compiled and checked", pipeline.speed_up)
Engine = pipeline.Sam3Engine
Engine.encode_prompts = timed("  of which the prompts encoded", Engine.encode_prompts)
Engine.warm_up = timed("  of which the warm-up (graph capture)", Engine.warm_up)
config = RunConfig(input=images, prompts=("roof",), model=model_dir, output=out, device=device,
                   batch_size=int(batch))
t = time.perf_counter()
from transformers import Sam3Model, Sam3Processor  # noqa: F401
torch.zeros(1, device=device)
marks["import SAM3's modeling code, start CUDA"] = time.perf_counter() - t
t = time.perf_counter()
dtype, reason = resolve_dtype(device, "auto")
model, processor = load_model(model_dir, device, dtype)
torch.cuda.synchronize() if torch.cuda.is_available() else None
marks["load model onto the device"] = time.perf_counter() - t
t = time.perf_counter()
engine = Sam3Engine(model, processor, config, device, dtype, reason)
torch.cuda.synchronize() if torch.cuda.is_available() else None
marks["engine built (the steps above included)"] = time.perf_counter() - t
t = time.perf_counter()
import pathlib
items = [Item(p.name, 0, 0) for p in sorted(pathlib.Path(images).glob("*.jpg"))[: int(batch)]]
writing = WritingBeat(OutputWriter(config, engine.capabilities.device), items, lambda *a: None)
writing.results(engine.process(items, writing))
marks["first sub-batch: read, segment, write"] = time.perf_counter() - t
marks["total"] = time.perf_counter() - start
print(json.dumps(marks))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="full", help="full (full-size, random weights), tiny or a folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--demo", action="store_true", help="time batchseg demo instead")
    args = parser.parse_args()
    if args.demo:
        print(json.dumps(demo_runs(args.work / "first-result-demo"), indent=1))
        return
    model = build_model(args.model, args.work / "models")
    images = exactly(make_images(args.work / "images-2048x1536", args.images, (2048, 1536)), args.images)
    report = {"run": run_command(model, images, args), "worker_start": breakdown(model, images, args)}
    print(json.dumps(report, indent=1))
    (args.work / "first_result.json").write_text(json.dumps(report, indent=1))


def run_command(model: Path, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds from the command to the worker's readiness, the first mask and the end."""
    out = args.work / "first-result-out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [
        sys.executable, "-m", "batchseg", "run", str(images), "--prompt", PROMPT, "--model", str(model),
        "--device", args.device, "--output", str(out), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    while process.poll() is None:
        now = time.perf_counter() - start
        if "worker_ready" not in seen and _ready(out):
            seen["worker_ready"] = now
        if "first_mask" not in seen and _masks(out):
            seen["first_mask"] = now
        time.sleep(0.02)
    seen["end"] = time.perf_counter() - start
    seen["exit_code"] = process.returncode
    return {k: round(v, 2) for k, v in seen.items()}


def demo_runs(root: Path) -> dict[str, dict[str, float]]:
    """``batchseg demo`` in an empty folder (its model built first), then again (model kept, the
    run's output removed): seconds to the first label map and to the end, watched from outside."""
    subprocess.run(["rm", "-rf", str(root)], check=True)
    report = {}
    for name in ("model built", "model kept"):
        subprocess.run(["rm", "-rf", str(root / "demo")], check=True)
        command = [sys.executable, "-m", "batchseg", "demo", "--output", str(root)]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen: dict[str, float] = {}
        while process.poll() is None:
            if "first_mask" not in seen and _masks(root / "demo"):
                seen["first_mask"] = time.perf_counter() - start
            time.sleep(0.02)
        seen["end"] = time.perf_counter() - start
        seen["exit_code"] = process.returncode
        report[name] = {k: round(v, 2) for k, v in seen.items()}
    return report


def _ready(out: Path) -> bool:
    return any("worker_ready" in p.read_text() for p in out.glob("logs/*.log"))


def _masks(out: Path) -> bool:
    """Whether a label map (PNG, or TIFF past PNG's size) is in place in the output folder."""
    return any(p.suffix in (".png", ".tif") for p in (out / "masks").glob("**/*"))


def breakdown(model: Path, images: Path, args: argparse.Namespace) -> dict[str, float]:
    """The worker's start, step by step, in a fresh process."""
    out = args.work / "first-result-steps"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    code = [sys.executable, "-c", BREAKDOWN, str(model), str(images), str(out), args.device]
    code.append(str(args.batch_size))
    done = subprocess.run(code, capture_output=True, text=True, check=True)
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: round(v, 2) for k, v in marks.items()}


if __name__ == "__main__":
    main()
