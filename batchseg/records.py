"""The small records that move between discovery, workers, the checkpoint and the manifests.

They hold paths, numbers and short strings only: pixels never cross a pipe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Detection", "Item", "ItemResult", "Status", "FINAL_FAILURES"]

#: Version of the on-disk output format (masks, manifests, checkpoint); part of the config fingerprint.
OUTPUT_FORMAT_VERSION = 1


class Status(str, enum.Enum):
    """What happened to one image; exactly one per image in images.parquet."""

    OK = "ok"  # ran; zero detections is still ok
    ERROR = "error"  # Python exception in the worker: class, message, traceback
    TIMEOUT = "timeout"  # the watchdog killed the worker
    CRASHED = "crashed"  # the worker died (segfault, os._exit, OOM killer)
    INVALID_INPUT = "invalid_input"  # unreadable, truncated, not an image, too many pixels
    SKIPPED = "skipped"  # filtered out
    MISSING = "missing"  # seen in an earlier run, gone now

    def __str__(self) -> str:
        return self.value


#: Statuses that ``batchseg retry`` reruns by default.
FINAL_FAILURES = (Status.ERROR, Status.TIMEOUT, Status.CRASHED, Status.INVALID_INPUT)


@dataclass(frozen=True)
class Item:
    """One image to process, identified by its path relative to the input root."""

    path: str  # relative to the input root, forward slashes
    size_bytes: int
    mtime_ns: int
    content_hash: str | None = None  # sha256 hex, only with --hash


@dataclass(frozen=True)
class Detection:
    """One detected instance. ``index`` is its 1-based value in the image's label map."""

    prompt: str
    index: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    area_px: int  # pixels of this instance in the label map
    mask_rle: str  # COCO compressed RLE counts of (label map == index), column-major


@dataclass
class ItemResult:
    """The outcome of one attempt at one image; sent from a worker to the parent."""

    path: str
    status: Status
    attempts: int = 1
    width: int | None = None
    height: int | None = None
    detections: list[Detection] = field(default_factory=list)
    mask_path: str | None = None  # relative to the output folder, forward slashes
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    exit_code: int | None = None  # of a crashed worker; negative = signal number
    started_at: float | None = None  # epoch seconds
    finished_at: float | None = None
    worker_pid: int | None = None
    device: str | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class RowState(str, enum.Enum):
    """States a stored image row holds before it has a Status: found, and handed to a worker."""

    PENDING = "pending"  # discovered, not tried yet (or to be redone)
    RUNNING = "running"  # handed to a worker; a crash leaves it, and the next run redoes it

    def __str__(self) -> str:
        return self.value


#: Every state an image row can hold, for zero-filled counts.
ALL_STATES = tuple(s.value for s in Status) + tuple(s.value for s in RowState)
