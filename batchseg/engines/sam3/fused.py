"""A fused kernel for the one hot spot of SAM3's eager forward pass that is pure memory traffic.

The ViT's rotary position embedding (transformers' ``apply_rotary_pos_emb_2d``) upcasts the
queries and keys to float32 and runs about ten elementwise passes over them (upcast, rotate, two
multiplies, add, downcast) in each of the 32 layers: a large share of the GPU's time
(docs/performance.md). ``torch.compile`` of the embedding fuses them into one read and one write
per tensor; it compiles in seconds, far sooner than the whole backbone (``--compile``).

Which function is compiled matters (``KERNELS``, measured on an H100 by the benchmark
``rope_kernels.py``): transformers' own, compiled as it is, reaches a seventh of the card's memory
bandwidth; the same float32 products written without its stack of rotated halves (``rope_float32``:
the sign of the rotation moved into the sine, the pairs swapped by a flip) give the same bits.
``rope_in_dtype`` computes in the queries' own dtype (bfloat16): one rounding more per product.

Only on CUDA devices Triton can compile for (compute capability 7.0 and newer, Triton installed);
anywhere else, or if the fused function does not match the original, SAM3 keeps the original.
"""

from __future__ import annotations

import importlib.util
import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

#: The largest difference allowed between the fused and the original rotary embedding, relative
#: to the result's magnitude: about one bfloat16 step (both compute in float32 and round once).
TOLERANCE = 1e-2


def _sam3_module() -> Any:
    from transformers.models.sam3 import modeling_sam3

    return modeling_sam3


def fuse_rope(device: torch.device) -> str | None:
    """Route SAM3's ViT rotary embedding through a fused kernel, process-wide (a worker holds one
    model). Returns None when done, else why not; a mismatch or a compile failure also warns.
    Call ``restore_rope`` first where an earlier model in the process may have fused it."""
    module = _sam3_module()
    original: Callable[..., Any] | None = getattr(module, "apply_rotary_pos_emb_2d", None)
    if original is None:
        return "this transformers has no apply_rotary_pos_emb_2d"
    original = getattr(original, "batchseg_original", original)
    if device.type != "cuda":
        return "fused kernels are for CUDA"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if torch.cuda.get_device_capability(device) < (7, 0):
        return "Triton needs compute capability 7.0 or newer"
    import torch._inductor.config as inductor_config

    # A few small kernels: compiled in this process, rather than in a pool of compiler processes
    # started for them (more children for the watchdog's kills to leave behind).
    inductor_config.compile_threads = 1
    # Shapes: windowed and global layers, then dynamic.
    fused = torch.compile(original if KERNEL == "transformers" else KERNELS[KERNEL])
    fused.batchseg_original = original  # type: ignore[attr-defined]
    try:
        error = _mismatch(original, fused, device)
    except Exception as exc:  # noqa: BLE001 - an optimisation: the original stays
        error = f"{type(exc).__name__}: {exc}"
    if error is not None:
        module.apply_rotary_pos_emb_2d = original
        reason = f"the fused rotary embedding failed its check ({error}); using the original"
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return reason
    module.apply_rotary_pos_emb_2d = fused
    return None


def rope_float32(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb_2d``, the same float32 products and one rounding:
    rotate(x) * sin, where rotate(x) = (-x1, x0) pairwise, is computed as swap(x) * (-sin0, sin1)
    (a negation is exact, so the bits are the same)."""
    signed = (sin.view(*sin.shape[:-1], -1, 2) * _SIGNS.to(sin.device, sin.dtype)).flatten(-2)
    return _turned(q, cos, signed).type_as(q), _turned(k, cos, signed).type_as(k)


def _turned(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    swapped = x.view(*x.shape[:-1], -1, 2).flip(-1).flatten(-2)
    return x.float() * cos + swapped.float() * signed_sin


def rope_in_dtype(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding with the products in the queries' dtype (cos and sin rounded to it):
    within one step of that dtype of transformers' float32 result."""
    signed = (sin.view(*sin.shape[:-1], -1, 2) * _SIGNS.to(sin.device, sin.dtype)).flatten(-2)
    cos, signed = cos.to(q.dtype), signed.to(q.dtype)

    def turned(x: torch.Tensor) -> torch.Tensor:
        return x * cos + x.view(*x.shape[:-1], -1, 2).flip(-1).flatten(-2) * signed

    return turned(q), turned(k)


_SIGNS = torch.tensor([-1.0, 1.0])

#: The functions ``fuse_rope`` can compile; ``KERNEL`` is the one it does ("transformers":
#: transformers' own function).
KERNELS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "float32": rope_float32,
    "in_dtype": rope_in_dtype,
}
KERNEL = os.environ.get("BATCHSEG_ROPE_KERNEL", "float32")  # the variable: for benchmarks


