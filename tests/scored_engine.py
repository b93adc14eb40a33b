"""The colour engine (``batchseg.engines.threshold``) with scores a test chooses by where it draws:
a detection scores its box's left edge / 256, so a patch drawn at x = 64 scores exactly 0.25.

``--engine scored_engine:load`` (tests/ on the path). Loading waits the setting ``load_s``
(``fault_engine.write_settings``) seconds first, so a run lasts at least that long: its log's start
and end stamps (whole seconds) differ.
Masks, label maps and everything else are the colour engine's own.
"""

from __future__ import annotations

import dataclasses
import time

from fault_engine import settings

from batchseg.config import RunConfig
from batchseg.engines import threshold
from batchseg.records import Item
from batchseg.worker.contract import EngineSpec, Outcome, Segmentation

check = threshold.check  # prompts are colours, checked in the parent as for the colour engine


def model_id(config: RunConfig) -> str:
    return "scored-colour"


def score_of(left: float) -> float:
    return left / 256


class ScoredEngine(threshold.ThresholdEngine):
    def one(self, item: Item) -> Outcome:
        found = super().one(item)
        if isinstance(found, Segmentation):  # boxes are in the window's frame: scored in the image's
            left = item.window[0] if item.window is not None else 0
            found.instances = [
                dataclasses.replace(inst, score=score_of((inst.box or (0.0,))[0] + left))
                for inst in found.instances
            ]
        return found


def load(spec: EngineSpec, slot: int) -> ScoredEngine:
    time.sleep(float(settings(spec.config).get("load_s", 0)))
    engine = threshold.load(spec, slot)
    engine.__class__ = ScoredEngine  # the colour engine as it loads, scoring the way above
    assert isinstance(engine, ScoredEngine)
    return engine
