"""Builders shared by the checkpoint, manifest, lock and status tests: configs, items and results
as a worker would send them, with real mask files where a result names one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from batchseg.config import RunConfig
from batchseg.records import Detection, Item, ItemResult, Status


def make_config(**changes: object) -> RunConfig:
    # tile="off": what the runner resolves --tile to for a folder made before tiling (the runner
    # does that, Checkpoint.open does not), so these configurations open tests/data/run-made-by-0.1.0.
    base = RunConfig(input=Path("aerial"), prompts=("roof",), model="models/sam3", tile="off")
    return base.with_changes(**changes) if changes else base


def make_items(n: int, prefix: str = "img") -> list[Item]:
    return [Item(f"{prefix}/{i:06d}.jpg", 1000 + i, 1_700_000_000_000_000_000 + i) for i in range(n)]


def detections(n: int) -> list[Detection]:
    return [
        Detection("roof", k, 0.5 + k / 100, (1.0 * k, 2.0, 3.0 + k, 4.5), 10 * k, f"rle{k}")
        for k in range(1, n + 1)
    ]


def ok_result(
    item: Item,
    output_dir: Path | None = None,
    n_det: int = 1,
    duration: float = 1.0,
    finished: float | None = None,
) -> ItemResult:
    """An ok result; with ``output_dir`` its mask file is written, as a worker would."""
    mask = f"masks/{item.path}.png"
    if output_dir is not None:
        (output_dir / mask).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / mask).write_bytes(b"png")
    end = time.time() if finished is None else finished
    return ItemResult(
        item.path,
        Status.OK,
        attempts=1,
        width=64,
        height=48,
        detections=detections(n_det),
        mask_path=mask,
        started_at=end - duration,
        finished_at=end,
        worker_pid=4242,
        device="cpu float32",
    )


def failed_result(
    item: Item,
    status: Status = Status.ERROR,
    error_type: str | None = "ValueError",
    message: str = "cannot decode",
    attempts: int = 1,
) -> ItemResult:
    end = time.time()
    return ItemResult(
        item.path,
        status,
        attempts=attempts,
        error_type=error_type,
        error_message=message,
        traceback="Traceback (most recent call last):\n  ...",
        exit_code=-9 if status is Status.CRASHED else None,
        started_at=end - 0.5,
        finished_at=end,
        worker_pid=4243,
        device="cpu float32",
    )


def python(code: str, **kwargs: object) -> subprocess.Popen[str]:
    """A child Python running ``code``, stdout piped as text."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **kwargs
    )