def use_rope(kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Route SAM3's ViT rotary embedding through ``kernel`` as it is (not compiled here)."""
    module = _sam3_module()
    original = module.apply_rotary_pos_emb_2d
    original = getattr(original, "batchseg_original", original)

    def rope(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel(*args, **kwargs)

    rope.batchseg_original = original  # type: ignore[attr-defined]
    module.apply_rotary_pos_emb_2d = rope


def restore_rope() -> None:
    """Put transformers' own rotary embedding back (tests)."""
    module = _sam3_module()
    current = module.apply_rotary_pos_emb_2d
    module.apply_rotary_pos_emb_2d = getattr(current, "batchseg_original", current)


def _mismatch(original: Callable[..., Any], fused: Callable[..., Any], device: torch.device) -> str | None:
    """Both versions on random bfloat16 queries and keys shaped like a window of the ViT."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k = (
        torch.randn((2, 4, 64, 32), generator=generator, device=device).to(torch.bfloat16) for _ in range(2)
    )
    angles = torch.rand((64, 32), generator=generator, device=device) * 6.3
    cos, sin = angles.cos(), angles.sin()
    with torch.inference_mode():
        want = original(q, k, cos, sin)
        got = fused(q, k, cos, sin)
    for name, a, b in zip("qk", want, got, strict=True):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{name}: {b.dtype} {tuple(b.shape)} instead of {a.dtype} {tuple(a.shape)}"
        worst = float((a.float() - b.float()).abs().max())
        if worst > TOLERANCE * max(1.0, float(a.float().abs().max())):
            return f"{name} differs by {worst:.3g}"
    return None


def fuse_qkv(backbone: torch.nn.Module) -> int:
    """One matrix product for each ViT attention's query, key and value projections instead of
    three (one read of the layer's input instead of three, and a larger product), in place.
    Returns how many attention layers were fused. The arithmetic is the same products; only
    their grouping into kernels changes."""
    module = _sam3_module()
    fused = 0
    for attn in backbone.modules():
        if not isinstance(attn, module.Sam3ViTRoPEAttention) or hasattr(attn, "qkv"):
            continue
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        first = parts[0]
        qkv = torch.nn.Linear(
            first.in_features,
            3 * first.out_features,
            bias=first.bias is not None,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([p.weight for p in parts]))
            if qkv.bias is not None:
                qkv.bias.copy_(torch.cat([p.bias for p in parts]))
        attn.qkv = qkv
        del attn.q_proj, attn.k_proj, attn.v_proj  # the weights live once, in qkv
        attn.forward = types.MethodType(_qkv_attention, attn)
        fused += 1
    return fused


def _qkv_attention(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' ``Sam3ViTRoPEAttention.forward`` with the three projections as one."""
    module = _sam3_module()
    batch_size, height, width, _ = hidden_states.shape
    shape = (batch_size, height * width, 3, self.num_attention_heads, self.head_dim)
    query, key, value = (t.transpose(1, 2) for t in self.qkv(hidden_states).view(shape).unbind(2))
    cos, sin = position_embeddings
    query, key = module.apply_rotary_pos_emb_2d(query, key, cos=cos, sin=sin)
    attention = module.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, module.eager_attention_forward
    )
    out, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        dropout=0.0,
        scaling=self.scaling,
        is_causal=self.is_causal,
        **kwargs,
    )
    out = out.reshape(batch_size, height, width, -1).contiguous()
    return self.o_proj(out), weights
