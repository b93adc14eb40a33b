"""The colour-threshold engine, except that a batch holding one chosen window raises.

``--engine poison_engine:load`` (tests/ on PYTHONPATH); the window is ``x0,y0`` in the
environment variable ``BATCHSEG_TEST_POISON``: any item whose window starts there makes
``process`` raise, so the worker must rerun that batch's tiles alone and fail the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from batchseg.engines.threshold import ThresholdEngine
from batchseg.engines.threshold import load as load_threshold
from batchseg.records import Item, ItemResult
from batchseg.supervise.contract import EngineSpec, HeartbeatFn


class PoisonEngine:
    def __init__(self, inner: ThresholdEngine, poison: tuple[int, int]) -> None:
        self.inner, self.poison = inner, poison
        self.capabilities = inner.capabilities

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[ItemResult]:
        for item in items:
            if item.window is not None and item.window[:2] == self.poison:
                raise RuntimeError(f"poisoned window {item.window}")
        return self.inner.process(items, heartbeat)

    def close(self) -> None:
        self.inner.close()


def load(spec: EngineSpec, slot: int) -> PoisonEngine:
    x0, y0 = (int(v) for v in os.environ["BATCHSEG_TEST_POISON"].split(","))
    return PoisonEngine(load_threshold(spec, slot), (x0, y0))
