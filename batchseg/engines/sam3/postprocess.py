"""From raw SAM3 outputs to one uint16 label map per image, in bounded memory.

``Sam3Processor.post_process_instance_segmentation`` upsamples every kept mask to full size as int64
(docs/performance.md has what that costs). Here the same arithmetic runs in another order, on a
batch's outputs (``score_outputs``), per image (``choose``, ``merge``, ``compose``):

1. per prompt: score = sigmoid(logit) * sigmoid(presence) (the library's formula, in the model's dtype),
   keep score > threshold, then the ``max_detections`` best: no mask is touched yet;
2. all prompts together: detections sorted by descending score (ties: prompt order, then query
   order) and numbered 1..N; N is the detection's value in the label map and its ``index`` in the
   manifest, so label 1 is the most confident detection of the image;
3. masks upsampled in chunks of at most ``chunk_bytes`` (sigmoid, bilinear ``align_corners=False``
   to the original size, ``> mask_threshold``: exactly the library's operations), and painted in
   label order onto pixels still free: on overlap the higher score wins.

On CPU each mask is upsampled on its own: PyTorch's CPU bilinear kernel can round a pixel
differently depending on how many masks one call holds (docs/performance.md), and one mask a call
gave the library's pixels on every machine tried. CUDA computes each output pixel alone, so chunks
are safe there.

The pixel area of each label is counted on the final map (a detection covered entirely by better ones
has area 0 here; the worker's writer drops it and renumbers, ``writer.drop_unpainted``). Boxes are
the model's boxes scaled to original pixels like the library's,
then clipped to the image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK_BYTES",
    "MAX_LABELS",
    "Candidates",
    "ImageSegmentation",
    "Instance",
    "Scored",
    "choose",
    "compose",
    "compose_many",
    "fold",
    "iter_masks",
    "merge",
    "score_outputs",
]

#: Upper bound of the float buffer used to upsample masks (per chunk of masks).
CHUNK_BYTES = 64 * 1024 * 1024
#: The same on CUDA: fewer, larger chunks (four times fewer kernel launches per image).
CUDA_CHUNK_BYTES = 256 * 1024 * 1024
#: uint16 label map: 0 is background, so at most 65535 detections per image.
MAX_LABELS = 65535


@dataclass(frozen=True)
class Instance:
    """One kept detection before its mask is painted."""

    prompt_index: int
    query: int  # index among the model's queries, for tracing back to raw outputs
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels, clipped
    folded: tuple[int, ...] = ()  # prompts whose detection of this object was folded into it


@dataclass
class Candidates:
    """Kept detections with their low-resolution mask logits, row i belonging to ``instances[i]``."""

    instances: list[Instance]
    masks: torch.Tensor  # (n, h, w) mask logits in the model's dtype and on its device


@dataclass
class ImageSegmentation:
    """Result for one image: ``instances[k - 1]`` is the detection drawn with value k in ``labels``."""

    labels: np.ndarray  # uint16 (H, W); 0 = background
    instances: list[Instance]
    areas: np.ndarray  # int64 (N,): pixels of label k at areas[k - 1]


@dataclass
class Scored:
    """One prompt's scores and boxes for a batch of images (``score_outputs``), row b for image b.
    On a GPU, ``scores``, ``above`` and ``boxes`` are copies in pinned host memory, complete once
    ``ready`` (a CUDA event) has passed; ``masks`` stay on the device."""

    prompt_index: int
    scores: torch.Tensor  # (B, Q) in the model's dtype
    above: torch.Tensor  # (B, Q) bool: score > threshold, compared where the model ran
    boxes: torch.Tensor  # (B, Q, 4) xyxy in original-image pixels, not yet clipped
    masks: torch.Tensor  # (B, Q, h, w) mask logits
    ready: Any = None  # torch.cuda.Event, or None when the tensors are usable at once


def score_outputs(
    outputs: Any, prompt_index: int, sizes: Sequence[tuple[int, int]], threshold: float
) -> Scored:
    """Scores, threshold test and scaled boxes of a batched ``Sam3ImageSegmentationOutput`` (one
    prompt, B images of original (height, width) ``sizes``), computed where the outputs are, with
    the library's operations and dtypes (a CPU and a CUDA comparison of a bfloat16 score with the
    threshold can differ, so it is made on the model's device). On CUDA the small tensors are
    then copied to pinned host memory without waiting: nothing here stalls the GPU."""
    scores = outputs.pred_logits.sigmoid()
    if outputs.presence_logits is not None:
        scores = scores * outputs.presence_logits.sigmoid()  # (B, Q) * (B, 1)
    # Same operation and dtype as the library's _scale_boxes: (Q, 4) * int64 [w, h, w, h].
    scale = torch.tensor([[w, h, w, h] for h, w in sizes])
    if outputs.pred_boxes.device.type == "cuda":  # a plain copy would make the host wait
        scale = scale.pin_memory().to(outputs.pred_boxes.device, non_blocking=True)
    boxes = outputs.pred_boxes * scale[:, None, :]
    scored = Scored(prompt_index, scores, scores > threshold, boxes, outputs.pred_masks)
    if scores.device.type == "cuda":
        scored.scores, scored.above, scored.boxes = (
            _to_pinned(t) for t in (scored.scores, scored.above, scored.boxes)
        )
        scored.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        scored.ready.record()
    return scored


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def choose(scored: Scored, b: int, height: int, width: int, max_detections: int) -> Candidates:
    """Score filter and top-k of image ``b``, best first, decided on the host copies; only the
    kept rows of the low-resolution masks are gathered (on the current stream)."""
    if scored.ready is not None:
        scored.ready.synchronize()  # waits for this batch's outputs only, not for later work
    scores = scored.scores[b]
    keep = torch.nonzero(scored.above[b]).flatten()
    order = torch.sort(scores[keep], descending=True, stable=True).indices[: max(max_detections, 0)]
    keep = keep[order]
    upper = torch.tensor([width, height, width, height], dtype=torch.float64)
    kept_boxes = torch.minimum(scored.boxes[b][keep].double().clamp(min=0), upper)
    instances = [
        Instance(scored.prompt_index, int(q), float(s), (bx[0], bx[1], bx[2], bx[3]))
        for q, s, bx in zip(keep.tolist(), scores[keep].tolist(), kept_boxes.tolist(), strict=True)
    ]
    masks = scored.masks[b]
    return Candidates(instances, masks[keep.to(masks.device)])


def merge(parts: Sequence[Candidates]) -> Candidates:
    """All prompts' candidates of one image in label order: descending score; ties keep the order of
    ``parts`` (prompt order), then each part's own order."""
    instances = [inst for part in parts for inst in part.instances]
    if not parts:
        raise ValueError("merge needs at least one set of candidates")
    # A prompt that ran on no image of the sub-batch (exemplar boxes alone) has no masks of the
    # model's size: parts without candidates add nothing.
    masks = torch.cat([part.masks for part in parts if part.instances] or [parts[0].masks])
    order = sorted(range(len(instances)), key=lambda i: -instances[i].score)  # sorted() is stable
    index = torch.tensor(order, dtype=torch.long, device=masks.device)
    return Candidates([instances[i] for i in order], masks[index])


