"""Host and device time of one image's post-processing in the dense case (100 masks, full size).

    python benchmarks/dense_postprocess.py [--device cuda] [--size 2048x1536] [--masks 100]

Times ``compose`` (upsample, paint, areas, copy to the host) as the thread that runs the model sees
it, on random low-resolution mask logits like an untrained decoder's, against the earlier
implementation (a pass per mask, areas counted on the host), and checks both give the same map.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from batchseg.engines.sam3.postprocess import Candidates, Instance, compose, iter_masks


def reference_compose(candidates: Candidates, height: int, width: int, mask_threshold: float) -> tuple:
    """The implementation before the dense-case work: one masked_fill per mask, areas on the host."""
    labels = torch.zeros((height, width), dtype=torch.int32, device=candidates.masks.device)
    for start, masks in iter_masks(candidates.masks, height, width, mask_threshold):
        claim = torch.zeros_like(labels)
        for i in range(masks.shape[0] - 1, -1, -1):
            claim.masked_fill_(masks[i], start + 1 + i)
        torch.where(labels == 0, claim, labels, out=labels)
    label_map = labels.cpu().numpy().astype(np.uint16)
    areas = np.bincount(label_map.ravel(), minlength=len(candidates.instances) + 1)[1:]
    return label_map, areas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="2048x1536")
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    low = F.avg_pool2d(torch.randn(1, args.masks, 288, 288), 5, 1, 2)[0] * 3
    low = low.to(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    instances = [Instance(0, i, 1 - i / 1000, (0.0, 0.0, 1.0, 1.0)) for i in range(args.masks)]
    candidates = Candidates(instances, low)
    report = {}
    for name, fn in (
        ("reference", lambda: reference_compose(candidates, height, width, 0.5)),
        ("compose", lambda: (lambda s: (s.labels, s.areas))(compose(candidates, height, width, 0.5))),
    ):
        fn()
        host = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            host.append(time.perf_counter() - start)
        report[name] = {"ms_per_image": round(1000 * float(np.median(host)), 2)}
    ref_map, ref_areas = reference_compose(candidates, height, width, 0.5)
    seg = compose(candidates, height, width, 0.5)
    report["same_label_map"] = bool(np.array_equal(ref_map, seg.labels))
    report["same_areas"] = bool(np.array_equal(ref_areas, seg.areas))
    report["labels_present"] = int(len(np.unique(seg.labels)) - 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
