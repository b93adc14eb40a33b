"""Where SAM3's forward pass spends its time, and what each way of running it achieves.

    python benchmarks/forward_profile.py --device cuda --batch-size 16            # full-size, random weights
    python benchmarks/forward_profile.py --model-dir PATH --variants default,cudnn,fp8

Prints (and writes ``forward_profile.json`` in ``--work``):
- a table per kernel group (matrix products, attention, rotary, norms, elementwise, copies...) of
  the model-only forward run as batchseg runs it without the CUDA graph (the profiler sees each
  kernel): GPU time per image, FLOP per image and the TFLOP/s each group achieves;
- one row per variant: images/s, TFLOP/s and share of the card's dense bf16 peak, and how far its
  outputs are from the default path's (scores, boxes, masks) next to the distance between two
  bfloat16 attention kernels (the noise the default path already has).

Variants: ``eager`` (transformers as it is), ``default`` (batchseg: backbone as a CUDA graph,
fused rotary embedding), ``flash``/``cudnn``/``efficient`` (the default with that attention kernel
forced), ``compile`` (``--compile``: each ViT layer compiled, the backbone still a CUDA graph;
``compile-max`` with inductor's autotuned products, minutes to compile), ``nogelu`` (the MLPs' GELU
as transformers runs it, not in their first product's kernel), and from ``qkv`` on, the backbone
changed in place (later variants keep it): ``qkv`` (one product for query, key and value), ``fp8``
(the backbone's linear layers in FP8); words join with ``-`` (``qkv-fp8-cudnn``).
``--reference eager`` compares every variant with transformers' own path:

    python benchmarks/forward_profile.py --no-profile --reference eager --variants eager,default,compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "roof"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
GROUPS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "sm80", "ampere", "scaled_mm", "f8f8")),
    ("conv", ("conv", "implicit", "winograd")),
    ("norm", ("layer_norm", "layernorm", "group_norm")),
    ("fused (triton)", ("triton",)),
    ("copy", ("copy", "cat", "pad", "transpose", "permute")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "softmax", "gelu")),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--variants",
        default="default,eager,flash,cudnn,efficient,compile,qkv,qkv-cudnn,qkv-fp8,qkv-fp8-cudnn",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--reference", default=None, help="the variant the others are compared with")
    parser.add_argument("--profile-variant", default="default", choices=("default", "compile"))
    args = parser.parse_args()

    import torch

    from batchseg.engines.sam3.model import load_model

    model_dir = args.model_dir or _build(args.work)
    model, processor = load_model(str(model_dir), args.device, "bfloat16")
    inputs = _inputs(processor, args.batch_size, args.device)
    report: dict[str, Any] = {"device": _device_name(args.device), "torch": torch.__version__}
    report["tflop_per_img"], report["flop_by_group"] = _flops(model, inputs)
    if not args.no_profile:
        report["profile"] = _profile(
            model, inputs, args.batch_size, report["flop_by_group"], args.profile_variant
        )
    report["variants"] = _variants(model, inputs, args, report["tflop_per_img"])
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "forward_profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "flop_by_group"}, indent=1))


def _build(work: Path) -> Path:
    from batchseg.random_sam3 import build_full_size_checkpoint

    return build_full_size_checkpoint(work / "models" / "full-bf16", dtype="bfloat16")


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def _inputs(processor: Any, batch: int, device: str) -> dict[str, Any]:
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (1536, 2048, 3), dtype=np.uint8))
    enc = processor(images=[image] * batch, text=[PROMPT] * batch, return_tensors="pt")
    # Distinct images: the same image repeated would let nothing differ between rows.
    pixels = enc["pixel_values"].to(device, torch.bfloat16)
    pixels = pixels + 0.1 * torch.randn_like(pixels)
    return {
        "pixel_values": pixels,
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
    }


def _flops(model: Any, inputs: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """TFLOP per image in all, and by group (matmul, attention, conv), counted on the eager model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in inputs.items()}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**one)
    groups: dict[str, float] = {}
    for op, flop in counter.get_flop_counts()["Global"].items():
        name = str(op)
        group = "attention" if "attention" in name else "conv" if "conv" in name else "matmul"
        groups[group] = groups.get(group, 0.0) + flop / 1e12
    return counter.get_total_flops() / 1e12, groups


