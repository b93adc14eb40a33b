"""The contract between the worker pool and whatever does the per-image work.

The pool knows nothing of SAM3: a worker process imports ``EngineSpec.factory`` ("module:function"),
calls it once with the spec to load an Engine, then feeds it items. The real factory is
``batchseg.engines.sam3.engine:load_engine``; tests register misbehaving engines the same way. A future Ray
backend feeds the same Engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import RunConfig
from ..records import Item, ItemResult

__all__ = ["Capabilities", "Engine", "EngineSpec", "HeartbeatFn", "load_factory"]

#: ``heartbeat(finished, reached)``: see ``Engine.process``.
HeartbeatFn = Callable[[Sequence[tuple[int, ItemResult]], "int | None"], None]


@dataclass(frozen=True)
class Capabilities:
    """What a loaded engine tells the pool, once, in Ready."""

    device: str  # e.g. "cuda:0 NVIDIA H200 bfloat16", "cpu float32"; goes into the manifest
    task_size: int = 1  # preferred items per task (e.g. from free GPU memory)
    heartbeat_every: int = 0  # the engine calls heartbeat after at most this many items (0: never)
    gpu_count: int = 0  # CUDA devices this worker sees (the pool sizes itself from it)


class Engine(Protocol):
    """Loaded once per worker process."""

    #: e.g. "cuda:0 NVIDIA H100 80GB HBM3 bfloat16" or "cpu float32"; goes into the manifest.
    device: str

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn | None = None) -> list[ItemResult]:
        """One result per item, in order. Per-image problems are results, not exceptions;
        an exception here marks every item of the call not yet reported ``error``.

        ``heartbeat`` (an engine may leave the parameter out): call it after each
        ``heartbeat_every`` items (the engine's attribute) to restart the watchdog's clock, with
        the results finished since the last call as (index in ``items``, result) and ``reached``,
        the index no item at or after which has been touched yet: call it before going further."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    """Picklable recipe for an Engine: sent to each spawned worker."""

    config: RunConfig
    factory: str = "batchseg.engines.sam3.engine:load_engine"


def load_factory(spec: EngineSpec):  # type: ignore[no-untyped-def]
    module_name, _, func_name = spec.factory.partition(":")
    return getattr(importlib.import_module(module_name), func_name)
