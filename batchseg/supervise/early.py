"""The first worker loads its model while the parent still walks the input and plans the run.

On a nightly folder of a million files, discovery and the plan take about 11 s on 2 cores, and a
model load takes 5 s on a CPU and longer on a GPU (weights, CUDA graph capture): one after the
other, they are the wait before the first new image. ``EarlyStart`` starts the worker of slot 0
before discovery and hands it to the pool as that slot's first worker, so the two overlap. A worker
the pool never takes (nothing to do, a check that refused the run, an exception) is stopped when
the ``with`` block ends.

Parent side: must not import torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection

from ..worker.contract import EngineSpec
from .launch import Launcher, LocalLauncher, WorkerProcess
from .settings import PoolSettings

__all__ = ["EarlyStart", "early_start"]


class EarlyStart:
    """A ``Launcher`` whose first start of slot 0 returns the worker started at construction.

    The early worker is started exactly as the pool would start slot 0 (its share of threads for
    ``settings.workers or 1`` workers, the spec with that thread count), so adopting it changes
    nothing the worker sees. A later start that differs gets a new worker and the early one stops.
    """

    def __init__(self, inner: Launcher, spec: EngineSpec, settings: PoolSettings) -> None:
        self.inner = inner
        self.early_threads = settings.threads or inner.threads(settings.workers or 1)
        self.spec = replace(spec, config=spec.config.with_changes(threads=self.early_threads))
        self.stop_grace = settings.stop_grace
        self.early: tuple[WorkerProcess, Connection] | None = inner.start(self.spec, 0, self.early_threads)

    def start(self, spec: EngineSpec, slot: int, threads: int) -> tuple[WorkerProcess, Connection]:
        if self.early is not None and (spec, slot, threads) == (self.spec, 0, self.early_threads):
            early, self.early = self.early, None
            return early
        return self.inner.start(spec, slot, threads)

    def pool_size(self, spec: EngineSpec, cuda: bool, gpu_count: int) -> int:
        return self.inner.pool_size(spec, cuda, gpu_count)

    def threads(self, workers: int) -> int:
        return self.inner.threads(workers)

    def close(self) -> None:
        """Stop the early worker if the pool never took it; never raises."""
        if self.early is None:
            return
        (process, conn), self.early = self.early, None
        with contextlib.suppress(OSError):
            process.terminate()
        process.join(self.stop_grace)
        if process.is_alive():
            with contextlib.suppress(OSError):
                process.kill()
            process.join(1.0)
        conn.close()


@contextlib.contextmanager
def early_start(spec: EngineSpec, settings: PoolSettings) -> Iterator[EarlyStart]:
    """An ``EarlyStart`` on this machine's processes, its early worker stopped unless adopted."""
    launcher = EarlyStart(LocalLauncher(), spec, settings)
    try:
        yield launcher
    finally:
        launcher.close()
