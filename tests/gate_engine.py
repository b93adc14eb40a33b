"""The fault engine (``fault_engine``) with two behaviours that wait for an event, not a clock:

    gate        waits until the file ``state_dir``/open exists, then ok (the test opens it when
                what it waits for has happened)
    barrier     marks its arrival in ``state_dir``, then waits until the setting ``barrier``
                images have arrived, then ok: they can only finish while that many workers run
                at once

Every other name behaves as in ``fault_engine``; loading too (``loads.txt``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fault_engine import FaultyEngine, behaviour, found, load_faulty, settings

from batchseg.records import Item
from batchseg.worker.contract import EngineSpec, Outcome

_POLL_S = 0.05


class GatedEngine(FaultyEngine):
    def _one(self, item: Item) -> Outcome:
        kind = behaviour(item.path)
        if kind not in ("gate", "barrier"):
            return super()._one(item)
        state = self.state_dir
        assert state is not None, "gate and barrier images need the setting state_dir"
        if kind == "gate":
            _wait_until(lambda: (state / "open").exists())
        else:
            (state / f"arrived-{Path(item.path).name}").touch()
            count = int(self.chosen["barrier"])
            _wait_until(lambda: len(list(state.glob("arrived-*"))) >= count)
        return found()


def _wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        time.sleep(_POLL_S)  # only the pool's watchdog ends a wait that never comes true


def load_gated(spec: EngineSpec, slot: int) -> GatedEngine:
    """The factory (``gate_engine:load_gated``): ``load_faulty``'s loading, then this engine."""
    load_faulty(spec, slot)
    return GatedEngine(settings(spec.config), slot)
