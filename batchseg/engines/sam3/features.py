"""What the engine's encoders give and its decoders take: a prompt's text features, a sub-batch's
vision features (with its images' sizes, exemplar boxes and padding rows)."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

__all__ = ["Box", "Boxes", "EncodedImages", "PromptText", "TextEmbeds"]

Box = tuple[float, float, float, float]
#: Per prompt index: the boxes (pixel edges in the image's frame) and whether each is positive.
Boxes = dict[int, list[tuple[Box, bool]]]


@dataclass
class PromptText:
    """One prompt's text features, computed once per worker and reused for every image."""

    prompt: str
    features: torch.Tensor  # (1, tokens, hidden): the text encoder output after projection
    attention_mask: torch.Tensor  # (1, tokens)


@dataclass
class EncodedImages:
    """Vision features of a batch of images, with each image's original (height, width)."""

    vision: Any  # Sam3VisionEncoderOutput
    sizes: list[tuple[int, int]]
    _: KW_ONLY  # the rest by name: a list given in the wrong place would pass unseen
    done: Any = None  # torch.cuda.Event recorded after the vision encoder's work, on a GPU
    boxes: list[Boxes] = field(default_factory=list)  # each image's exemplar boxes per prompt
    #: Images the batch holds; rows past it pad a short sub-batch (``Sam3Engine.pad_rows``) and
    #: are decoded but never post-processed. None: every row is an image.
    real: int | None = None

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """The sizes of the batch's images, padding rows left out."""
        return self.sizes[: self.real]


class TextEmbeds:
    """What ``Sam3Model.forward(text_embeds=...)`` reads: an object with ``pooler_output``."""

    def __init__(self, pooler_output: torch.Tensor) -> None:
        self.pooler_output = pooler_output
