"""FP8 matrix products for the ViT backbone on Hopper and newer GPUs (``--precision fp8``).

Most of SAM3's compute is the ViT's linear layers (about 4.6 of 6.0 TFLOP per image at 1008 px,
docs/performance.md). An H100/H200 multiplies float8 (e4m3) at twice its bfloat16 rate. Each
linear layer of the backbone becomes an ``Fp8Linear``: its weight is quantised once per output
channel, each activation row is quantised on the fly with its own scale (``torch._scaled_mm``
with row-wise scales), and the result comes back in bfloat16 with the bias added. Everything
outside the backbone's linear layers (attention, norms, the decoders) stays as it was.

Row-wise scales keep one outlier token or channel from flattening the others' precision; what
that costs in agreement with bfloat16 is measured in docs/performance.md.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["Fp8Linear", "fp8_unavailable", "to_fp8"]

#: The largest magnitude float8 e4m3 holds.
_E4M3_MAX = 448.0


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 products cannot run on ``device``, or None when they can."""
    if device.type != "cuda":
        return "FP8 needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return "this torch has no float8 matrix product"
    return None


def _quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows x K) as float8 with one float32 scale per row."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / _E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


# Fused into one read of the activation and one write when Triton is there (set by ``to_fp8``).
_quantise = _quantise_rows


class Fp8Linear(torch.nn.Module):
    """A bfloat16 ``nn.Linear`` computed as a float8 product with row-wise scales."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        w8, w_scale = _quantise_rows(weight)
        self.out_features, self.in_features = weight.shape
        # Plain tensors, not buffers: made once on the model's device, never saved or moved.
        self.w8 = w8
        self.w_scale = w_scale.t().contiguous()
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.out_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x8, x_scale = _quantise(rows)
        # _scaled_mm wants its second operand column-major: the transpose of a row-major weight.
        out = torch._scaled_mm(
            x8,
            self.w8.t(),
            scale_a=x_scale,
            scale_b=self.w_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
            use_fast_accum=True,
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def to_fp8(backbone: torch.nn.Module, device: torch.device) -> int:
    """Replace every linear layer of ``backbone`` (whose dimensions the FP8 product takes) by an
    ``Fp8Linear``, in place. Returns how many were replaced; 0 with a warning where FP8 cannot run."""
    global _quantise
    reason = fp8_unavailable(device)
    if reason is not None:
        warnings.warn(f"FP8: {reason}; the backbone stays in bfloat16", RuntimeWarning, stacklevel=2)
        return 0
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        _quantise = torch.compile(_quantise_rows, dynamic=False)
    except Exception:  # noqa: BLE001 - unfused quantisation is slower, not wrong
        _quantise = _quantise_rows
    replaced = 0
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and _fits(child):
                setattr(parent, name, Fp8Linear(child))
                replaced += 1
    return replaced


def _fits(linear: torch.nn.Linear) -> bool:
    # The float8 product needs both dimensions to be multiples of 16.
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def describe(model: Any) -> str:
    """How many of the backbone's linear layers run in FP8 (for the worker's log)."""
    n = sum(isinstance(m, Fp8Linear) for m in model.modules())
    return f"{n} linear layers of the backbone in FP8"
