"""What ``run_pool`` is told (PoolSettings) and what it tells (PoolEvent, PoolOutcome).

Parent side: must not import torch.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..config import RunConfig
from ..errors import BadValueError
from ..records import ItemResult

__all__ = ["EventKind", "PoolEvent", "PoolOutcome", "PoolSettings"]


@dataclass(frozen=True)
class PoolSettings:
    """How the pool runs; each knob is explained where it is used (Pool, Ledger, WorkerHandle)."""

    workers: int | None = None  # None: one per GPU on CUDA, one on CPU
    threads: int | None = None  # torch threads per worker; None: usable cores / workers
    task_size: int | None = 1  # items per task; None: what each worker's engine suggests
    timeout: float = 300.0  # seconds per item, from the worker's Ack
    load_timeout: float = 600.0  # seconds for a worker to load the engine
    max_attempts: int = 2
    max_images_per_worker: int | None = None  # None: never recycle
    max_consecutive_failures: int | None = 20  # None or 0: no circuit breaker
    stop_grace: float = 2.0  # seconds between terminate and kill
    close_grace: float = 10.0  # seconds a worker gets to close its engine when asked to exit
    load_retries: int = 3  # replacement load failures in a row before ModelLoadError
    load_backoff: float = 2.0  # first wait before a failed replacement load is retried; doubles

    def __post_init__(self) -> None:
        positive = {
            "workers": self.workers,
            "threads": self.threads,
            "task_size": self.task_size,
            "max_attempts": self.max_attempts,
            "max_images_per_worker": self.max_images_per_worker,
            "timeout": self.timeout,
            "load_timeout": self.load_timeout,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise BadValueError(f"{name.replace('_', '-')} must be greater than 0, not {value}")

    @classmethod
    def from_config(cls, config: RunConfig, **overrides: object) -> PoolSettings:
        """The pool settings of a RunConfig (``task_size=None``: the engine's suggestion)."""
        values: dict[str, object] = {
            "workers": config.workers,
            "threads": config.threads,
            # --batch-size is the engine's forward batch, not the task size: the engine suggests
            # that (from its batch) in its Capabilities.
            "task_size": None,
            "timeout": config.timeout,
            "load_timeout": config.load_timeout,
            "max_attempts": config.max_attempts,
            "max_images_per_worker": config.max_images_per_worker,
            "max_consecutive_failures": config.max_consecutive_failures,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


class EventKind(str, enum.Enum):
    """What a PoolEvent tells; the value is the word the log shows."""

    WORKER_STARTED = "worker_started"
    WORKER_READY = "worker_ready"
    WORKER_EXITED = "worker_exited"
    WORKER_TIMEOUT = "worker_timeout"
    WORKER_LOST = "worker_lost"
    WORKER_UNPLACED = "worker_unplaced"  # the launcher found no room for it
    WORKER_WARNING = "worker_warning"  # a warning shown in a worker
    LOAD_FAILED = "load_failed"
    RECYCLE = "recycle"
    POOL_SIZE = "pool_size"
    ATTEMPT_FAILED = "attempt_failed"  # to be retried; final results go to ``on_result``
    BATCH_SPLIT = "batch_split"
    STOPPING = "stopping"
    CIRCUIT_BREAKER = "circuit_breaker"
    TASK_STARTED = "task_started"  # a worker took a task: the event's ``paths`` are its items

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PoolEvent:
    """Something the log should tell: a failed attempt, a worker started, ready, stopped or replaced."""

    kind: EventKind
    message: str
    slot: int | None = None
    pid: int | None = None
    result: ItemResult | None = None
    traceback: str | None = None
    paths: tuple[str, ...] = ()
    time: float = field(default_factory=time.time)


@dataclass
class PoolOutcome:
    """How the pool ended. ``stopped`` is None when every item got a final result."""

    stopped: str | None = None  # the should_stop() reason, or "circuit_breaker"
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # final results by status value
    device: str | None = None  # as the first worker reported it
