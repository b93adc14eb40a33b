"""A fused kernel for the one hot spot of SAM3's eager forward pass that is pure memory traffic.

The ViT's rotary position embedding (transformers' ``apply_rotary_pos_emb_2d``) upcasts the
queries and keys to float32 and runs about ten elementwise passes over them (upcast, rotate, two
multiplies, add, downcast) in each of the 32 layers: a large share of the GPU's time
(docs/performance.md). ``torch.compile`` of that one function fuses them into one read and one
write per tensor, with the same float32 arithmetic; it compiles in seconds, far sooner than the
whole backbone (``--compile``).

Only on CUDA devices Triton can compile for (compute capability 7.0 and newer, Triton installed);
anywhere else, or if the fused function does not match the original, SAM3 keeps the original.
"""

from __future__ import annotations

import importlib.util
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


def fuse_rope(device: torch.device, heads: int = 16, head_dim: int = 64) -> str | None:
    """Route SAM3's ViT rotary embedding through a fused kernel, process-wide (a worker holds one
    model). Returns None when done, else why not; a mismatch or a compile failure also warns.
    Call ``restore_rope`` first where an earlier model in the process may have fused it.

    ``heads`` and ``head_dim`` are the ViT's (SAM3's 16 and 64): the check runs on them. The first
    shapes a compiled function meets after its first decide which sizes its kernel takes as
    variables: the batch and the tokens vary (windowed and global layers, short batches), the heads
    and the head size must not. A check on another head size once made them variables, and the
    kernel ran at a seventh of the speed (docs/performance.md)."""
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
    fused = torch.compile(original)  # shapes: windowed and global layers, then dynamic
    fused.batchseg_original = original  # type: ignore[attr-defined]
    try:
        error = _mismatch(original, fused, device, heads, head_dim)
    except Exception as exc:  # noqa: BLE001 - an optimisation: the original stays
        error = f"{type(exc).__name__}: {exc}"
    if error is not None:
        module.apply_rotary_pos_emb_2d = original
        reason = f"the fused rotary embedding failed its check ({error}); using the original"
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return reason
    module.apply_rotary_pos_emb_2d = fused
    return None


def restore_rope() -> None:
    """Put transformers' own rotary embedding back (tests)."""
    module = _sam3_module()
    current = module.apply_rotary_pos_emb_2d
    module.apply_rotary_pos_emb_2d = getattr(current, "batchseg_original", current)


def _mismatch(
    original: Callable[..., Any], fused: Callable[..., Any], device: torch.device, heads: int, head_dim: int
) -> str | None:
    """Both versions on random bfloat16 queries and keys laid out as the ViT's attention makes them
    (a transposed view of each projection, its heads and head size; cos and sin of one row), for
    64 tokens."""
    generator = torch.Generator(device=device).manual_seed(0)
    projected = (
        torch.randn((2, 64, heads, head_dim), generator=generator, device=device).to(torch.bfloat16)
        for _ in range(2)
    )
    q, k = (p.transpose(1, 2) for p in projected)
    angles = torch.rand((1, 64, head_dim), generator=generator, device=device) * 6.3
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


def fuse_gelu(backbone: torch.nn.Module) -> int:
    """The ViT MLPs' first product, its bias and its GELU as one cuBLAS kernel (the GELU in the
    product's epilogue) instead of a product and a pass over its output, the largest activation of
    each layer (4736 channels), in place. Returns how many MLPs were changed.

    The epilogue computes GELU's tanh form where transformers' ViT uses the exact one: the two differ
    by at most 4.7e-4 (at x = -2.7), half a bfloat16 step of a value of 0.125; the effect on the
    model's outputs is measured against bfloat16's own noise (docs/performance.md)."""
    module = _sam3_module()
    layer_type, mlp_type = getattr(module, "Sam3ViTLayer", None), getattr(module, "Sam3MLP", None)
    if layer_type is None or mlp_type is None or not hasattr(torch, "_addmm_activation"):
        return 0  # another transformers or torch: their own MLPs, unchanged
    fused = 0
    for layer in backbone.modules():
        mlp = getattr(layer, "mlp", None)
        if not isinstance(layer, layer_type) or not isinstance(mlp, mlp_type):
            continue
        if "forward" in vars(mlp) or getattr(mlp.config, "hidden_act", None) != "gelu":
            continue
        mlp.forward = types.MethodType(_gelu_mlp, mlp)
        fused += 1
    return fused


def restore_gelu(backbone: torch.nn.Module) -> None:
    """transformers' own MLPs again where ``fuse_gelu`` changed them."""
    for mlp in backbone.modules():
        if vars(mlp).get("forward") is not None and getattr(mlp.forward, "__func__", None) is _gelu_mlp:
            del mlp.forward


def _gelu_mlp(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' ``Sam3MLP.forward`` (inference: no dropout) with fc1, its bias and the GELU in
    one ``addmm`` whose epilogue applies the activation."""
    fc1 = self.fc1
    if not isinstance(fc1, torch.nn.Linear) or fc1.bias is None:  # replaced since (FP8, say)
        return self.fc2(self.activation_fn(fc1(hidden_states)))  # type: ignore[no-any-return]
    rows = hidden_states.reshape(-1, fc1.in_features)
    inner = torch._addmm_activation(fc1.bias, rows, fc1.weight.t(), use_gelu=True)
    out = self.fc2(inner)
    return out.view(*hidden_states.shape[:-1], out.shape[-1])  # type: ignore[no-any-return]


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
