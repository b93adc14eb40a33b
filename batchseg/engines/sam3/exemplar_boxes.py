"""Exemplar boxes in the SAM3 engine: each read image gets its boxes per prompt, and a prompt's
forward pass takes them with its cached text features (``Sam3Model.forward(input_boxes=...,
input_boxes_labels=...)``: boxes as (cx, cy, w, h) over the image's size, labels 1 positive, 0
negative, -10 padding, as ``Sam3Processor`` makes them).

One forward per prompt and sub-batch takes every image that has boxes for the prompt; images of
the same sub-batch without boxes run text-only in a second forward, so an image's detections never
depend on its neighbours (the geometry encoder adds a token even for an image whose boxes are all
padding). A prompt named only by the exemplar file runs on the images holding one of its boxes
only; the others get no detection of it. See ``batchseg.exemplars`` for where a box applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from ... import imageio
from ...exemplars import ExemplarSet, Placed, within
from ...records import Item
from ...worker.reading import georef_of
from .features import Box, Boxes, TextEmbeds
from .postprocess import Scored

__all__ = ["EXEMPLARS_KEY", "VISUAL_TEXT", "Placer", "forward_prompt", "nothing_scored"]

#: ``image.info`` key of a read image: its boxes per prompt index, in the image's own pixels.
EXEMPLARS_KEY = "batchseg_exemplars"
#: The text SAM3 reads with boxes alone (``Sam3Processor``'s word for a visual prompt).
VISUAL_TEXT = "visual"
#: Label of a padding row (``Sam3Model.forward``'s convention).
PAD_LABEL = -10


@dataclass
class Placer:
    """The boxes of each item's image, per prompt index of the engine's prompts."""

    exemplars: ExemplarSet
    prompts: Sequence[str]  # the engine's prompts, in order
    text_prompts: Sequence[str]  # --prompt
    input_root: Path

    def __post_init__(self) -> None:
        self._georefs: dict[str, Any] = {}

    def boxes(self, item: Item, image: Image.Image, whole_size: tuple[int, int] | None) -> Boxes:
        """``image`` is the item's image, or its window when ``whole_size`` (the whole image's
        width and height) is given; boxes a window does not hold whole are left out."""
        if item.window is None:
            width, height = imageio.original_size(image)
            placed = self.exemplars.place(item.path, width, height, georef_of(image))
            frame: list[tuple[Placed, Box | None]] = [(p, p.box) for p in placed]
        else:
            width, height = whole_size or image.size
            placed = self.exemplars.place(item.path, width, height, self._georef(item.path))
            frame = [(p, within(p.box, item.window)) for p in placed]
        found: Boxes = {}
        for index, prompt in enumerate(self.prompts):
            mine = {id(p) for p in self.exemplars.for_prompt(placed, prompt, self.text_prompts)}
            boxes = [(box, p.positive) for p, box in frame if box is not None and id(p) in mine]
            if boxes:
                found[index] = boxes
        return found

    def _georef(self, rel: str) -> Any:
        if not self.exemplars.map_coordinates:
            return None
        if rel not in self._georefs:
            from ...geo.georef import read_georef

            self._georefs = {rel: read_georef(self.input_root / rel)}  # one image's tiles at a time
        return self._georefs[rel]


def box_tensors(
    per_image: Sequence[list[tuple[Box, bool]]],
    sizes: Sequence[tuple[int, int]],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_boxes`` (B, N, 4) as (cx, cy, w, h) over each image's (height, width) and
    ``input_boxes_labels`` (B, N), padded with ``PAD_LABEL``: what ``Sam3Processor`` gives."""
    most = max(len(boxes) for boxes in per_image)
    coords = torch.zeros((len(per_image), most, 4), dtype=torch.float32)
    labels = torch.full((len(per_image), most), PAD_LABEL, dtype=torch.int64)
    for b, (boxes, (height, width)) in enumerate(zip(per_image, sizes, strict=True)):
        for n, ((x0, y0, x1, y1), positive) in enumerate(boxes):
            coords[b, n] = torch.tensor(
                [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
            )
            labels[b, n] = 1 if positive else 0
    return coords.to(device, dtype), labels.to(device)


def take_rows(vision: Any, rows: Sequence[int]) -> Any:
    """The vision features of some images of a batch (a ``Sam3VisionEncoderOutput`` of them)."""
    index = torch.tensor(list(rows), device=vision.fpn_hidden_states[0].device)

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(pick(v) for v in value)
        return value

    return type(vision)(**{key: pick(value) for key, value in vision.items()})


def merge_rows(parts: Sequence[tuple[Sequence[int], Any]], batch: int) -> SimpleNamespace:
    """The outputs ``score_outputs`` reads, for the whole batch from forwards of some of its rows;
    a row no forward covered scores nothing (logits of -inf)."""
    merged: dict[str, torch.Tensor | None] = {}
    template = parts[0][1]
    for name in ("pred_logits", "presence_logits", "pred_boxes", "pred_masks"):
        first = getattr(template, name)
        if first is None:
            merged[name] = None
            continue
        fill = float("-inf") if name != "pred_boxes" and name != "pred_masks" else 0.0
        whole = torch.full((batch, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
        for rows, outputs in parts:
            index = torch.tensor(list(rows), device=first.device)
            whole.index_copy_(0, index, getattr(outputs, name))
        merged[name] = whole
    return SimpleNamespace(**merged)


def forward_prompt(
    model: Any,
    vision: Any,
    text: Any,
    per_image: Sequence[Boxes],
    index: int,
    sizes: Sequence[tuple[int, int]],
    boxes_only: bool,
    dtype: torch.dtype,
) -> Any:
    """Prompt ``index`` (``text``: its ``PromptText``) on a sub-batch's vision features, each image's
    boxes with it; None when no image of the sub-batch runs it (``nothing_scored`` then)."""
    batch = len(sizes)
    with_boxes = [b for b in range(batch) if per_image[b].get(index)]
    without = [] if boxes_only else [b for b in range(batch) if not per_image[b].get(index)]
    parts = []
    for rows, boxed in ((with_boxes, True), (without, False)):
        if not rows:
            continue
        features = vision if len(rows) == batch else take_rows(vision, rows)
        extra = {}
        if boxed:
            device = vision.fpn_hidden_states[0].device
            boxes, labels = box_tensors(
                [per_image[b][index] for b in rows], [sizes[b] for b in rows], device, dtype
            )
            extra = {"input_boxes": boxes, "input_boxes_labels": labels}
        outputs = model(
            vision_embeds=features,
            text_embeds=TextEmbeds(text.features.expand(len(rows), -1, -1)),
            attention_mask=text.attention_mask.expand(len(rows), -1),
            **extra,
        )
        if len(rows) == batch:
            return outputs
        parts.append((rows, outputs))
    return merge_rows(parts, batch) if parts else None


def nothing_scored(index: int, batch: int, device: torch.device) -> Scored:
    """A prompt that ran on no image of the sub-batch: no candidate in any of them (its masks are
    of no size the model gives: ``postprocess.merge`` leaves a part without candidates out)."""
    empty = torch.zeros((batch, 1))
    masks = torch.zeros((batch, 1, 1, 1), device=device)
    return Scored(index, empty, empty > 0, torch.zeros((batch, 1, 4)), masks)
