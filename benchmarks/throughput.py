"""Throughput of batchseg against the model-only limit and the naive loop, on the same images.

One run measures, on generated JPEGs of realistic size (real decoding):
  (a) model-only: ``Sam3Model`` forward (pixel_values + input_ids, text encoder included) on a
      pre-processed batch, nothing else: the limit for this product;
  (b) ``batchseg run`` end to end (workers, masks, checkpoint, manifests), steady-state rate from the
      manifest timestamps (model load excluded) and wall time (load included);
  (c) the naive loop users wrote before: sequential PIL decode, manual resize to a long side,
      Sam3Processor, float32 model, the library's post_process_instance_segmentation at full size,
      uint16 label map saved as PNG with PIL.
Each phase runs in its own process so GPU memory and threads never leak between them.

    python benchmarks/throughput.py --model full --device cuda --images 200 --batch-size 16
    python benchmarks/throughput.py --model tiny --device cpu --images 300
    python benchmarks/throughput.py --model path/to/sam3 --device cuda
    python benchmarks/throughput.py --model full --device cuda --images 400 --exemplars 3 \
        --phases end_to_end                # text only, then text + 3 exemplar boxes per image

``--exemplars N`` adds a run end to end with N positive exemplar boxes per image (a CSV given to
``--exemplars``, each box on a different part of the image) beside the text-only one, on the same
images, card and settings: the cost of exemplars in images/s.
Writes ``<out>/throughput.json`` and ``<out>/throughput.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PROMPT = "roof"
#: ``--prompts N`` takes the first N: the cost of each further prompt on the same vision features.
PROMPTS = ("roof", "solar panel", "tree", "car")
#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of the cards benchmarks run on, by name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


# ---- inputs ---------------------------------------------------------------------------------------


UNIQUE_IMAGES = 64


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """JPEGs with texture and shapes, so they decode and compress like photographs. Past
    ``UNIQUE_IMAGES`` the files are hard links to the first ones: every file is still opened and
    decoded on its own, and a long run needs no long generation."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 255, size=(height // 16, width // 16, 3), dtype=np.uint8)
    for i in range(count):
        target = folder / f"img_{i:05d}.jpg"
        if target.exists():
            continue
        if i >= UNIQUE_IMAGES:
            os.link(folder / f"img_{i % UNIQUE_IMAGES:05d}.jpg", target)
            continue
        small = np.roll(base, i * 7, axis=1)
        img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        noise = rng.integers(0, 24, size=(height, width, 3), dtype=np.uint8)
        img = Image.fromarray(np.asarray(img) // 2 + noise)
        draw = ImageDraw.Draw(img)
        for _ in range(30):
            x, y = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
            draw.rectangle(
                [x, y, x + int(rng.integers(40, 200)), y + int(rng.integers(40, 200))],
                fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
            )
        img.save(folder / f"img_{i:05d}.jpg", quality=90)
    return folder


def exactly(generated: Path, count: int) -> Path:
    """A folder of the first ``count`` generated images (hard links): ``batchseg run`` takes a
    whole folder, and the cache may hold more from an earlier, larger run."""
    folder = generated.with_name(f"{generated.name}-n{count}")
    folder.mkdir(exist_ok=True)
    for i in range(count):
        name = f"img_{i:05d}.jpg"
        if not (folder / name).exists():
            os.link(generated / name, folder / name)
    return folder


def build_model(kind: str, cache: Path) -> Path:
    from batchseg.random_sam3 import build_full_size_checkpoint, build_tiny_checkpoint

    if kind == "tiny":
        return build_tiny_checkpoint(cache / "tiny")
    if kind == "full":
        return build_full_size_checkpoint(cache / "full-bf16", dtype="bfloat16")
    return Path(kind)


# ---- phases (each runs in a child process: python throughput.py --phase NAME ...) ------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def phase_model_only(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from batchseg.engines.sam3.model import load_model, resolve_dtype
    from batchseg.worker.process import set_torch_threads

    set_torch_threads(args.threads)
    dtype, _ = resolve_dtype(args.device, args.dtype)
    model, processor = load_model(str(args.model_dir), args.device, dtype)
    first = sorted(Path(args.images_dir).glob("*.jpg"))[0]
    tflop = _tflop_per_image(model, processor, Image.open(first).convert("RGB"), args.device, dtype)
    # The model as batchseg runs it: the model-only limit is the model as it is run.
    from batchseg.engines.sam3.speedups import speed_up

    speed_up(
        model,
        torch.device(args.device),
        args.batch_size,
        compile=args.compile,
        cuda_graphs=not args.no_cuda_graphs,
        fuse=not args.no_fuse_rope,
        gelu=not args.no_fuse_gelu,
    )
    batch = processor(
        images=[Image.open(first).convert("RGB")] * args.batch_size,
        text=[PROMPT] * args.batch_size,
        return_tensors="pt",
    )
    pixels = batch["pixel_values"].to(args.device, getattr(torch, dtype))
    ids = batch["input_ids"].to(args.device)
    mask = batch["attention_mask"].to(args.device)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            _sync(args.device)
            start = time.perf_counter()
            model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
            _sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    per_batch = float(np.median(times))
    achieved = tflop * args.batch_size / per_batch
    return {
        "tflop_per_img": round(tflop, 3),
        "tflop_per_s": round(achieved, 1),
        "of_peak": _of_peak(args.device, achieved),
        "img_per_s": args.batch_size / per_batch,
        "ms_per_img": 1000 * per_batch / args.batch_size,
        "batch_size": args.batch_size,
        "dtype": dtype,
        "peak_gib": _peak_gib(args.device),
    }


def _tflop_per_image(model: Any, processor: Any, image: Image.Image, device: str, dtype: str) -> float:
    """TFLOP of one image with one prompt (vision encoder, text, DETR and mask decoder), counted by
    ``torch.utils.flop_counter`` on the eager model (matrix products and attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = processor(images=[image], text=[PROMPT], return_tensors="pt")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(
            pixel_values=batch["pixel_values"].to(device, getattr(torch, dtype)),
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )
    return counter.get_total_flops() / 1e12


def _of_peak(device: str, tflop_per_s: float) -> float | None:
    """The achieved rate as a fraction of the card's dense bf16 peak, where the card is known."""
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return round(tflop_per_s / peak, 3) if peak else None


def add_compute_rate(row: dict[str, Any], model_only: dict[str, Any], rate_key: str = "img_per_s") -> None:
    """``row``'s TFLOP/s and share of the card's bf16 peak, from the TFLOP per image the model-only
    phase counted (one prompt, the model's 1008 px input: an image or a tile alike)."""
    tflop = model_only.get("tflop_per_img")
    if tflop is None or rate_key not in row or row.get("prompts", 1) != 1:
        return
    row["tflop_per_img"] = tflop
    row["tflop_per_s"] = round(tflop * row[rate_key], 1)
    if model_only.get("of_peak") and model_only.get("tflop_per_s"):
        row["of_peak"] = round(row["tflop_per_s"] * model_only["of_peak"] / model_only["tflop_per_s"], 3)


def exemplar_csv(target: Path, images: Path, per_image: int) -> Path:
    """``per_image`` positive boxes on every image of ``images`` (a quarter of its short side,
    side by side along a diagonal): the ``--exemplars`` file of the run with exemplars."""
    lines = ["path,x0,y0,x1,y1,label"]
    for path in sorted(images.iterdir()):
        with Image.open(path) as image:
            width, height = image.size
        side = min(width, height) // 4
        for k in range(per_image):
            x0 = (k * (width - side)) // max(per_image - 1, 1)
            y0 = (k * (height - side)) // max(per_image - 1, 1)
            lines.append(f"{path.name},{x0},{y0},{x0 + side},{y0 + side},1")
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def phase_end_to_end_exemplars(args: argparse.Namespace) -> dict[str, Any]:
    return phase_end_to_end(args, exemplars=args.exemplars)


def phase_end_to_end(args: argparse.Namespace, exemplars: int = 0) -> dict[str, Any]:
    import pyarrow.parquet as pq

    output = Path(args.work) / f"e2e-{time.time_ns()}"
    command = [
        sys.executable,
        "-m",
        "batchseg",
        "run",
        str(args.images_dir),
        "--prompt",
        PROMPT,
        "--model",
        str(args.model_dir),
        "--output",
        str(output),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--timeout",
        "600",
        "--progress-interval",
        "30",
        "--threshold",
        str(args.threshold),
        # Whole images, as the model-only phase runs them: the tiny model's 112 px input would
        # otherwise tile a 2048x1536 photo (auto tiles past 4x the model's input).
        "--tile",
        "off",
    ]
    for extra in PROMPTS[1 : args.prompts]:
        command += ["--prompt", extra]
    if exemplars:
        output.mkdir(parents=True)
        boxes = exemplar_csv(output.parent / f"{output.name}-exemplars.csv", Path(args.images_dir), exemplars)
        command += ["--exemplars", str(boxes)]
    if args.compile:
        command.append("--compile")
    if args.previews:
        command.append("--previews")  # overlay JPEGs made by the parent's preview threads
    if args.backend != "local":
        command += ["--backend", args.backend]  # a Ray started for the run, on this machine
    if args.no_cuda_graphs:
        command.append("--no-cuda-graphs")
    if args.no_fuse_rope:
        command.append("--no-fuse-rope")
    if args.no_fuse_gelu:
        command.append("--no-fuse-gelu")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--workers", args.workers),
    ):
        if value:
            command += [flag, str(value)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"batchseg run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    table = pq.read_table(output / "manifest" / "images.parquet").to_pydict()
    n = len(table["path"])
    assert set(table["status"]) == {"ok"}, set(table["status"])
    started = min(t.timestamp() for t in table["started_at"])
    finished = max(t.timestamp() for t in table["finished_at"])
    return {
        "img_per_s": n / (finished - started),
        "ms_per_img": 1000 * (finished - started) / n,
        "wall_s": wall,
        "wall_img_per_s": n / wall,
        "images": n,
        "prompts": args.prompts,
        "exemplars": exemplars,
        "device": table["device"][0],
        "batch_size": args.batch_size,
        **per_worker(table),
    }


def per_worker(table: dict[str, list[Any]]) -> dict[str, Any]:
    """Images per worker and the rate while every worker was at work: from the latest first start
    to the earliest last finish (with several GPUs, the pool's start and its tail excluded)."""
    spans: dict[int, list[float]] = {}
    for pid, s, f in zip(table["worker_pid"], table["started_at"], table["finished_at"], strict=True):
        first, last = spans.setdefault(pid, [s.timestamp(), f.timestamp()])
        spans[pid] = [min(first, s.timestamp()), max(last, f.timestamp())]
    lo, hi = max(v[0] for v in spans.values()), min(v[1] for v in spans.values())
    inside = sum(lo < f.timestamp() <= hi for f in table["finished_at"])
    return {
        "workers": {str(pid): table["worker_pid"].count(pid) for pid in spans},
        "devices": sorted(set(table["device"])),
        "all_busy_img_per_s": inside / (hi - lo) if hi > lo else None,
    }


def phase_naive(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import Sam3Model, Sam3Processor

    from batchseg.worker.process import set_torch_threads

    set_torch_threads(args.threads)
    model = Sam3Model.from_pretrained(str(args.model_dir), dtype=torch.float32).to(args.device).eval()
    processor = Sam3Processor.from_pretrained(str(args.model_dir))
    out = Path(args.work) / f"naive-{time.time_ns()}"
    out.mkdir(parents=True)
    paths = sorted(Path(args.images_dir).glob("*.jpg"))[: args.naive_images]
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        image.thumbnail((1008, 1008))  # what users did: shrink to the model's size first
        inputs = processor(images=image, text=PROMPT, return_tensors="pt").to(args.device)
        with torch.inference_mode():
            outputs = model(**inputs)
        result = processor.post_process_instance_segmentation(
            outputs,
            threshold=args.threshold,
            mask_threshold=0.5,
            target_sizes=inputs["original_sizes"].tolist(),
        )[0]
        labels = np.zeros(image.size[::-1], dtype=np.uint16)
        for k, m in enumerate(result["masks"].cpu().numpy(), start=1):
            labels[m > 0] = k
        Image.fromarray(labels).save(out / f"{path.name}.png")
    _sync(args.device)
    elapsed = time.perf_counter() - start
    return {
        "img_per_s": len(paths) / elapsed,
        "ms_per_img": 1000 * elapsed / len(paths),
        "images": len(paths),
        "dtype": "float32",
    }


PHASES = {
    "model_only": phase_model_only,
    "end_to_end": phase_end_to_end,
    "end_to_end_exemplars": phase_end_to_end_exemplars,
    "naive": phase_naive,
}


# ---- driver ---------------------------------------------------------------------------------------


def run_phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--model-dir",
        str(args.model_dir),
        "--images-dir",
        str(args.images_dir),
        "--work",
        str(args.work),
    ]
    for key in (
        "device",
        "dtype",
        "batch_size",
        "threads",
        "workers",
        "iters",
        "warmup",
        "naive_images",
        "threshold",
        "prompts",
        "exemplars",
    ):
        value = getattr(args, key)
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    if args.compile:
        command.append("--compile")
    if args.previews:
        command.append("--previews")
    command += ["--backend", args.backend]
    if args.no_cuda_graphs:
        command.append("--no-cuda-graphs")
    if args.no_fuse_rope:
        command.append("--no-fuse-rope")
    if args.no_fuse_gelu:
        command.append("--no-fuse-gelu")
    print(f"== {name}", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"   {result}", flush=True)
    return result


def hardware(device: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    if device.startswith("cuda"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        return f"{out.stdout.strip().splitlines()[0] if out.stdout else 'CUDA GPU'}; {cpu}"
    return cpu


def to_markdown(report: dict[str, Any]) -> str:
    rows = [
        ("model-only forward", report["model_only"]),
        ("batchseg run, end to end (steady state)", report["end_to_end"]),
        ("naive loop (fp32, library post-processing)", report["naive"]),
    ]
    if "end_to_end_exemplars" in report:
        with_boxes = f"batchseg run, end to end, {report['exemplars']} exemplar boxes per image"
        rows.insert(2, (with_boxes, report["end_to_end_exemplars"]))
    lines = [
        f"Hardware: {report['hardware']}; model: {report['model']}; images: {report['images']} "
        f"JPEG {report['image_size']}; batch size {report['batch_size']}; dtype {report['dtype']}; "
        f"compile {report.get('compile')}; CUDA graphs {report.get('cuda_graphs')}; "
        f"fused RoPE {report.get('fuse_rope')}; GELU in the product {report.get('fuse_gelu')}",
        "",
        "| what | img/s | ms/img | notes |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | error | | {r['error'].splitlines()[-1][:80]} |")
            continue
        notes = []
        if "wall_s" in r:
            notes.append(
                f"wall {r['wall_s']:.1f}s incl. start and model load ({r['wall_img_per_s']:.2f} img/s)"
            )
        if r.get("peak_gib") is not None:
            notes.append(f"peak {r['peak_gib']:.1f} GiB")
        if r.get("tflop_per_img") is not None:
            share = f", {r['of_peak']:.0%} of bf16 peak" if r.get("of_peak") else ""
            notes.append(f"{r['tflop_per_img']:.3g} TFLOP/img, {r['tflop_per_s']:.3g} TFLOP/s{share}")
        if r.get("prompts", 1) > 1:
            notes.append(f"{r['prompts']} prompts")
        lines.append(f"| {name} | {r['img_per_s']:.2f} | {r['ms_per_img']:.1f} | {'; '.join(notes)} |")
    ratios = report["ratios"]
    lines += [
        "",
        f"end to end / model-only: {ratios.get('e2e_over_model', float('nan')):.3f}; "
        f"end to end / naive: {ratios.get('e2e_over_naive', float('nan')):.2f}",
    ]
    if "exemplars_over_text" in ratios:
        lines.append(f"with exemplars / text only (end to end): {ratios['exemplars_over_text']:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, full (full-size, random weights) or a folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--image-size", default="2048x1536")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--naive-images", type=int, default=None, help="images for the naive loop [all]")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per image, 1 to 4 (end to end)")
    parser.add_argument(
        "--exemplars", type=int, default=0, help="also end to end with N exemplar boxes per image"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (CUDA)")
    parser.add_argument("--previews", action="store_true", help="end to end with --previews")
    parser.add_argument("--backend", default="local", help="end to end with --backend ray")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="launch the backbone's kernels one by one (CUDA)"
    )
    parser.add_argument(
        "--no-fuse-rope", action="store_true", help="transformers' own rotary embedding (CUDA)"
    )
    parser.add_argument(
        "--no-fuse-gelu", action="store_true", help="transformers' own GELU in the backbone's MLPs (CUDA)"
    )
    parser.add_argument("--phases", default="model_only,end_to_end,naive")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--out", type=Path, default=None, help="folder for throughput.json/.md [--work]")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.image_size.split("x"))
    generated = make_images(args.work / f"images-{args.image_size}", args.images, (width, height))
    args.images_dir = exactly(generated, args.images)
    args.model_dir = build_model(args.model, args.work / "models")
    args.batch_size = args.batch_size or 1
    args.naive_images = args.naive_images or args.images
    report: dict[str, Any] = {
        "hardware": hardware(args.device),
        "model": args.model,
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": args.device,
        "compile": args.compile,
        "cuda_graphs": args.device.startswith("cuda") and not args.no_cuda_graphs,
        "fuse_rope": args.device.startswith("cuda") and not (args.no_fuse_rope or args.compile),
        "fuse_gelu": args.device.startswith("cuda") and not args.no_fuse_gelu,
    }
    for name in ("model_only", "end_to_end", "naive"):
        report[name] = run_phase(name, args) if name in args.phases.split(",") else {"error": "not run"}
    ratios = {}
    if args.exemplars and "end_to_end" in args.phases.split(","):
        report["exemplars"] = args.exemplars
        boxed = report["end_to_end_exemplars"] = run_phase("end_to_end_exemplars", args)
        if "img_per_s" in boxed and "img_per_s" in report["end_to_end"]:
            ratios["exemplars_over_text"] = boxed["img_per_s"] / report["end_to_end"]["img_per_s"]
    e2e, model, naive = report["end_to_end"], report["model_only"], report["naive"]
    add_compute_rate(e2e, model)  # the naive loop runs in float32: its share of bf16 peak means little
    if "img_per_s" in e2e and "img_per_s" in model:
        ratios["e2e_over_model"] = e2e["img_per_s"] / model["img_per_s"]
    if "img_per_s" in e2e and "img_per_s" in naive:
        ratios["e2e_over_naive"] = e2e["img_per_s"] / naive["img_per_s"]
    report["ratios"] = ratios
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "throughput.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
