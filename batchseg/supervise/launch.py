"""Where worker processes run: this machine (``LocalLauncher``) or a Ray cluster
(``batchseg.supervise.ray_backend.RayLauncher``). The pool is the same for both.

Parent side: must not import torch.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.connection import Connection
from typing import Protocol

from ..worker.contract import EngineSpec
from ..worker.process import worker_main

__all__ = ["Launcher", "LocalLauncher", "WorkerProcess", "usable_cores"]

_CTX = multiprocessing.get_context("spawn")


class WorkerProcess(Protocol):
    """What the pool needs of a worker: a ``multiprocessing.Process`` or a Ray actor's bridge."""

    @property
    def pid(self) -> int | None: ...
    @property
    def sentinel(self) -> int: ...
    @property
    def exitcode(self) -> int | None: ...
    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts the pool's workers, and says how many a device allows."""

    def start(self, spec: EngineSpec, slot: int, threads: int) -> tuple[WorkerProcess, Connection]:
        """A started worker serving ``spec`` and the pool's end of its duplex connection."""
        ...

    def pool_size(self, spec: EngineSpec, cuda: bool, gpu_count: int) -> int:
        """Workers when the user set none (``gpu_count``: CUDA devices the first worker saw)."""
        ...

    def threads(self, workers: int) -> int:
        """Torch threads per worker when the user set none."""
        ...


class LocalLauncher:
    """Worker processes on this machine, started with ``spawn`` as daemons."""

    def start(self, spec: EngineSpec, slot: int, threads: int) -> tuple[WorkerProcess, Connection]:
        parent_end, child_end = _CTX.Pipe(duplex=True)
        process = _CTX.Process(
            target=worker_main,
            args=(spec, slot, child_end, threads),
            name=f"batchseg-worker-{slot}",
            daemon=True,
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the worker dies
        return process, parent_end

    def pool_size(self, spec: EngineSpec, cuda: bool, gpu_count: int) -> int:
        pinned = ":" in spec.config.device  # the user named one GPU
        return max(1, gpu_count) if cuda and not pinned else 1

    def threads(self, workers: int) -> int:
        return max(1, usable_cores() // workers)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
