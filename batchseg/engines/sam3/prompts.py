"""Prompts the model cannot read, refused in the parent before any worker loads the model.

Torch-free: the tokenizer is the ``tokenizers`` package reading the model folder's tokenizer.json,
which counts tokens exactly as ``Sam3Processor`` does (start and end tokens included; tested).
A hub id, or a folder without tokenizer.json or config.json, is left to the worker, which checks
again with the processor itself after the model is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import ConfigError, ModelLoadError
from ...values import show
from .model import max_prompt_tokens

__all__ = ["check_prompts", "count_tokens"]


def check_prompts(model: str, prompts: Sequence[str]) -> None:
    """Raise ConfigError for no prompt, an empty prompt, or a prompt longer than the model's text
    positions (transformers would crash on it mid-run); the message names the prompt and the
    limit. ``model`` is the ``--model`` value: a folder, or a hub id (length not checked then)."""
    if not prompts:
        raise ConfigError("give at least one prompt (--prompt)")
    for prompt in prompts:
        if not prompt.strip():
            raise ConfigError("a prompt is empty: every --prompt needs some text")
    folder = Path(os.path.expanduser(model))
    if not (folder / "tokenizer.json").is_file() or not (folder / "config.json").is_file():
        return
    limit = _limit(folder)
    for prompt, n_tokens in zip(prompts, count_tokens(folder, prompts), strict=True):
        if n_tokens > limit:
            raise ConfigError(
                f"prompt {show(prompt)} is {n_tokens} tokens long (start and end tokens included) but "
                f"the model reads at most {limit}: shorten it"
            )


def count_tokens(folder: Path, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt as the model folder's tokenizer.json makes them, start and end
    tokens included, neither padded nor truncated."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust tokenizer raises its own Exception for a bad file
        raise ModelLoadError(f"cannot read the tokenizer {path}: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return [len(tokenizer.encode(prompt).ids) for prompt in prompts]


def _limit(folder: Path) -> int:
    path = folder / "config.json"
    try:
        return max_prompt_tokens(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
