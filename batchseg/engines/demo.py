"""The engine of ``batchseg demo``: SAM3 on the tiny random model, which the worker builds first.

Building the model in the worker (once: the build is idempotent) instead of in a process of its
own saves one import of torch and transformers before the first image, the largest part of the
demo's start (docs/performance.md). Light to import: the parent calls ``check`` and ``model_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..worker.contract import EngineSpec
from .sam3.engine import check
from .sam3.engine import load_engine as load_sam3

if TYPE_CHECKING:
    from .sam3.pipeline import Sam3Engine

__all__ = ["DEMO_ENGINE", "check", "load_engine", "model_id"]

#: The factory ``batchseg demo`` runs (``run(..., factory=DEMO_ENGINE)``).
DEMO_ENGINE = "batchseg.engines.demo:load_engine"


def load_engine(spec: EngineSpec, slot: int) -> Sam3Engine:
    """Build the tiny model into ``--model`` where it is not complete yet, then load it as SAM3."""
    from ..random_sam3 import build_tiny_checkpoint

    build_tiny_checkpoint(Path(spec.config.model))
    return load_sam3(spec, slot)


def model_id(config: RunConfig) -> str:
    """The model the run records: the demo model's folder, as for SAM3."""
    return config.model
