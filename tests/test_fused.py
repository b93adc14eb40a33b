"""The fused rotary embedding: used only where it is exact and can run, transformers' own elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _writing import written
from test_segment import _scores, engine_for, items

from batchseg.engines.sam3 import fused

HAS_CUDA = torch.cuda.is_available()


def _current() -> object:
    return fused._sam3_module().apply_rotary_pos_emb_2d


def test_cpu_keeps_the_original_rotary_embedding() -> None:
    original = _current()
    assert fused.fuse_rope(torch.device("cpu")) == "fused kernels are for CUDA"
    assert _current() is original


def test_a_cpu_engine_undoes_an_earlier_fusion(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The function lives in transformers' module: an engine that does not fuse puts it back."""
    module = fused._sam3_module()
    original = module.apply_rotary_pos_emb_2d

    def stand_in(*args: object) -> object:
        raise AssertionError("a fused kernel left over from another engine ran")

    stand_in.batchseg_original = original  # type: ignore[attr-defined]
    monkeypatch.setattr(module, "apply_rotary_pos_emb_2d", stand_in)
    engine = engine_for(tiny_model, tmp_path, tmp_path / "out", ("roof",))
    assert module.apply_rotary_pos_emb_2d is original and not engine.fused_rope


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_fused_rope_matches_the_original_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    from _sam3 import save_noise_image

    root = tmp_path / "in"
    for i in range(3):
        save_noise_image(root / f"{i}.png", 80 + 9 * i, 60 + 4 * i, seed=i)
    todo = items("0.png", "1.png", "2.png")
    plain = engine_for(tiny_model, root, tmp_path / "plain", ("roof",), device="cuda", fuse_rope=False)
    assert not plain.fused_rope
    expected = written(plain, todo)
    fast = engine_for(tiny_model, root, tmp_path / "fast", ("roof",), device="cuda", batch_size=2)
    assert fast.fused_rope and hasattr(_current(), "batchseg_original")
    got = written(fast, todo)
    for x, y in zip(_scores(got), _scores(expected), strict=True):
        assert np.allclose(x, y, atol=1e-3)
    fused.restore_rope()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_fused_kernel_that_differs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    original = _current()

    def wrong(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        return q * 2, k

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: wrong)
    with pytest.warns(RuntimeWarning, match="failed its check"):
        reason = fused.fuse_rope(torch.device("cuda"))
    assert reason is not None and "q differs" in reason
    assert _current() is original


def _rope_inputs(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Queries and keys as the ViT makes them (a transposed view of one projection), and the
    cos and sin of angles over the head's dimensions, repeated pairwise like transformers'."""
    generator = torch.Generator().manual_seed(seed)
    rows, heads, seq, dim = shape
    projected = torch.randn((rows, seq, 2, heads, dim), generator=generator).to(torch.bfloat16) * 3
    q, k = (t.transpose(1, 2) for t in projected.unbind(2))
    angles = (torch.rand((seq, dim // 2), generator=generator) * 40).repeat_interleave(2, dim=-1)
    return q, k, angles.cos(), angles.sin()


@pytest.mark.parametrize("shape", [(2, 4, 576, 64), (1, 4, 5184, 64)])  # windowed, global layer
def test_the_float32_kernel_gives_transformers_bits(shape: tuple[int, ...]) -> None:
    q, k, cos, sin = _rope_inputs(shape, seed=len(shape) + shape[2])
    original = getattr(_current(), "batchseg_original", _current())
    want = original(q, k, cos, sin)
    got = fused.rope_float32(q, k, cos, sin)
    for a, b in zip(want, got, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        assert torch.equal(a, b)


def test_the_kernel_in_the_inputs_dtype_is_within_a_step_of_it() -> None:
    q, k, cos, sin = _rope_inputs((2, 4, 576, 64), seed=5)
    want = fused.rope_float32(q, k, cos, sin)
    got = fused.rope_in_dtype(q, k, cos, sin)
    for x, a, b in zip((q, k), want, got, strict=True):
        assert b.dtype == torch.bfloat16
        # Three roundings of bfloat16 (8 significant bits) on two products and their sum: the error
        # is a step of the products' size (x and its rotated pair), not of the result's.
        terms = x.float().abs() + x.float().view(*x.shape[:-1], -1, 2).flip(-1).flatten(-2).abs()
        assert bool(((a.float() - b.float()).abs() <= 2.0**-7 * terms).all())
        assert not torch.equal(a, b)  # another rounding: a test that could tell them apart


def test_an_installed_kernel_runs_in_the_vit_and_is_undone(tiny_model: Path) -> None:
    """``use_rope`` (what ``--compile`` traces): the ViT calls it, with transformers' bits."""
    from _sam3 import noise_image

    from batchseg.engines.sam3.model import load_model

    model, processor = load_model(str(tiny_model), "cpu", "bfloat16")
    pixels = processor(images=[noise_image(64, 48)], return_tensors="pt")["pixel_values"].to(torch.bfloat16)
    original = _current()
    with torch.inference_mode():
        want = model.get_vision_features(pixel_values=pixels).fpn_hidden_states[0]
    calls = []

    def counted(*args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return fused.rope_float32(*args, **kwargs)

    fused.use_rope(counted)
    try:
        with torch.inference_mode():
            got = model.get_vision_features(pixel_values=pixels).fpn_hidden_states[0]
    finally:
        fused.restore_rope()
    assert calls and torch.equal(got, want)
    assert _current() is original
