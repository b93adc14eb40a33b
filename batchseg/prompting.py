"""What a run asks per prompt: its class (``--class``), its score threshold (``--prompt-threshold``),
the prompts exemplar boxes add (``--exemplars``), and one object under one prompt
(``--suppress-iou``: duplicates across prompts folded into the better-scored one).

Engine-agnostic and torch-free: the colour engine and SAM3 both read a run's prompts from here,
the manifest export its classes. See docs/prompts.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadValueError
from .values import show

if TYPE_CHECKING:
    from .config import RunConfig

__all__ = [
    "EXEMPLAR_PROMPT",
    "check_prompt_maps",
    "class_of",
    "classes_of",
    "fold_duplicates",
    "threshold_of",
]

#: The prompt of exemplar boxes that name none, in a run without a text prompt.
EXEMPLAR_PROMPT = "exemplar"


def class_of(config: RunConfig, prompt: str) -> str:
    """The class a detection of ``prompt`` goes under: its ``--class``, else the prompt itself."""
    return dict(config.classes).get(prompt, prompt)


def classes_of(config_dict: dict[str, Any]) -> dict[str, str]:
    """The prompt -> class map of a stored configuration (``RunConfig.to_dict``)."""
    return {str(p): str(c) for p, c in config_dict.get("classes") or ()}


def threshold_of(config: RunConfig, prompt: str) -> float:
    """The least score a detection of ``prompt`` keeps: its ``--prompt-threshold``, else --threshold."""
    return float(dict(config.prompt_thresholds).get(prompt, config.threshold))


def check_prompt_maps(config: RunConfig, prompts: Sequence[str]) -> None:
    """Every ``--class`` and ``--prompt-threshold`` names a prompt of the run (a typo would
    otherwise be silently ignored)."""
    for name, flag in (("classes", "--class"), ("prompt_thresholds", "--prompt-threshold")):
        for prompt, _value in getattr(config, name):
            if prompt not in prompts:
                known = ", ".join(show(p) for p in prompts) or "none"
                raise BadValueError(f"{flag} {show(prompt)}: no such prompt (the run's prompts: {known})")


def fold_duplicates(
    masks: Sequence[np.ndarray], prompts: Sequence[str], scores: Sequence[float], iou: float
) -> tuple[list[int], dict[int, tuple[str, ...]]]:
    """One object under one prompt: of two masks of different prompts whose IoU is at least
    ``iou``, the better-scored one keeps the object (a tie: the earlier one). Returns the kept
    indices in their order and, per kept index that took others, the prompts folded into it."""
    order = sorted(range(len(masks)), key=lambda k: (-scores[k], k))
    flat = [np.asarray(m, bool).ravel() for m in masks]
    areas = [int(m.sum()) for m in flat]
    kept: list[int] = []
    folded: dict[int, list[str]] = {}
    for k in order:
        into = None
        for j in kept:
            if prompts[j] == prompts[k] or not areas[k] or not areas[j]:
                continue
            inter = int(np.count_nonzero(flat[j] & flat[k]))
            if inter and inter / (areas[j] + areas[k] - inter) >= iou:
                into = j
                break
        if into is None:
            kept.append(k)
        else:
            names = folded.setdefault(into, [])
            if prompts[k] not in names:
                names.append(prompts[k])
    return sorted(kept), {k: tuple(v) for k, v in folded.items()}
