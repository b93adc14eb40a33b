"""Random-initialised SAM3 checkpoints built locally, for tests, the demo and benchmarks.

The real weights (``facebook/sam3``) are gated and often unreachable. These checkpoints go through the
same ``save_pretrained`` / ``from_pretrained`` path as real weights, so the loading code is exercised for
real. The tokenizer is a byte-level CLIP BPE made offline: every byte is a token (so any text encodes),
plus whole-word tokens for a few words that prompts in tests and examples use.

Imports torch and transformers: call it from a worker, a test or a script, never from the parent at
module import time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_checkpoint", "build_full_size_checkpoint", "TINY_IMAGE_SIZE", "WORDS"]

#: Input size of the tiny model (a multiple of the ViT patch size, 14).
TINY_IMAGE_SIZE = 112
_TINY_WIDTH = 32
_SEED = 0
_HEADS_ONLY = {"num_attention_heads": 2}
#: Words that get a single token each, so prompts in tests look like real ones to the tokenizer.
WORDS = ("roof", "solar", "panel", "building", "tree", "car", "road", "pool", "house", "water")
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# Written last: its presence marks a checkpoint whose save finished.
_DONE_MARKER = ".batchseg-checkpoint-complete"


def build_tiny_checkpoint(folder: Path) -> Path:
    """Save a tiny random SAM3 (112 px input, 32 wide, 1-2 layers, fixed seed) into ``folder``.

    Idempotent: a folder that already holds a complete checkpoint is left as it is. Deterministic:
    the same weights every time. Returns ``folder``.
    """
    folder = Path(folder)
    if (folder / _DONE_MARKER).exists():
        return folder
    vocab, merges = _byte_level_vocab()
    _build(folder, _tiny_config(len(vocab), vocab), TINY_IMAGE_SIZE, vocab, merges, dtype="float32")
    return folder


def build_full_size_checkpoint(folder: Path, dtype: str = "bfloat16") -> Path:
    """Save the default full-size ``Sam3Config()`` with random weights (same compute and memory as the
    real model) in ``dtype``, for benchmarks. Idempotent like :func:`build_tiny_checkpoint`.
    Takes about a minute and 1.7 GB (bfloat16) or 3.4 GB (float32) of disk."""
    from transformers import Sam3Config

    folder = Path(folder)
    if (folder / _DONE_MARKER).exists():
        return folder
    vocab, merges = _byte_level_vocab()
    config: Any = Sam3Config()
    # The default text vocabulary (49408) is larger than ours; our ids all fall inside it.
    config.text_config.bos_token_id = vocab[_BOS]
    config.text_config.eos_token_id = vocab[_EOS]
    config.text_config.pad_token_id = vocab[_EOS]
    _build(folder, config, int(config.image_size), vocab, merges, dtype=dtype)
    return folder


def _build(
    folder: Path,
    config: Any,
    image_size: int,
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    dtype: str,
) -> None:
    import torch
    import transformers
    from transformers import CLIPTokenizer, Sam3ImageProcessor, Sam3Model, Sam3Processor

    # Its "Writing model shards" bar would land in the middle of `batchseg demo`'s output.
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    folder.mkdir(parents=True, exist_ok=True)
    # Save beside the target, then move file by file: a build killed half-way never leaves a folder
    # that looks complete, and two concurrent builds write identical files.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # Fork the RNG so building a checkpoint never disturbs the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model: Any = Sam3Model(config).eval()  # type: ignore[no-untyped-call]
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(staging, safe_serialization=True)
        # The BPE model takes merges as pairs; the annotation only names the text forms.
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]
        image_processor = Sam3ImageProcessor(size={"height": image_size, "width": image_size})
        Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (folder / _DONE_MARKER).write_text(json.dumps({"image_size": image_size, "dtype": dtype}) + "\n")


def _tiny_config(vocab_size: int, vocab: dict[str, int]) -> Any:
    from transformers import Sam3Config

    width = _TINY_WIDTH
    grid = TINY_IMAGE_SIZE // 14
    heads = {"num_attention_heads": 2, "intermediate_size": 2 * width, "hidden_size": width}
    return Sam3Config(
        vision_config={
            "model_type": "sam3_vision_model",
            "backbone_config": {
                "model_type": "sam3_vit_model",
                **heads,
                "num_hidden_layers": 2,
                "image_size": TINY_IMAGE_SIZE,
                "pretrain_image_size": TINY_IMAGE_SIZE,
                "patch_size": 14,
                "window_size": 4,
                "global_attn_indexes": [1],
            },
            "fpn_hidden_size": width,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            "model_type": "clip_text_model",
            **heads,
            "vocab_size": vocab_size,
            "projection_dim": width,
            "num_hidden_layers": 1,
            "max_position_embeddings": 32,
            "bos_token_id": vocab[_BOS],
            "eos_token_id": vocab[_EOS],
            "pad_token_id": vocab[_EOS],
        },
        geometry_encoder_config={"model_type": "sam3_geometry_encoder", **heads, "num_layers": 1},
        detr_encoder_config={"model_type": "sam3_detr_encoder", **heads, "num_layers": 1},
        detr_decoder_config={"model_type": "sam3_detr_decoder", **heads, "num_layers": 1, "num_queries": 20},
        mask_decoder_config={"model_type": "sam3_mask_decoder", "hidden_size": width, **_HEADS_ONLY},
    )


def _byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 256 byte-level symbols, their end-of-word forms, merges that spell out WORDS, then the
    two special tokens. Any text encodes (byte-wise at worst), so no prompt maps to unknown."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            vocab.setdefault(merged, len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    return vocab, merges
