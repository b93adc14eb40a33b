"""The tiny checkpoint: complete, idempotent, deterministic, and with a tokenizer that reads any text."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from transformers import Sam3Config, Sam3Processor

from batchseg.engines.sam3.model import validate_model_folder
from batchseg.random_sam3 import TINY_IMAGE_SIZE, WORDS, build_tiny_checkpoint


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_is_complete_and_small(tiny_model: Path) -> None:
    validate_model_folder(tiny_model)
    assert (tiny_model / "model.safetensors").stat().st_size < 2_000_000
    assert not list(tiny_model.glob("*.bin"))
    config = Sam3Config.from_pretrained(tiny_model, local_files_only=True)
    assert config.vision_config.backbone_config.image_size == TINY_IMAGE_SIZE
    processor_config = json.loads((tiny_model / "processor_config.json").read_text())
    size = processor_config["image_processor"]["size"]
    assert size == {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}


def test_second_build_is_a_no_op(tiny_model: Path) -> None:
    weights = tiny_model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_tiny_checkpoint(tiny_model) == tiny_model
    assert time.perf_counter() - started < 0.5
    assert weights.stat().st_mtime_ns == mtime


def test_builds_are_identical(tiny_model: Path, tmp_path: Path) -> None:
    other = build_tiny_checkpoint(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert digest(other / name) == digest(tiny_model / name), name


def test_interrupted_build_is_redone(tiny_model: Path, tmp_path: Path) -> None:
    # A folder with files but no completion marker (a build killed half-way) is rebuilt.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    build_tiny_checkpoint(partial)
    validate_model_folder(partial)
    assert digest(partial / "config.json") == digest(tiny_model / "config.json")


def test_tokenizer_words_and_any_text(tiny_model: Path) -> None:
    tokenizer = Sam3Processor.from_pretrained(tiny_model, local_files_only=True).tokenizer
    for word in WORDS:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word)["input_ids"]) == [
            "<|startoftext|>",
            f"{word}</w>",
            "<|endoftext|>",
        ]
    ids = tokenizer("solar panel on a Dachfläche 屋顶")["input_ids"]
    # Unknown text falls back to bytes, never to the unknown token (which is the end token here).
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "solar panel on a dachfläche 屋顶"
