"""The messages between the pool and a worker process: small frozen dataclasses, never pixels.

pool -> worker   Task | Threads | Shutdown
worker -> pool   Ready | LoadFailed | Ack | Heartbeat | Done
launcher -> pool Unplaced (a worker the launcher found no room for, in the worker's stead)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Item, ItemResult
from .contract import Capabilities

__all__ = [
    "Ack",
    "Done",
    "FromWorker",
    "Heartbeat",
    "LoadFailed",
    "Ready",
    "Shutdown",
    "Task",
    "Threads",
    "ToWorker",
    "Unplaced",
]


@dataclass(frozen=True)
class Task:
    """A batch of one or more items for the engine; the watchdog budget is timeout x len(items)."""

    task_id: int
    items: tuple[Item, ...]
    #: Several workers: an item the worker would run in parts may be answered with its parts
    #: (``ItemResult.split``) for the pool to spread, instead of running them here.
    may_split: bool = False


@dataclass(frozen=True)
class Threads:
    """Use this many torch threads from now on (the pool learnt its size after this worker loaded)."""

    count: int


@dataclass(frozen=True)
class Shutdown:
    """Close the engine and exit."""


@dataclass(frozen=True)
class Ready:
    """The engine loaded and states what it can do."""

    pid: int
    capabilities: Capabilities


@dataclass(frozen=True)
class LoadFailed:
    """The engine factory raised; the worker exits right after sending this.

    ``config_error``: a ConfigError, the user's to fix (for example a prompt the engine cannot
    read): the run ends at once instead of trying to load again. ``detail``: the sentence for the
    user (the exception's class name leads unless it is a batchseg error that speaks for itself)."""

    detail: str
    traceback: str
    config_error: bool = False


@dataclass(frozen=True)
class Ack:
    """The worker took the task: the pool starts its clock now."""

    task_id: int


@dataclass(frozen=True)
class Heartbeat:
    """Part of the task is done (at most ``heartbeat_every`` more items): the clock starts again.

    ``results``: items finished since the last message, as (index in the task, result); the pool
    records them at once, so a crash later in the task costs none of them. ``reached``: the engine
    has touched no item at or past this index (None: it does not say), so after a crash those go
    back to the queue as fresh work instead of being suspects."""

    task_id: int
    results: tuple[tuple[int, ItemResult], ...] = ()
    reached: int | None = None
    notes: tuple[str, ...] = ()  # warnings raised in the worker since its last message


@dataclass(frozen=True)
class Done:
    """One result per item of the task, in order."""

    task_id: int
    results: list[ItemResult]
    notes: tuple[str, ...] = ()  # warnings raised in the worker since its last message


@dataclass(frozen=True)
class Unplaced:
    """No node had room for the worker within the launcher's wait (a Ray cluster without the CPUs
    or GPUs it asks for): it never started, and its process ends right after this. ``detail``:
    what it asked for and what is free, e.g. "cannot be placed: needs 2 CPU, the cluster has 0
    free of 2"."""

    detail: str


ToWorker = Task | Threads | Shutdown
FromWorker = Ready | LoadFailed | Ack | Heartbeat | Done | Unplaced
