"""An engine's outcomes made into results as the worker makes them: each segmentation written by
the worker's ``OutputWriter``, through the heartbeat the worker gives ``Engine.process``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from batchseg.records import Item, ItemResult
from batchseg.worker.writer import OutputWriter, WritingBeat


def _quiet(finished: Sequence[tuple[int, ItemResult]] = (), reached: int | None = None) -> None:
    pass


def written(engine: Any, items: Sequence[Item], heartbeat: Callable[..., None] = _quiet) -> list[ItemResult]:
    """``engine.process(items)``, each outcome written into ``engine.config``'s output folder."""
    writing = WritingBeat(OutputWriter(engine.config, engine.capabilities.device), items, heartbeat)
    return writing.results(engine.process(items, writing))
