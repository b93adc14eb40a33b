"""Several text prompts of one sub-batch in one pass of SAM3's prompt-side decoders.

The vision encoder runs once per image; what runs once per prompt is the rest of the model (the
DETR encoder and decoder, the scoring and the mask decoder). Run prompt by prompt, each of those
passes sees B rows (the sub-batch's images) and launches the same few hundred small kernels
again. Here the images' vision features are repeated once per prompt and the prompts' text
features stacked beside them, so one pass sees P x B rows: prompt p's image b is row p * B + b
(prompt-major, so each prompt's outputs are one contiguous slice). A row sees only its own image
and its own prompt (nothing in SAM3 mixes the rows of a batch), so each prompt's outputs are the
ones its own pass gives, up to the rounding of kernels picked for another row count
(tests/test_prompt_rows.py compares them).

Prompts with exemplar boxes are not batched here: their geometry tokens differ per image and per
prompt (``exemplar_boxes.forward_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["MAX_DECODER_ROWS", "forward_texts", "prompts_per_pass"]

#: Rows (images x prompts) in one decoder pass at most. The decoders' activations grow with the
#: rows (about 0.1 GiB a row at SAM3's size: docs/performance.md), and the batch planned from free
#: memory counts one prompt: so a pass takes at most this many rows, and never fewer prompts than
#: one. Four prompts of a sub-batch of 16 go in one pass.
MAX_DECODER_ROWS = 64


def prompts_per_pass(batch: int) -> int:
    """How many prompts of a sub-batch of ``batch`` images one decoder pass takes."""
    return max(1, MAX_DECODER_ROWS // max(1, batch))


def forward_texts(model: Any, vision: Any, texts: Sequence[Any], batch: int) -> list[Any]:
    """``Sam3Model.forward`` of every prompt in ``texts`` (``pipeline.PromptText``s) on the vision
    features of ``batch`` images, in one pass; one output per prompt, in order, each with the
    ``pred_logits``, ``presence_logits``, ``pred_boxes`` and ``pred_masks`` of its ``batch`` rows.
    Prompts whose token counts differ run in separate passes (their text features would not stack)."""
    if len(texts) == 1:
        return [_forward(model, vision, texts, batch)]
    found: dict[int, Any] = {}
    for group in _same_length(texts):
        outputs = _forward(model, _repeated(vision, len(group)), [texts[i] for i in group], batch)
        found.update((i, _rows(outputs, k * batch, batch)) for k, i in enumerate(group))
    return [found[i] for i in range(len(texts))]


def _forward(model: Any, vision: Any, texts: Sequence[Any], batch: int) -> Any:
    features = torch.cat([text.features.expand(batch, -1, -1) for text in texts])
    mask = torch.cat([text.attention_mask.expand(batch, -1) for text in texts])
    text = SimpleNamespace(pooler_output=features)
    return model(vision_embeds=vision, text_embeds=text, attention_mask=mask)


def _same_length(texts: Sequence[Any]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(tuple(text.features.shape[1:]), []).append(i)
    return list(groups.values())


def _repeated(vision: Any, times: int) -> Any:
    """The vision features the decoders read, each image's repeated ``times`` over (prompt-major).
    The backbone's last hidden state is not read after the vision encoder and is left out."""
    if times == 1:
        return vision

    def repeat(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.repeat(times, *([1] * (value.dim() - 1)))
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    fields = {key: repeat(value) for key, value in vision.items() if key != "last_hidden_state"}
    return type(vision)(**fields)


def _rows(outputs: Any, start: int, count: int) -> SimpleNamespace:
    """One prompt's slice of a pass's outputs: what ``postprocess.score_outputs`` reads."""
    names = ("pred_logits", "presence_logits", "pred_boxes", "pred_masks")
    sliced = {}
    for name in names:
        value = getattr(outputs, name)
        sliced[name] = None if value is None else value[start : start + count]
    return SimpleNamespace(**sliced)
