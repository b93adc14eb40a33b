"""The small records that move between discovery, workers, the checkpoint and the manifests.

They hold paths, numbers and short strings only: pixels never cross a pipe.
"""

from __future__ import annotations

import enum
import os
import time
import traceback
from dataclasses import dataclass, field

__all__ = [
    "FAILURE_VALUES",
    "FINAL_FAILURES",
    "FINAL_STATUSES",
    "Detection",
    "FailureCategory",
    "Part",
    "Split",
    "Item",
    "ItemResult",
    "Status",
    "failure_result",
    "part_failure",
]

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


class FailureCategory(str, enum.Enum):
    """Whose failure a failed result is: the run's answer to it depends on that alone."""

    IMAGE = "image"  # this image failed; the run goes on (retried while attempts are left)
    OUTPUT = "output"  # the output folder cannot be written: fatal, the run ends with exit 1

    def __str__(self) -> str:
        return self.value


#: The statuses of an image that failed, the one list of them: ``batchseg retry`` reruns these by
#: default, and a count of failures counts these.
FINAL_FAILURES = (Status.ERROR, Status.TIMEOUT, Status.CRASHED, Status.INVALID_INPUT)
#: The same as the ``status`` column stores them.
FAILURE_VALUES = tuple(s.value for s in FINAL_FAILURES)
#: Final statuses: an image in one of these, its input unchanged, is done (a resume does not redo it).
FINAL_STATUSES = (Status.OK, *FINAL_FAILURES)


@dataclass(frozen=True)
class Item:
    """One image to process, identified by its path relative to the input root."""

    path: str  # relative to the input root, forward slashes
    size_bytes: int
    mtime_ns: int
    content_hash: str | None = None  # sha256 hex, only with --hash
    #: Only this part of the image, (x0, y0, x1, y1) in pixels of the upright image: the engine
    #: returns boxes in the whole image's frame, masks of the window's size and no label map.
    #: None: the whole image.
    window: tuple[int, int, int, int] | None = None
    #: Set by the pool on the items of an item a worker split into parts (see
    #: ``supervise.splits``); engines never see it. None: an image as discovery found it.
    part: Part | None = None


@dataclass(frozen=True)
class Part:
    """One part of a split item's work: part ``key`` (the item's window is its region) or, with
    ``key`` None, the join of the item's finished parts into its one result. ``plan`` is the
    worker's own description of the split (for tiles, ``tiles.grid.plan_tiles``'s arguments): the
    pool carries it without reading it. ``noun`` names a part in messages ("tile")."""

    plan: tuple[int, ...]
    key: str | None = None
    noun: str = "part"


@dataclass(frozen=True)
class Split:
    """A worker's answer splitting an item into parts for the pool to spread over its workers:
    the parts still to run (key and window; parts already done left out)."""

    plan: tuple[int, ...]
    parts: tuple[tuple[str, tuple[int, int, int, int]], ...]
    noun: str = "part"


@dataclass(frozen=True)
class Detection:
    """One detected instance. ``index`` is its 1-based value in the image's label map."""

    prompt: str
    index: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    area_px: int  # pixels of this instance in the label map
    mask_rle: str  # COCO compressed RLE counts of (label map == index), column-major
    tiles: int = 1  # tiles of a tiled image that had a view of it folded into this detection
    folded: tuple[str, ...] = ()  # prompts whose detection of this object was folded into it


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
    category: FailureCategory | None = None  # of a failed result; None for ok, skipped, missing
    # Georeference of the input (None for an image without one); see batchseg.worker.reading.
    crs_wkt: str | None = None  # WKT2; None also for a world file without a CRS
    crs_epsg: int | None = None
    transform: str | None = None  # JSON [a, b, c, d, e, f]: x = a*col + b*row + c, y = d*col + e*row + f
    georef_source: str | None = None  # "internal" (GeoTIFF keys) or the world file's name
    split: Split | None = None  # not a final result: the item's parts, for the pool to spread

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


def failure_result(
    item: Item,
    status: Status,
    *,
    exc: BaseException | None = None,
    error_type: str | None = None,
    message: str | None = None,
    category: FailureCategory = FailureCategory.IMAGE,
    exit_code: int | None = None,
    device: str | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> ItemResult:
    """The one way to build a failed result (engines, worker, pool and runner alike).

    With ``exc``: its class name, message and traceback text, unless ``error_type`` or ``message``
    say otherwise. Times default to now; ``worker_pid`` is this process (the pool sets the
    worker's for the failures it decides itself, such as a timeout)."""
    now = time.time()
    if exc is not None:
        error_type = error_type or type(exc).__name__
        message = message or str(exc) or repr(exc)
    trace = None if exc is None else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ItemResult(
        path=item.path,
        status=status,
        error_type=error_type,
        error_message=message,
        traceback=trace,
        exit_code=exit_code,
        started_at=now if started_at is None else started_at,
        finished_at=now if finished_at is None else finished_at,
        worker_pid=os.getpid(),
        device=device,
        category=category,
    )


class RowState(str, enum.Enum):
    """States a stored image row holds before it has a Status: found, and handed to a worker."""

    PENDING = "pending"  # discovered, not tried yet (or to be redone)
    RUNNING = "running"  # handed to a worker; a crash leaves it, and the next run redoes it

    def __str__(self) -> str:
        return self.value


#: Every state an image row can hold, for zero-filled counts.
ALL_STATES = tuple(s.value for s in Status) + tuple(s.value for s in RowState)


def part_failure(
    item: Item, noun: str, key: str, window: tuple[int, int, int, int], result: ItemResult, started: float
) -> ItemResult:
    """The item's failure from its failing part: the part's status, category and error, the
    message naming the part and its window."""
    x0, y0, x1, y1 = window
    where = f"{noun} {key} (window x {x0}-{x1}, y {y0}-{y1})"
    failed = failure_result(
        item,
        result.status,
        error_type=result.error_type or result.status.value,
        message=f"{where}: {result.error_message or result.status.value}",
        category=result.category or FailureCategory.IMAGE,
        exit_code=result.exit_code,
        device=result.device,
        started_at=started,
    )
    failed.traceback = result.traceback
    failed.worker_pid = result.worker_pid
    return failed
