"""An engine defined outside batchseg, loaded with ``--engine stripe_engine:load`` (tests/ on the path).

Each image is cut into as many horizontal bands as there are prompts; band k is detection k of
prompt k, so every mask is known exactly. An image whose name starts with ``unwritable`` reports
that the output folder failed (``FailureCategory.OUTPUT``), as an engine does when it cannot save.
It streams each result through the heartbeat, as the contract allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from batchseg import imageio, rle
from batchseg.errors import InvalidImageError
from batchseg.records import Detection, FailureCategory, Item, ItemResult, Status, failure_result
from batchseg.supervise.contract import Capabilities, EngineSpec, HeartbeatFn


def bands(height: int, width: int, count: int) -> np.ndarray:
    """The label map: rows split into ``count`` bands as even as integer division makes them."""
    edges = np.linspace(0, height, count + 1).astype(int)
    labels = np.zeros((height, width), np.uint16)
    for k in range(count):
        labels[edges[k] : edges[k + 1]] = k + 1
    return labels


class StripeEngine:
    def __init__(self, spec: EngineSpec) -> None:
        self.config = spec.config
        self.capabilities = Capabilities(device="cpu stripes", task_size=3, heartbeat_every=1)

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[ItemResult]:
        results = []
        for k, item in enumerate(items):
            heartbeat((), k + 1)
            results.append(self._one(item))
            heartbeat([(k, results[-1])])
        return results

    def close(self) -> None:
        pass

    def _one(self, item: Item) -> ItemResult:
        if Path(item.path).name.startswith("unwritable"):
            exc = OSError(f"cannot write the mask of {item.path}")
            return failure_result(item, Status.ERROR, exc=exc, category=FailureCategory.OUTPUT)
        try:
            image = imageio.read_image(Path(self.config.input) / item.path, self.config.max_pixels)
        except InvalidImageError as exc:
            return failure_result(item, Status.INVALID_INPUT, exc=exc)
        labels = bands(image.height, image.width, len(self.config.prompts))
        mask_path = imageio.mask_relpath(item.path)
        imageio.save_label_map(imageio.safe_output_path(self.config.output_dir, mask_path), labels)
        counts = rle.encode_labels(labels, n_labels=len(self.config.prompts))
        detections = []
        for k, prompt in enumerate(self.config.prompts, start=1):
            rows = np.nonzero((labels == k).any(axis=1))[0]
            box = (0.0, float(rows.min()), float(image.width), float(rows.max() + 1))
            detections.append(Detection(prompt, k, 1.0, box, int((labels == k).sum()), counts[k]))
        return ItemResult(
            item.path,
            Status.OK,
            width=image.width,
            height=image.height,
            detections=detections,
            mask_path=mask_path,
        )


def load(spec: EngineSpec, slot: int) -> StripeEngine:
    return StripeEngine(spec)
