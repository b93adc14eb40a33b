"""The cost of each further prompt on the model side: the vision encoder once per image, then the
prompt-side decoders (DETR encoder and decoder, scoring, mask decoder) once per prompt, run prompt
by prompt as batchseg runs them (``apart``) or with the prompts sharing one pass (``shared``: the
vision features repeated once per prompt, P x B rows in one pass).

    python benchmarks/prompts.py --device cuda --batch-size 16      # full-size SAM3, random weights

Prints one JSON object (also written to ``--work``/prompts.json):
- ``vision_ms``: the vision encoder per image, as batchseg runs it (CUDA graph, fused rotary embedding);
- per prompt count P (1, 2, 4): the decoders' time per image, prompt by prompt (``apart``) and in
  shared passes (``shared``), the model's whole time per image either way and what each P costs
  over one prompt (``extra``), the peak memory of the shared pass;
- ``parts_ms``: one prompt's decoders per image, by module (CUDA events around each);
- ``kernels``: the decoders' 15 longest kernel kinds over one pass of one prompt (torch profiler);
- ``agreement``: shared against apart on the same features (largest score and box difference,
  smallest mask IoU of the 20 best queries of each image and prompt).

``--compile`` first compiles the prompt-side modules as ``batchseg run --compile`` does
(``speedups.compile_decoders``: ``PARTS`` but the pixel decoder, which the mask decoder holds) and
reports the seconds their first pass took (``compile_s``), their agreement
with the eager modules (``compiled_agreement``) and their time at the full batch before
(``static_ms``) and after (``after_short_sizes_ms``) passes at half the batch and at one image
(which make the batch size dynamic), as the engine's warm-up leaves them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from throughput import PROMPTS, build_model, make_images  # noqa: E402

PARTS = ("detr_encoder", "detr_decoder", "dot_product_scoring", "mask_decoder", "mask_decoder.pixel_decoder")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="full", help="full (full-size, random weights), tiny or a folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--compile", action="store_true", help="compile the decoders as --compile does")
    args = parser.parse_args()
    report = measure(args)
    print(json.dumps(report, indent=1))
    (args.work / "prompts.json").write_text(json.dumps(report, indent=1))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from batchseg.engines.sam3.features import PromptText
    from batchseg.engines.sam3.model import load_model, resolve_dtype
    from batchseg.engines.sam3.speedups import speed_up

    args.work.mkdir(parents=True, exist_ok=True)
    dtype, _ = resolve_dtype(args.device, args.dtype)
    model, processor = load_model(str(build_model(args.model, args.work / "models")), args.device, dtype)
    device = torch.device(args.device)
    speed_up(model, device, args.batch_size, compile=False, cuda_graphs=True, fuse=True, gelu=True)
    folder = make_images(args.work / "images-2048x1536", args.batch_size, (2048, 1536))
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))[: args.batch_size]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, getattr(torch, dtype))
    texts = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            tokens = processor(text=prompt, return_tensors="pt").to(device)
            features = model.get_text_features(**tokens).pooler_output
            texts.append(PromptText(prompt, features, tokens["attention_mask"]))
        vision_s = _timed(lambda: model.get_vision_features(pixel_values=pixels), args)
        vision = model.get_vision_features(pixel_values=pixels)
        batch = args.batch_size
        report: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": dtype,
            "batch": batch,
            "vision_ms": round(1000 * vision_s / batch, 3),
            "counts": {},
        }
        if args.compile:
            report.update(_compile_decoders(model, vision, texts[:1], batch))
        one = None
        for count in (int(c) for c in args.counts.split(",")):
            chosen = texts[:count]

            def apart(chosen: list[Any] = chosen) -> Any:
                return [forward_texts(model, vision, [t], batch)[0] for t in chosen]

            def shared(chosen: list[Any] = chosen) -> Any:
                return forward_texts(model, vision, chosen, batch)

            apart_s = _timed(apart, args)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            shared_s = _timed(shared, args)
            total = {"apart": vision_s + apart_s, "shared": vision_s + shared_s}
            one = one or total
            report["counts"][count] = {
                "apart_ms": round(1000 * apart_s / batch, 3),
                "shared_ms": round(1000 * shared_s / batch, 3),
                "img_per_s": {k: round(batch / v, 1) for k, v in total.items()},
                "extra": {k: round(v / one[k] - 1, 3) for k, v in total.items()},
                "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda"
                else None,
            }
            if count > 1:
                report["counts"][count]["agreement"] = _agreement(apart(), shared())

        def one_prompt() -> Any:
            return forward_texts(model, vision, texts[:1], batch)

        if not args.compile:  # a compiled module's forward hooks do not all run
            report["parts_ms"] = _parts(model, one_prompt, batch)
        report["kernels"] = _kernels(one_prompt, batch)
    return report


def _compile_decoders(model: Any, vision: Any, texts: list[Any], batch: int) -> dict[str, Any]:
    """Compile the prompt-side modules in place; the first compiled pass's seconds, how the
    compiled pass agrees with the eager one on the same features, and its time before and after
    passes at other batch sizes."""
    from batchseg.engines.sam3.speedups import compile_decoders

    eager = forward_texts(model, vision, texts, batch)
    compile_decoders(model)
    _sync()
    start = time.perf_counter()
    compiled = forward_texts(model, vision, texts, batch)
    _sync()
    report = {
        "compile_s": round(time.perf_counter() - start, 1),
        "compiled_agreement": _agreement(eager, compiled),
    }
    # The engine's warm-up also runs half a batch and one image (the batch size then dynamic);
    # the passes measured after this run on what that leaves, as in the engine.
    one = SimpleNamespace(iters=5)
    report["static_ms"] = round(
        1000 * _timed(lambda: forward_texts(model, vision, texts, batch), one) / batch, 3
    )
    start = time.perf_counter()
    for n in (batch // 2, 1):
        forward_texts(model, _rows(vision, n), texts, n)
    _sync()
    report["short_sizes_compile_s"] = round(time.perf_counter() - start, 1)
    report["after_short_sizes_ms"] = round(
        1000 * _timed(lambda: forward_texts(model, vision, texts, batch), one) / batch, 3
    )
    return report


def _rows(vision: Any, n: int) -> Any:
    """The vision features of the first ``n`` images."""
    fields = {k: v for k, v in vision.items() if k != "last_hidden_state"}
    cut = {k: tuple(t[:n] for t in v) if isinstance(v, tuple) else v[:n] for k, v in fields.items()}
    return type(vision)(**cut)


def forward_texts(model: Any, vision: Any, texts: list[Any], batch: int) -> list[Any]:
    """``Sam3Model.forward`` of the prompts ``texts`` on the vision features of ``batch`` images in
    one pass (prompt p's image b is row p * B + b); one output per prompt (its rows)."""
    import torch

    if len(texts) > 1:
        fields = {k: v for k, v in vision.items() if k != "last_hidden_state"}
        vision = type(vision)(**{k: _repeat(v, len(texts)) for k, v in fields.items()})
    features = torch.cat([t.features.expand(batch, -1, -1) for t in texts])
    mask = torch.cat([t.attention_mask.expand(batch, -1) for t in texts])
    out = model(
        vision_embeds=vision, text_embeds=SimpleNamespace(pooler_output=features), attention_mask=mask
    )
    names = ("pred_logits", "presence_logits", "pred_boxes", "pred_masks")
    return [
        SimpleNamespace(**{n: getattr(out, n)[p * batch : (p + 1) * batch] for n in names})
        for p in range(len(texts))
    ]


def _repeat(value: Any, times: int) -> Any:
    if isinstance(value, tuple):
        return tuple(_repeat(v, times) for v in value)
    return value.repeat(times, *([1] * (value.dim() - 1)))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(run: Any, args: argparse.Namespace) -> float:
    """Median seconds of ``run`` over ``--iters`` after three warm-up calls."""
    times = []
    for i in range(3 + args.iters):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _parts(model: Any, run: Any, batch: int) -> dict[str, float]:
    """Milliseconds per image in each module of ``PARTS`` during ``run`` (CUDA events)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    events: dict[str, list[Any]] = {name: [] for name in PARTS}
    handles = []
    for name in PARTS:
        module = model.get_submodule(name)

        def before(_m: Any, _a: Any, name: str = name) -> None:
            events[name].append(torch.cuda.Event(enable_timing=True))
            events[name][-1].record()

        def after(_m: Any, _a: Any, _o: Any, name: str = name) -> None:
            events[name].append(torch.cuda.Event(enable_timing=True))
            events[name][-1].record()

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    run()
    for name in PARTS:
        events[name].clear()
    run()
    torch.cuda.synchronize()
    for handle in handles:
        handle.remove()
    return {
        name: round(sum(a.elapsed_time(b) for a, b in zip(e[::2], e[1::2], strict=True)) / batch, 3)
        for name, e in events.items()
    }


def _kernels(run: Any, batch: int) -> list[tuple[str, float]]:
    import torch

    if not torch.cuda.is_available():
        return []
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = [(e.key[:90], e.device_time_total / 1000 / batch) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    total = sum(t for _, t in rows)
    return [("total", round(total, 3))] + [(k, round(t, 3)) for k, t in rows[:15]]


def _agreement(apart: list[Any], shared: list[Any]) -> dict[str, float]:
    score = box = 0.0
    iou = 1.0
    for a, s in zip(apart, shared, strict=True):
        sa, ss = a.pred_logits.float().sigmoid(), s.pred_logits.float().sigmoid()
        score = max(score, float((sa - ss).abs().max()))
        box = max(box, float((a.pred_boxes.float() - s.pred_boxes.float()).abs().max()))
        top = sa.topk(20, dim=1).indices
        for b in range(top.shape[0]):
            ma = a.pred_masks[b, top[b]] > 0
            ms = s.pred_masks[b, top[b]] > 0
            inter = (ma & ms).flatten(1).sum(1).float()
            union = (ma | ms).flatten(1).sum(1).float().clamp(min=1)
            iou = min(iou, float((inter / union).min()))
    return {"max_score_diff": round(score, 5), "max_box_diff": round(box, 5), "min_mask_iou": round(iou, 4)}


if __name__ == "__main__":
    main()
