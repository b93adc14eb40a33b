"""The SAM3 engine's factory module: ``load_engine`` runs in each worker, ``check`` in the parent.

Light to import (no torch, no transformers), because the parent imports it to call ``check``
before it spawns any worker. The engine itself is ``pipeline.Sam3Engine``; ``task.Task`` runs its
steps as a pipeline, ``ladder.OutOfMemoryLadder`` takes over after a failure, and ``speedups``
holds the CUDA speed-ups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ... import imageio
from ...config import RunConfig
from ...exemplars import run_prompts
from ...prompting import check_prompt_maps
from ...worker.contract import EngineSpec
from .prompts import check_prompts
from .sizing import CPU_SUB_BATCHES_PER_TASK, SUB_BATCHES_PER_TASK

if TYPE_CHECKING:
    from .pipeline import Sam3Engine

__all__ = ["CPU_SUB_BATCHES_PER_TASK", "SUB_BATCHES_PER_TASK", "check", "load_engine"]


def load_engine(spec: EngineSpec, slot: int) -> Sam3Engine:
    """Factory called once per worker: model on its device, prompts encoded, ready to process."""
    from .model import load_model, resolve_dtype
    from .pipeline import Sam3Engine, pick_device

    config = spec.config
    imageio.configure_pillow(config.max_pixels)
    device = pick_device(config.device, slot)
    dtype, reason = resolve_dtype(device, config.dtype)
    model, processor = load_model(config.model, device, dtype)
    return Sam3Engine(model, processor, config, device, dtype, reason)


def check(config: RunConfig) -> None:
    """What the parent can refuse before any worker starts: prompts that are empty or longer than
    the model reads (``prompts.check_prompts``; those the exemplar boxes add included), an
    exemplar file that cannot be read. Raises ConfigError (exit 1); BadValueError (exit 2) for a
    --class or --prompt-threshold that names no prompt."""
    prompts = run_prompts(config)
    check_prompt_maps(config, prompts)
    check_prompts(config.model, prompts)
