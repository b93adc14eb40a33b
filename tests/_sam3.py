"""Helpers for the tests that run the tiny SAM3 in the test process itself (model, post-processing,
engine). The checkpoint comes from conftest's session fixture ``tiny_model``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from batchseg.records import ItemResult


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels: gives the random model varied outputs."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_noise_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(width, height, seed).save(path)
    return path


def forward(model: Any, processor: Any, image: Image.Image, prompt: str) -> tuple[Any, list[list[int]]]:
    """One plain library forward (processor + model), the reference the engine must match."""
    import torch

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(
            pixel_values=inputs["pixel_values"].to(model.dtype),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )
    return outputs, inputs["original_sizes"].tolist()


def quiet(finished: Sequence[tuple[int, ItemResult]] = (), reached: int | None = None) -> None:
    """A heartbeat that listens to nothing: an engine's ``process`` always gets one."""