def _group(kernel: str) -> str:
    name = kernel.lower()
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def _profile(
    model: Any, inputs: dict[str, Any], batch: int, flop: dict[str, float], variant: str
) -> dict[str, Any]:
    """GPU time per kernel group over 3 forwards (the default path or compiled layers, no graph)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from batchseg.engines.sam3.speedups import speed_up

    layers = variant == "compile"
    speed_up(model, torch.device("cuda"), batch, compile=False, cuda_graphs=False, fuse=not layers, gelu=True)
    if layers:
        _compile_layers(model.vision_encoder.backbone, "default")
    with torch.inference_mode():
        for _ in range(2):
            model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model(**inputs)
            torch.cuda.synchronize()
    per_group: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for evt in prof.key_averages():
        us = float(getattr(evt, "self_device_time_total", 0.0) or 0.0)
        if us <= 0:
            continue
        per_group[_group(evt.key)] = per_group.get(_group(evt.key), 0.0) + us
        top.append((us, evt.key))
    images = 3 * batch
    rows = {}
    for group, us in sorted(per_group.items(), key=lambda kv: -kv[1]):
        ms = us / 1000 / images
        tflop = flop.get(group, 0.0)
        rows[group] = {
            "ms_per_img": round(ms, 3),
            "tflop_per_img": round(tflop, 3),
            "tflop_per_s": round(tflop / (ms / 1000), 1) if tflop else None,
        }
    top.sort(reverse=True)
    rows["total_ms_per_img"] = round(sum(per_group.values()) / 1000 / images, 3)  # type: ignore[assignment]
    rows["top_kernels"] = [(round(us / 1000 / images, 3), k[:110]) for us, k in top[:25]]  # type: ignore[assignment]
    if layers:
        _compile_layers(model.vision_encoder.backbone, None)
    return rows


def _compile_layers(backbone: Any, mode: str | None) -> None:
    """Each ViT layer compiled in place as ``--compile`` does (``mode`` "default"), with another
    inductor mode, or back to eager (None)."""
    from batchseg.engines.sam3.speedups import compile_layers

    backbone = getattr(backbone, "backbone", backbone)
    if mode is not None:
        compile_layers(backbone)
    for layer in backbone.layers:
        if mode is None:
            layer._compiled_call_impl = None
        elif mode != "default":
            layer.compile(dynamic=False, mode=mode)


def _sdpa(kind: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }.get(kind)
    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


def _variants(model: Any, inputs: dict[str, Any], args: argparse.Namespace, tflop: float) -> dict[str, Any]:
    import torch

    from batchseg.engines.sam3.fp8 import to_fp8
    from batchseg.engines.sam3.fused import fuse_qkv
    from batchseg.engines.sam3.speedups import speed_up

    rows: dict[str, Any] = {}
    reference: dict[str, torch.Tensor] | None = None
    original = model.vision_encoder.backbone
    original = getattr(original, "backbone", original)
    for variant in args.variants.split(","):
        model.vision_encoder.backbone = original
        words = set(variant.split("-"))
        _compile_layers(original, None)  # a compiled variant compiles the layers in place
        if "qkv" in words:
            fuse_qkv(original)  # in place: later variants keep it
        if "fp8" in words:
            to_fp8(original, torch.device(args.device))
        eager = variant == "eager"
        speed_up(
            model,
            torch.device(args.device),
            args.batch_size,
            compile="compile" in words,
            cuda_graphs=not eager,
            fuse=not eager,
            gelu=not eager and "nogelu" not in words,
        )
        if "max" in words:
            _compile_layers(original, "max-autotune-no-cudagraphs")
        kernel = next((w for w in ("flash", "cudnn", "efficient") if w in words), "auto")
        with _sdpa(kernel), torch.inference_mode():
            try:
                seconds, outputs, first_s = _time(model, inputs, args.iters)
            except Exception as exc:  # noqa: BLE001 - a backend this GPU lacks: say so, go on
                rows[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
        rate = args.batch_size / seconds
        row: dict[str, Any] = {
            "img_per_s": round(rate, 2),
            "ms_per_img": round(1000 / rate, 2),
            "tflop_per_s": round(tflop * rate, 1),
            "of_peak": _of_peak(tflop * rate),
            "first_call_s": round(first_s, 2),
        }
        first = ("default", "flash", "cudnn", "efficient") if args.reference is None else (args.reference,)
        if reference is None and variant in first:
            reference = outputs
            row["agreement"] = "reference"
        elif reference is not None:
            row["agreement"] = _agreement(reference, outputs)
        rows[variant] = row
        print(variant, row, flush=True)
    return rows


def _time(model: Any, inputs: dict[str, Any], iters: int) -> tuple[float, dict[str, Any], float]:
    """Median seconds a forward, the outputs, and the first call's seconds (compilation and
    capture included)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = None
    times = []
    first = 0.0
    for i in range(3 + iters):
        sync()
        start = time.perf_counter()
        out = model(**inputs)
        sync()
        if i == 0:
            first = time.perf_counter() - start
        if i >= 3:
            times.append(time.perf_counter() - start)
    assert out is not None
    kept = {k: out[k].float().clone() for k in ("pred_logits", "pred_boxes", "pred_masks")}
    return float(np.median(times)), kept, first


def _agreement(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, float]:
    """How far ``got`` is from ``ref``: scores (sigmoid of the logits), boxes, and the masks each
    query predicts (IoU of the masks' positive pixels, over queries whose reference score is 0.3+
    or, with random weights, the 10 best queries of each image)."""
    s_ref, s_got = ref["pred_logits"].sigmoid(), got["pred_logits"].sigmoid()
    m_ref, m_got = ref["pred_masks"] > 0, got["pred_masks"] > 0
    best = s_ref.topk(10, dim=1).indices
    idx = best[..., None, None].expand(-1, -1, *m_ref.shape[-2:])
    a, b = m_ref.gather(1, idx), m_got.gather(1, idx)
    inter = (a & b).sum(dim=(-1, -2)).float()
    union = (a | b).sum(dim=(-1, -2)).float().clamp(min=1)
    return {
        "score_max_abs": round(float((s_ref - s_got).abs().max()), 5),
        "score_mean_abs": round(float((s_ref - s_got).abs().mean()), 6),
        "box_max_abs": round(float((ref["pred_boxes"] - got["pred_boxes"]).abs().max()), 5),
        "mask_iou_min": round(float((inter / union).min()), 4),
        "mask_iou_mean": round(float((inter / union).mean()), 5),
        "top10_same": round(float((best == s_got.topk(10, dim=1).indices).float().mean()), 4),
        "score_ref_max": round(float(s_ref.max()), 4),
    }


def _of_peak(tflop_per_s: float) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return round(tflop_per_s / peak, 3) if peak else None


if __name__ == "__main__":
    main()
