"""The contract between the worker pool and whatever does the per-image work.

The pool knows nothing of SAM3: a worker process imports ``EngineSpec.factory`` ("module:function"),
calls it once with the spec to load an Engine, then feeds it items. The real factory is
``batchseg.segment:load_engine``; tests register misbehaving engines the same way. A future Ray
backend feeds the same Engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .config import RunConfig
from .records import Item, ItemResult

__all__ = ["Engine", "EngineSpec", "load_factory"]


class Engine(Protocol):
    """Loaded once per worker process."""

    #: e.g. "cuda:0 NVIDIA H100 80GB HBM3 bfloat16" or "cpu float32"; goes into the manifest.
    device: str

    def process(self, items: Sequence[Item]) -> list[ItemResult]:
        """One result per item, in order. Per-image problems are results, not exceptions;
        an exception here marks every item of the call ``error``."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    """Picklable recipe for an Engine: sent to each spawned worker."""

    config: RunConfig
    factory: str = "batchseg.segment:load_engine"


def load_factory(spec: EngineSpec):  # type: ignore[no-untyped-def]
    module_name, _, func_name = spec.factory.partition(":")
    return getattr(importlib.import_module(module_name), func_name)