def fold(candidates: Candidates, iou: float, mask_threshold: float) -> Candidates:
    """One object under one prompt (``--suppress-iou``): a candidate whose mask overlaps a better one
    of another prompt by at least ``iou`` (intersection over union of the low-resolution masks at
    ``mask_threshold``) is folded into it; ``candidates`` come best first (``merge``), so the better
    score keeps the object, a tie the earlier prompt. ``prompting.fold_duplicates`` on the device."""
    instances = candidates.instances
    if len(instances) < 2:
        return candidates
    masks = (candidates.masks.float().sigmoid() > mask_threshold).flatten(1).float()
    inter = masks @ masks.T
    areas = masks.sum(dim=1)
    overlap = (inter / (areas[:, None] + areas[None, :] - inter).clamp(min=1)).cpu()
    touching = (inter > 0).cpu()
    kept: list[int] = []
    folded: dict[int, list[int]] = {}
    for k, inst in enumerate(instances):
        into = next(
            (
                j
                for j in kept
                if instances[j].prompt_index != inst.prompt_index
                and bool(touching[j, k])
                and float(overlap[j, k]) >= iou
            ),
            None,
        )
        if into is None:
            kept.append(k)
        elif inst.prompt_index not in folded.setdefault(into, []):
            folded[into].append(inst.prompt_index)
    if len(kept) == len(instances):
        return candidates
    chosen = [dataclasses.replace(instances[k], folded=tuple(folded.get(k, ()))) for k in kept]
    index = torch.tensor(kept, device=candidates.masks.device)
    return Candidates(chosen, candidates.masks.index_select(0, index))


def compose(
    candidates: Candidates,
    height: int,
    width: int,
    mask_threshold: float,
    chunk_bytes: int | None = None,
    max_masks: int | None = None,
) -> ImageSegmentation:
    """Paint candidates (already in label order) onto a fresh label map: candidate i gets value i+1
    on the pixels of its mask that no earlier candidate took. ``max_masks`` caps the masks of one
    upsampling call (default: 1 on CPU, see the module docstring; no cap on CUDA)."""
    return compose_many([candidates], [(height, width)], mask_threshold, chunk_bytes, max_masks)[0]


