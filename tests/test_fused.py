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


def test_the_check_runs_on_the_vits_heads_and_catches_a_wrong_kernel() -> None:
    """The check a fused kernel must pass (run here on the CPU, eagerly): its inputs are laid out as
    the ViT's (the first shapes a compiled kernel meets decide which sizes stay fixed)."""
    original = getattr(_current(), "batchseg_original", _current())
    seen: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def watched(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        seen.append((tuple(q.shape), q.stride(), tuple(cos.shape)))
        return original(q, k, cos, sin)

    assert fused._mismatch(original, watched, torch.device("cpu"), heads=16, head_dim=64) is None
    # (batch, heads, tokens, head size), a transposed view of (batch, tokens, heads, head size).
    assert seen == [((2, 16, 64, 64), (64 * 16 * 64, 64, 16 * 64, 1), (1, 64, 64))]

    def wrong(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        return q * 2, k

    assert "q differs" in (fused._mismatch(original, wrong, torch.device("cpu"), heads=16, head_dim=64) or "")
