"""The fused rotary embedding alone, on the queries and keys of a batch of 16 as the ViT makes them
(a transposed view of the projection), for a windowed layer (9 windows of 576 tokens) and a global
one (5184 tokens): compiled as ``fused.fuse_rope`` compiles it (checked on the ViT's heads first,
so the batch and the tokens become the kernel's variables), as it was compiled before (checked on
another head size first, so the head size became a variable too), and specialised to each shape.
Prints milliseconds per call, the memory traffic it achieves (queries and keys read and written
once) and the largest difference from transformers' result.

    python benchmarks/rope_kernels.py          # CUDA
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


HOWS = ("fuse_rope", "checked on head size 32", "static")


def main() -> None:
    """Each way in a process of its own: compiled functions share caches within a process."""
    if len(sys.argv) > 1:
        measure(sys.argv[1])
        return
    for how in HOWS:
        subprocess.run([sys.executable, __file__, how], check=True)


def measure(how: str) -> None:
    import torch

    from batchseg.engines.sam3 import fused

    device = torch.device("cuda")
    fused.restore_rope()
    module = fused._sam3_module()
    original = module.apply_rotary_pos_emb_2d
    if how == "fuse_rope":
        assert fused.fuse_rope(device, heads=16, head_dim=64) is None
        fn = module.apply_rotary_pos_emb_2d
        fused.restore_rope()
    elif how == "static":
        fn = torch.compile(original, dynamic=False)
    else:
        fn = _first_called(torch.compile(original), (2, 4, 64, 32), device)
    batch, heads, dim = 16, 16, 64
    for layer, (rows, seq) in {"windowed": (batch * 9, 576), "global": (batch, 5184)}.items():
        projected = torch.randn(rows, seq, 3, heads, dim, device=device, dtype=torch.bfloat16)
        q, k = (projected[:, :, i].transpose(1, 2) for i in range(2))
        angles = (torch.rand(1, seq, dim // 2, device=device) * 40).repeat_interleave(2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        want = original(q, k, cos, sin)
        seconds = _timed(fn, (q, k, cos, sin))
        got = fn(q, k, cos, sin)
        worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(want, got, strict=True))
        traffic = 4 * q.numel() * q.element_size() / seconds / 1e12
        ms = 1000 * seconds
        print(f"{layer:8s} {how:24s} {ms:7.3f} ms  {traffic:5.2f} TB/s  max diff {worst:.4g}", flush=True)


def _first_called(fn: Any, shape: tuple[int, ...], device: Any) -> Any:
    import torch

    q = torch.randn(shape, device=device).to(torch.bfloat16)
    cos = torch.rand(shape[-2:], device=device)
    fn(q, q, cos, cos)
    return fn


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
