"""An engine defined outside batchseg, loaded with ``--engine stripe_engine:load`` (tests/ on the path).

Each image is cut into as many horizontal bands as there are prompts; band k is detection k of
prompt k, so every mask is known exactly. It streams each outcome through the heartbeat, as the
contract allows, and writes nothing: the worker writes the label maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from batchseg import imageio
from batchseg.errors import InvalidImageError
from batchseg.records import Item, Status, failure_result
from batchseg.worker.contract import Capabilities, EngineSpec, HeartbeatFn, Instance, Outcome, Segmentation


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

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        results = []
        for k, item in enumerate(items):
            heartbeat((), k + 1)
            results.append(self._one(item))
            heartbeat([(k, results[-1])])
        return results

    def close(self) -> None:
        pass

    def _one(self, item: Item) -> Outcome:
        try:
            image = imageio.read_image(Path(self.config.input) / item.path, self.config.max_pixels)
        except InvalidImageError as exc:
            return failure_result(item, Status.INVALID_INPUT, exc=exc)
        labels = bands(image.height, image.width, len(self.config.prompts))
        instances = []
        for k, prompt in enumerate(self.config.prompts, start=1):
            rows = np.nonzero((labels == k).any(axis=1))[0]
            box = (0.0, float(rows.min()), float(image.width), float(rows.max() + 1))
            instances.append(Instance(prompt, 1.0, box))
        return Segmentation(labels, instances)


def load(spec: EngineSpec, slot: int) -> StripeEngine:
    return StripeEngine(spec)
