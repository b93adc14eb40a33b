"""One product for query, key and value, and the FP8 backbone: same answers as transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchseg.engines.sam3 import fp8, fused
from batchseg.engines.sam3.model import load_model

HAS_FP8 = torch.cuda.is_available() and fp8.fp8_unavailable(torch.device("cuda")) is None


def _forward(model: torch.nn.Module, processor: object, seed: int = 0) -> torch.Tensor:
    size = int(processor.image_processor.size["height"])  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn((2, 3, size, size), generator=generator).to(device)
    enc = processor(text=["roof", "roof"], return_tensors="pt")  # type: ignore[operator]
    with torch.inference_mode():
        out = model(
            pixel_values=pixels.to(next(model.parameters()).dtype),
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
        )
    return torch.cat([out.pred_logits.float().flatten(), out.pred_masks.float().flatten()])


def test_fused_qkv_gives_the_same_outputs(tiny_model: Path) -> None:
    model, processor = load_model(str(tiny_model), "cpu", "float32")
    before = _forward(model, processor)
    layers = sum(1 for _ in model.vision_encoder.backbone.modules() if hasattr(_, "q_proj"))
    assert layers > 0
    assert fused.fuse_qkv(model.vision_encoder.backbone) == layers
    assert fused.fuse_qkv(model.vision_encoder.backbone) == 0  # already fused: nothing to do
    assert not any(hasattr(m, "q_proj") for m in model.vision_encoder.backbone.modules())
    after = _forward(model, processor)
    # The same products grouped differently: equal up to float32 rounding of the sums.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fused_qkv_uses_the_fused_weights(tiny_model: Path) -> None:
    """A fused layer really runs its qkv product: spoiling its weights changes the answer."""
    model, processor = load_model(str(tiny_model), "cpu", "float32")
    fused.fuse_qkv(model.vision_encoder.backbone)
    before = _forward(model, processor)
    for m in model.vision_encoder.backbone.modules():
        if hasattr(m, "qkv"):
            with torch.no_grad():
                m.qkv.weight.mul_(0.5)
    assert not torch.allclose(_forward(model, processor), before)


def test_fp8_refuses_the_cpu_and_leaves_the_model_alone(tiny_model: Path) -> None:
    model, _ = load_model(str(tiny_model), "cpu", "float32")
    assert fp8.fp8_unavailable(torch.device("cpu")) == "FP8 needs a CUDA GPU"
    with pytest.warns(RuntimeWarning, match="stays in bfloat16"):
        assert fp8.to_fp8(model.vision_encoder.backbone, torch.device("cpu")) == 0
    assert not any(isinstance(m, fp8.Fp8Linear) for m in model.modules())


@pytest.mark.skipif(not HAS_FP8, reason="needs a GPU with FP8 (compute capability 8.9+)")
def test_fp8_linear_is_close_to_bfloat16() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 3072).cuda().to(torch.bfloat16)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    want = linear(x).float()
    got = fp8.Fp8Linear(linear)(x).float()
    # e4m3 keeps 3 mantissa bits: about 2^-4 relative error per element, averaging out in the sum.
    assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.skipif(not HAS_FP8, reason="needs a GPU with FP8 (compute capability 8.9+)")
def test_fp8_backbone_runs_the_tiny_model(tiny_model: Path) -> None:
    model, processor = load_model(str(tiny_model), "cuda", "bfloat16")
    before = _forward(model, processor)
    assert fp8.to_fp8(model.vision_encoder.backbone, torch.device("cuda")) > 0
    after = _forward(model, processor)
    assert torch.isfinite(after).all()
    assert float((after - before).norm() / before.norm()) < 0.2
