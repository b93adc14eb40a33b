"""Text prompts share decoder passes (``prompt_rows``): each prompt's outputs from a shared pass are
the ones its own pass gives, and the engine's results do not depend on how many prompts a pass
takes. On the real tiny SAM3, float32 on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sam3 import noise_image, save_noise_image
from _writing import written

from batchseg.config import RunConfig
from batchseg.engines.sam3 import prompt_rows
from batchseg.engines.sam3.engine import load_engine
from batchseg.engines.sam3.model import load_model
from batchseg.engines.sam3.pipeline import PromptText
from batchseg.records import Item, Status
from batchseg.worker.contract import EngineSpec

PROMPTS = ("roof", "solar panel", "tree", "a long prompt about a parked car")
OUTPUTS = ("pred_logits", "presence_logits", "pred_boxes", "pred_masks")


def _texts(model: Any, processor: Any) -> list[PromptText]:
    texts = []
    for prompt in PROMPTS:
        tokens = processor(text=prompt, return_tensors="pt")
        with torch.inference_mode():
            features = model.get_text_features(**tokens).pooler_output
        texts.append(PromptText(prompt, features, tokens["attention_mask"]))
    return texts


def test_a_shared_pass_gives_each_prompt_its_own_outputs(tiny_model: Path) -> None:
    model, processor = load_model(str(tiny_model), "cpu", "float32")
    images = [noise_image(90, 70, seed=1), noise_image(64, 80, seed=2), noise_image(50, 50, seed=3)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    texts = _texts(model, processor)
    with torch.inference_mode():
        vision = model.get_vision_features(pixel_values=pixels)
        shared = prompt_rows.forward_texts(model, vision, texts, len(images))
        alone = [prompt_rows.forward_texts(model, vision, [text], len(images))[0] for text in texts]
    assert len(shared) == len(PROMPTS)
    for got, want in zip(shared, alone, strict=True):
        for name in OUTPUTS:
            assert getattr(got, name).shape == getattr(want, name).shape
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)
    # The prompts' outputs differ from each other: a pass that gave every prompt the first one's
    # rows would not pass the comparison above.
    assert not torch.allclose(shared[0].pred_logits, shared[1].pred_logits)


def test_prompts_per_pass_keep_the_rows_bounded() -> None:
    assert prompt_rows.prompts_per_pass(16) == prompt_rows.MAX_DECODER_ROWS // 16
    assert prompt_rows.prompts_per_pass(prompt_rows.MAX_DECODER_ROWS * 2) == 1
    assert prompt_rows.prompts_per_pass(0) == prompt_rows.MAX_DECODER_ROWS


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("in")
    for k, (w, h) in enumerate([(120, 90), (64, 96), (80, 80)]):
        save_noise_image(root / f"img_{k}.png", w, h, seed=k)
    return root


def _run(tiny_model: Path, folder: Path, out: Path) -> tuple[list[Any], int]:
    config = RunConfig(
        input=folder, prompts=PROMPTS, model=str(tiny_model), output=out, device="cpu",
        dtype="float32", threshold=0.0, threads=1, batch_size=3,
    )  # fmt: skip
    engine = load_engine(EngineSpec(config), slot=0)
    passes = 0
    forward = engine.model.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal passes
        passes += 1
        return forward(*args, **kwargs)

    engine.model.forward = counted
    results = written(engine, [Item(f"img_{k}.png", 0, 0) for k in range(3)])
    engine.close()
    return results, passes


def test_the_engine_finds_the_same_whatever_a_pass_takes(
    tiny_model: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, shared_passes = _run(tiny_model, folder, tmp_path / "shared")
    monkeypatch.setattr(prompt_rows, "MAX_DECODER_ROWS", 3)  # one prompt of three images a pass
    alone, alone_passes = _run(tiny_model, folder, tmp_path / "alone")
    assert (shared_passes, alone_passes) == (1, len(PROMPTS))
    for got, want in zip(shared, alone, strict=True):
        assert got.status is Status.OK and want.status is Status.OK
        assert [d.prompt for d in got.detections] == [d.prompt for d in want.detections]
        assert np.allclose([d.score for d in got.detections], [d.score for d in want.detections], atol=1e-5)
        assert np.allclose([d.box for d in got.detections], [d.box for d in want.detections], atol=1e-3)
    # Several prompts' detections are compared, not one prompt's.
    assert len({d.prompt for r in shared for d in r.detections}) >= 3
