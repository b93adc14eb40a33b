"""The backbone replayed as CUDA graphs at the full batch and at short sizes (GPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchseg.engines.sam3.model import load_model
from batchseg.engines.sam3.speedups import FixedBatchBackbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_short_graphs_share_a_pool_and_match_launching_the_kernels(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sub-batches of mixed sizes, in an order unlike their captures: each replay gives what the
    backbone gives when launched as usual, though the graphs share their memory; a size past the
    cap of short graphs runs as it comes."""
    monkeypatch.setattr(FixedBatchBackbone, "SHORT_GRAPHS", 2)
    model, processor = load_model(str(tiny_model), "cuda", "float32")
    backbone = model.vision_encoder.backbone
    graphed = FixedBatchBackbone(backbone, batch=4, graph=True)
    side = int(processor.image_processor.size["height"])
    generator = torch.Generator().manual_seed(0)
    sizes = [4, 3, 1, 4, 2, 3, 1, 4]
    batches = [torch.randn((n, 3, side, side), generator=generator).cuda() for n in sizes]
    with torch.inference_mode():
        want = [backbone(b).last_hidden_state.clone() for b in batches]
        got = [graphed(b).last_hidden_state for b in batches]  # each kept while the next replays
    assert sorted(graphed._graphs) == [1, 3, 4]  # 2 came after the cap of two short sizes
    for n, a, b in zip(sizes, got, want, strict=True):
        assert a.shape[0] == n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
