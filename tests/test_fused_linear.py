"""One product for query, key and value, GELU in the product's epilogue, and the FP8 backbone:
the same answers as transformers' own, within what each change's arithmetic allows."""

from __future__ import annotations

import types
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


def _refuse(*_: object) -> None:
    raise AssertionError("the fused MLP called fc1 as a module")


def test_gelu_in_the_product_gives_the_same_outputs(tiny_model: Path) -> None:
    model, processor = load_model(str(tiny_model), "cpu", "float32")
    backbone = model.vision_encoder.backbone
    before = _forward(model, processor)
    mlps = [layer.mlp for layer in backbone.layers]
    assert fused.fuse_gelu(backbone) == len(mlps) > 0
    assert fused.fuse_gelu(backbone) == 0  # already fused: nothing to do
    for mlp in mlps:
        mlp.fc1.forward = _refuse  # the fused path reads fc1's weights, never calls it
    after = _forward(model, processor)
    # On a CPU the product's GELU is the exact one (cuBLAS's epilogue, on a GPU, is tanh's: the
    # CUDA test below): the same arithmetic in another order.
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's GELU epilogue needs a GPU")
def test_gelu_in_the_cuda_product_is_within_tanh_of_the_exact_one() -> None:
    torch.manual_seed(0)
    config = type(
        "Config",
        (),
        {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4736, "hidden_dropout": 0.0},
    )()
    mlp = fused._sam3_module().Sam3MLP(config).cuda().to(torch.bfloat16).eval()
    x = torch.randn((2, 24, 24, 1024), device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        exact = mlp(x).float()
        mlp.forward = types.MethodType(fused._gelu_mlp, mlp)
        got = mlp(x).float()
    # tanh's GELU is within 4.7e-4 of the exact one; bfloat16 rounds the 4736 inner values anyway.
    assert float((got - exact).norm() / exact.norm()) < 1e-2


def test_gelu_fusion_leaves_an_fp8_product_alone(tiny_model: Path) -> None:
    """An MLP whose first product is no longer an ``nn.Linear`` keeps transformers' path."""
    model, _ = load_model(str(tiny_model), "cpu", "float32")
    backbone = model.vision_encoder.backbone
    fused.fuse_gelu(backbone)
    mlp = backbone.layers[0].mlp
    linear = mlp.fc1
    mlp.fc1 = torch.nn.Sequential(linear)  # stands for a replaced product: not an nn.Linear
    x = torch.randn((1, 3, 3, linear.in_features))
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), mlp.fc2(torch.nn.functional.gelu(linear(x))))


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
    with torch.inference_mode():  # as the engine runs it (no autograd history to warn about)
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
