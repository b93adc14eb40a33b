"""The fused rotary embedding alone: each function ``fused.fuse_rope`` can compile (``fused.KERNELS``,
and transformers' own) on the queries and keys of a batch of 16 as the ViT makes them (a transposed
view of the projection), for a global layer (5184 tokens) and a windowed one (9 windows of 576).
Each is compiled as ``fuse_rope`` compiles it (dynamic shapes from the second shape on) and
specialised to each shape (``static``). Prints milliseconds per call, the memory traffic it
achieves (queries and keys read and written once) and the largest difference from transformers'
result.

    python benchmarks/rope_kernels.py          # CUDA
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from batchseg.engines.sam3 import fused

    device = torch.device("cuda")
    fused.restore_rope()
    original = fused._sam3_module().apply_rotary_pos_emb_2d
    kernels = {"transformers": original, **fused.KERNELS}
    # As fuse_rope compiles (shapes made dynamic at the second one), and specialised to each shape.
    compiled = {name: torch.compile(fn) for name, fn in kernels.items()}
    compiled.update({f"{name} static": torch.compile(fn, dynamic=False) for name, fn in kernels.items()})
    batch, heads, dim = 16, 16, 64
    for layer, (rows, seq) in {"global": (batch, 5184), "windowed": (batch * 9, 576)}.items():
        projected = torch.randn(rows, seq, 3, heads, dim, device=device, dtype=torch.bfloat16)
        q, k = (projected[:, :, i].transpose(1, 2) for i in range(2))
        angles = (torch.rand(seq, dim // 2, device=device) * 40).repeat_interleave(2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        want = original(q, k, cos, sin)
        for name, fn in compiled.items():
            seconds = _timed(fn, (q, k, cos, sin))
            got = fn(q, k, cos, sin)
            worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(want, got, strict=True))
            traffic = 4 * q.numel() * q.element_size() / seconds / 1e12
            ms = 1000 * seconds
            print(f"{layer:8s} {name:19s} {ms:7.3f} ms  {traffic:5.2f} TB/s  max diff {worst:.4g}")


def _timed(fn: Any, args: tuple[Any, ...], calls: int = 50) -> float:
    import torch

    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