def compose_many(
    candidates: Sequence[Candidates],
    sizes: Sequence[tuple[int, int]],
    mask_threshold: float,
    chunk_bytes: int | None = None,
    max_masks: int | None = None,
) -> list[ImageSegmentation]:
    """``compose`` for several images: every image's work is queued before the one wait for all of
    their label maps, so on a GPU the host neither waits per image nor leaves the device idle."""
    painted = [
        _paint_image(c, h, w, mask_threshold, chunk_bytes, max_masks)
        for c, (h, w) in zip(candidates, sizes, strict=True)
    ]
    if any(p.ready is not None for p in painted):
        for p in painted:
            if p.ready is not None:
                p.ready.synchronize()
    return [p.landed() for p in painted]


@dataclass
class _Painted:
    """One image's label map and areas on their way to the host (``ready``: the copy's event)."""

    instances: list[Instance]
    labels: torch.Tensor
    areas: torch.Tensor
    ready: Any = None

    def landed(self) -> ImageSegmentation:
        labels = self.labels.numpy()
        # int16 on the way (half the bytes of int32): the same bits as uint16 up to 32767 labels.
        label_map = labels.view(np.uint16) if labels.dtype == np.int16 else labels.astype(np.uint16)
        return ImageSegmentation(label_map, self.instances, self.areas.numpy().astype(np.int64))


def _paint_image(
    candidates: Candidates,
    height: int,
    width: int,
    mask_threshold: float,
    chunk_bytes: int | None,
    max_masks: int | None,
) -> _Painted:
    instances = list(candidates.instances)
    if len(instances) > MAX_LABELS:
        raise ValueError(f"{len(instances)} detections do not fit a uint16 label map (at most {MAX_LABELS})")
    if not instances:
        return _Painted(
            [], torch.zeros((height, width), dtype=torch.int16), torch.zeros(0, dtype=torch.int64)
        )
    device = candidates.masks.device
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    # int32 because torch has few uint16 kernels; narrowed once at the end.
    labels = torch.zeros((height, width), dtype=torch.int32, device=device)
    chunks = iter_masks(candidates.masks, height, width, mask_threshold, chunk_bytes, max_masks)
    for start, masks in chunks:
        _paint(labels, masks, first_label=start + 1)
        del masks
    # Areas counted where the map is: on a GPU a host pass over every pixel would hold the thread
    # that keeps the device fed (docs/performance.md, dense case).
    areas = torch.bincount(labels.view(-1), minlength=len(instances) + 1)[1:]
    narrow = labels.to(torch.int16) if len(instances) <= 32767 else labels
    if device.type != "cuda":
        return _Painted(instances, narrow, areas)
    host_labels, host_areas = _to_pinned(narrow), _to_pinned(areas)
    ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
    ready.record()
    return _Painted(instances, host_labels, host_areas, ready)


def iter_masks(
    low_res: torch.Tensor,
    height: int,
    width: int,
    mask_threshold: float,
    chunk_bytes: int = CHUNK_BYTES,
    max_masks: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Full-size boolean masks of (n, h, w) mask logits, a chunk at a time: (first row, (c, H, W)).

    A chunk's float buffer stays under ``chunk_bytes`` (one mask at least) and holds at most
    ``max_masks`` masks (default: 1 on CPU, unlimited on CUDA)."""
    if max_masks is None:
        max_masks = 1 if low_res.device.type == "cpu" else low_res.shape[0]
    per_chunk = max(1, min(max_masks, chunk_bytes // max(1, height * width * low_res.element_size())))
    for start in range(0, low_res.shape[0], per_chunk):
        yield start, _upsample(low_res[start : start + per_chunk], height, width, mask_threshold)


def _upsample(low: torch.Tensor, height: int, width: int, mask_threshold: float) -> torch.Tensor:
    """(n, h, w) mask logits -> (n, H, W) bool: the library's sigmoid, bilinear resize, threshold."""
    probs = low.sigmoid().unsqueeze(0)
    big = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False).squeeze(0)
    return big > mask_threshold


def _paint(labels: torch.Tensor, masks: torch.Tensor, first_label: int) -> None:
    """Give each free pixel the first mask of the chunk that covers it (masks are in label order)."""
    if masks.shape[0] == 1:
        labels.masked_fill_(masks[0] & (labels == 0), first_label)
        return
    # One reduction for the whole chunk instead of a pass per mask: argmax returns the index of
    # the FIRST maximal value (documented), i.e. the best mask covering the pixel.
    as_bytes = masks.view(torch.uint8)
    first = as_bytes.argmax(dim=0).to(torch.int32) + first_label
    free = (labels == 0) & as_bytes.amax(dim=0).bool()
    torch.where(free, first, labels, out=labels)
