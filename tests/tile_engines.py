"""Engines whose tiles disagree as a model's do, for ``python -m batchseg run --engine tile_engines:F``.

    misses_below  the colour-threshold engine (each prompt a colour), except that every tile below
                  the image's top row of tiles (its window starts lower than y = 0) finds nothing:
                  an object on the seam of the first two rows is reported only by the upper tiles,
                  cut at their bottom edge, while the lower tiles, which own its pixels, missed it.

Module-level factories and light imports, so spawned workers find them by name and start fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from batchseg.engines import threshold
from batchseg.records import Item
from batchseg.worker.contract import EngineSpec, HeartbeatFn, Outcome, Segmentation


class MissesBelow:
    """The colour engine, blind in every tile but the top row's."""

    def __init__(self, inner: threshold.ThresholdEngine) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        results = []
        for k, item in enumerate(items):
            heartbeat((), k + 1)
            results.append(self._one(item))
            heartbeat([(k, results[-1])])  # the tiles' detections travel with the heartbeat too
        return results

    def _one(self, item: Item) -> Outcome:
        found = self.inner.one(item)
        if item.window is not None and item.window[1] > 0 and isinstance(found, Segmentation):
            return replace(found, labels=np.zeros_like(found.labels), instances=[], areas=None)
        return found

    def close(self) -> None:
        self.inner.close()


def misses_below(spec: EngineSpec, slot: int) -> MissesBelow:
    return MissesBelow(threshold.load(spec, slot))
