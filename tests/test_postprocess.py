"""Post-processing against the library's own post_process_instance_segmentation, on real outputs of
the tiny SAM3 (threshold 0, so every query is a detection), plus the label map composition rules
and a memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sam3 import forward, noise_image

from batchseg.engines.sam3.model import load_model
from batchseg.engines.sam3.postprocess import (
    CHUNK_BYTES,
    MAX_LABELS,
    Candidates,
    ImageSegmentation,
    Instance,
    choose,
    compose,
    iter_masks,
    merge,
    score_outputs,
)

WIDTH, HEIGHT = 131, 77  # neither the model's size nor its aspect ratio


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def loaded(request: pytest.FixtureRequest, tiny_model: Path) -> tuple[Any, Any]:
    return load_model(str(tiny_model), "cpu", request.param)


def kept(outputs: Any, threshold: float, max_detections: int, prompt: int = 0) -> Candidates:
    """The engine's path for one image of WIDTH x HEIGHT: scores of the batch, then its choice."""
    scored = score_outputs(outputs, prompt, [(HEIGHT, WIDTH)], threshold)
    return choose(scored, 0, HEIGHT, WIDTH, max_detections)


def label_map(
    runs: list[Any],
    threshold: float,
    mask_threshold: float,
    max_detections: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> ImageSegmentation:
    """One image's outputs of every prompt (in prompt order) to its label map, as the engine does."""
    parts = [kept(outputs, threshold, max_detections, p) for p, outputs in enumerate(runs)]
    return compose(merge(parts), HEIGHT, WIDTH, mask_threshold, chunk_bytes)


def library_result(processor: Any, outputs: Any, sizes: list[list[int]], mask_threshold: float = 0.5) -> Any:
    return processor.post_process_instance_segmentation(
        outputs, threshold=0.0, mask_threshold=mask_threshold, target_sizes=sizes
    )[0]


def test_scores_boxes_and_masks_equal_the_library(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    outputs, sizes = forward(model, processor, noise_image(WIDTH, HEIGHT, 1), "roof")
    assert sizes == [[HEIGHT, WIDTH]]
    lib = library_result(processor, outputs, sizes)
    cands = kept(outputs, threshold=0.0, max_detections=1000)
    queries = [inst.query for inst in cands.instances]
    assert sorted(queries) == list(range(outputs.pred_logits.shape[1]))
    by_query = np.argsort(queries)  # the library keeps query order; ours is best first
    scores = np.array([inst.score for inst in cands.instances])[by_query]
    assert np.array_equal(scores, lib["scores"].float().numpy())
    boxes = np.array([inst.box for inst in cands.instances])[by_query]
    upper = [WIDTH, HEIGHT, WIDTH, HEIGHT]
    assert np.array_equal(boxes, np.clip(lib["boxes"].double().numpy(), 0, upper))
    chunks = list(iter_masks(cands.masks, HEIGHT, WIDTH, 0.5))
    assert len(chunks) == len(queries)  # one mask per call on CPU
    masks = torch.cat([m for _, m in chunks])[torch.as_tensor(by_query)]
    assert masks.dtype == torch.bool
    assert torch.equal(masks, lib["masks"].bool())
    assert lib["masks"].sum() > 0  # the comparison is not between two empty sets


def test_mask_threshold_is_applied_like_the_library(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    outputs, sizes = forward(model, processor, noise_image(WIDTH, HEIGHT, 2), "tree")
    lib = library_result(processor, outputs, sizes, mask_threshold=0.3)
    cands = kept(outputs, 0.0, 1000)
    by_query = torch.as_tensor(np.argsort([inst.query for inst in cands.instances]))
    masks = torch.cat([m for _, m in iter_masks(cands.masks, HEIGHT, WIDTH, 0.3)])[by_query]
    assert torch.equal(masks, lib["masks"].bool())


def test_threshold_then_top_k_best_first(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    outputs, _ = forward(model, processor, noise_image(WIDTH, HEIGHT, 3), "car")
    everything = kept(outputs, 0.0, 1000).instances
    all_scores = sorted((inst.score for inst in everything), reverse=True)
    cut = all_scores[5]
    above = kept(outputs, threshold=cut, max_detections=1000).instances
    assert [inst.score for inst in above] == [s for s in all_scores if s > cut]
    top3 = kept(outputs, threshold=0.0, max_detections=3)
    assert [inst.score for inst in top3.instances] == all_scores[:3]
    assert top3.masks.shape[0] == 3
    assert kept(outputs, threshold=1.0, max_detections=10).instances == []


def reference_label_map(processor: Any, outputs_by_prompt: list[Any], sizes: list[list[int]]) -> np.ndarray:
    """The composition rule written the obvious way on the library's full-size masks: highest score
    first, a pixel belongs to the first detection that covers it."""
    found = []
    for p, outputs in enumerate(outputs_by_prompt):
        lib = library_result(processor, outputs, sizes)
        masks = lib["masks"].bool().cpu().numpy()
        for score, mask in zip(lib["scores"].float().tolist(), masks, strict=True):
            found.append((score, p, mask))
    found.sort(key=lambda t: -t[0])  # stable: prompt order, then query order on ties
    labels = np.zeros(found[0][2].shape, np.uint16)
    for k, (_, _, mask) in enumerate(found, start=1):
        labels[mask & (labels == 0)] = k
    return labels


def test_label_map_across_prompts_matches_the_obvious_composition(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    image = noise_image(WIDTH, HEIGHT, 4)
    runs = [forward(model, processor, image, prompt) for prompt in ("roof", "solar panel", "tree")]
    sizes = runs[0][1]
    seg = label_map([outputs for outputs, _ in runs], 0.0, 0.5, max_detections=1000)
    expected = reference_label_map(processor, [outputs for outputs, _ in runs], sizes)
    assert seg.labels.dtype == np.uint16 and seg.labels.shape == (HEIGHT, WIDTH)
    assert np.array_equal(seg.labels, expected)
    scores = [inst.score for inst in seg.instances]
    assert scores == sorted(scores, reverse=True)
    assert {inst.prompt_index for inst in seg.instances} == {0, 1, 2}
    assert np.array_equal(seg.areas, np.bincount(seg.labels.ravel(), minlength=len(scores) + 1)[1:])
    assert seg.areas.sum() == (seg.labels > 0).sum() > 0


def test_higher_score_wins_on_overlap() -> None:
    # Hand-made logits: two overlapping squares, the lower-scored one listed first.
    low = torch.full((2, 8, 8), -10.0)
    low[0, 1:6, 1:6] = 10.0  # score 0.6
    low[1, 3:8, 3:8] = 10.0  # score 0.9
    parts = [
        Candidates([Instance(0, 0, 0.6, (0, 0, 1, 1))], low[:1]),
        Candidates([Instance(1, 0, 0.9, (0, 0, 1, 1))], low[1:]),
    ]
    for max_masks in (1, 2):  # painted one by one, and both in one chunk
        seg = compose(merge(parts), 8, 8, mask_threshold=0.5, max_masks=max_masks)
        assert seg.labels[4, 4] == 1  # in both squares: the 0.9 detection (label 1) has it
    assert [inst.score for inst in seg.instances] == [0.9, 0.6]
    assert seg.labels[4, 4] == 1  # in both squares: the 0.9 detection (label 1) has it
    assert seg.labels[1, 1] == 2 and seg.labels[7, 7] == 1 and seg.labels[0, 7] == 0
    assert seg.areas.tolist() == [25, 25 - 9]


def test_equal_scores_keep_prompt_order() -> None:
    low = torch.full((1, 4, 4), 10.0)
    parts = [Candidates([Instance(p, 0, 0.5, (0, 0, 1, 1))], low) for p in (0, 1)]
    seg = compose(merge(parts), 4, 4, 0.5)
    assert [inst.prompt_index for inst in seg.instances] == [0, 1]
    assert seg.areas.tolist() == [16, 0]  # covered entirely, but still a numbered detection


def test_no_detection_gives_an_empty_map() -> None:
    seg = label_map([_fake_outputs(q=5)], threshold=1.0, mask_threshold=0.5, max_detections=10)
    assert seg.labels.shape == (HEIGHT, WIDTH) and not seg.labels.any()
    assert seg.instances == [] and seg.areas.size == 0


def test_too_many_detections_for_uint16() -> None:
    cands = Candidates([Instance(0, 0, 0.5, (0, 0, 1, 1))] * (MAX_LABELS + 1), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="uint16"):
        compose(cands, 2, 2, 0.5)


def _fake_outputs(q: int) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        pred_logits=torch.zeros(1, q),
        presence_logits=torch.zeros(1, 1),
        pred_boxes=torch.rand(1, q, 4),
        pred_masks=torch.zeros(1, q, 16, 16),
    )


MEMORY_PROBE = r"""
import json, resource, sys, numpy as np, torch
from types import SimpleNamespace
from batchseg.engines.sam3.postprocess import choose, compose, merge, score_outputs
torch.manual_seed(0)
n, height, width = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
q = 200
# Blobs of logits so that masks cover real areas (and overlap).
masks = torch.full((q, 288, 288), -4.0)
for i in range(q):
    y, x = torch.randint(0, 240, (2,)).tolist()
    masks[i, y:y + 48, x:x + 48] = 4.0
outputs = SimpleNamespace(  # one image's batch, as the model returns it
    pred_logits=torch.linspace(4, -4, q)[None],
    presence_logits=torch.tensor([[3.0]]),
    pred_boxes=torch.rand(1, q, 4),
    pred_masks=masks[None],
)
def label_map(height, width):  # the engine's path: scores, choice, merge, compose
    scored = score_outputs(outputs, 0, [(height, width)], 0.0)
    return compose(merge([choose(scored, 0, height, width, n)]), height, width, 0.5)
def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024
label_map(64, 64)  # warm up kernels and allocator
before = rss_mb()
seg = label_map(height, width)
covered = int((seg.labels > 0).sum())
print(json.dumps({"extra_peak_mb": rss_mb() - before, "n": len(seg.instances), "covered": covered}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_stays_bounded_on_a_large_image(tmp_path: Path) -> None:
    # A fresh process: the high-water mark of RSS is only meaningful from a clean start.
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    done = subprocess.run(
        [sys.executable, str(script), "8", "3000", "4000"], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n"] == 8 and result["covered"] > 0
    # The library's int64 masks would need 8 x 12 Mpx x 8 B = 770 MB here.
    assert result["extra_peak_mb"] < 300, result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_equal_to_the_library_on_cuda(tiny_model: Path) -> None:
    model, processor = load_model(str(tiny_model), "cuda:0", "bfloat16")
    inputs = processor(images=noise_image(WIDTH, HEIGHT, 5), text="roof", return_tensors="pt").to("cuda:0")
    with torch.inference_mode():
        outputs = model(
            pixel_values=inputs["pixel_values"].to(model.dtype),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )
    sizes = inputs["original_sizes"].tolist()
    lib = library_result(processor, outputs, sizes)
    cands = kept(outputs, 0.0, 1000)
    by_query = np.argsort([inst.query for inst in cands.instances])
    scores = np.array([inst.score for inst in cands.instances])[by_query]
    assert np.array_equal(scores, lib["scores"].float().cpu().numpy())
    chunks = list(iter_masks(cands.masks, HEIGHT, WIDTH, 0.5, chunk_bytes=3 * HEIGHT * WIDTH * 2))
    assert len(chunks) == -(-len(cands.instances) // 3)  # three masks a call on CUDA
    masks = torch.cat([m for _, m in chunks])
    assert masks.device.type == "cuda"
    assert torch.equal(masks[torch.as_tensor(by_query, device="cuda:0")], lib["masks"].bool())
    # Composition with several masks painted per chunk, on the GPU, against the obvious rule.
    seg = label_map([outputs], 0.0, 0.5, 1000, chunk_bytes=3 * HEIGHT * WIDTH * 2)
    assert np.array_equal(seg.labels, reference_label_map(processor, [outputs], sizes))
