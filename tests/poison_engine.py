"""The colour-threshold engine with hooks for tiling tests, set by environment variables.

``--engine poison_engine:load`` (tests/ on PYTHONPATH).
``BATCHSEG_TEST_POISON=x0,y0``: a batch holding the window that starts there makes ``process``
raise, so the worker must rerun that batch's tiles alone and fail the image.
``BATCHSEG_TEST_WINDOWS=FILE``: every window processed is appended to FILE as ``x0,y0``.
``BATCHSEG_TEST_SLEEP=S``: each window takes S seconds more (time to kill a run mid-image).
``BATCHSEG_TEST_STALL_AFTER=N``: once the windows FILE holds N windows (of every worker), each
later window hangs (a run killed mid-image at a known point, however slow the machine).
``BATCHSEG_TEST_PIDS=FILE``: every window processed is appended to FILE as ``x0,y0,pid``.
``BATCHSEG_TEST_TASK_SIZE=N``: the items per task the engine asks for (the threshold engine's 8).
``BATCHSEG_TEST_PREFETCH=FILE``: every image the worker says comes next (``prefetch``) is appended
to FILE, and every image the engine's window reader opens as ``name thread``.
``BATCHSEG_TEST_KEEP_EACH=1``: every tile reported is kept on disk at once (the worker's keep
interval set to 0), so a tile reported is a tile kept, however fast or slow the machine.
``BATCHSEG_TEST_BATCHES=FILE``: each call of ``process`` appends a JSON line: its items' paths, and
when it started and ended (``time.time()``).
``BATCHSEG_TEST_CRASH_ONCE=FILE``: the first batch of two or more windows that any worker runs
(FILE created exclusively, holding the batch's first window) reports its first window, then the
worker SIGKILLs itself before the second, as the out-of-memory killer would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from batchseg.engines.threshold import ThresholdEngine
from batchseg.engines.threshold import load as load_threshold
from batchseg.records import Item
from batchseg.tiles import windows as source_module
from batchseg.worker import tile_stream
from batchseg.worker.contract import EngineSpec, HeartbeatFn, Outcome


class PoisonEngine:
    def __init__(self, inner: ThresholdEngine) -> None:
        self.inner = inner
        task_size = int(os.environ.get("BATCHSEG_TEST_TASK_SIZE") or inner.capabilities.task_size)
        self.capabilities = replace(inner.capabilities, task_size=task_size)
        poison = os.environ.get("BATCHSEG_TEST_POISON")
        self.poison = tuple(int(v) for v in poison.split(",")) if poison else None
        self.log = os.environ.get("BATCHSEG_TEST_WINDOWS")
        self.sleep = float(os.environ.get("BATCHSEG_TEST_SLEEP", "0"))
        self.stall_after = int(os.environ.get("BATCHSEG_TEST_STALL_AFTER", "0"))
        self.pids = os.environ.get("BATCHSEG_TEST_PIDS")
        self.prefetched = os.environ.get("BATCHSEG_TEST_PREFETCH")
        if self.prefetched:
            self._log_opens(self.prefetched)
        if os.environ.get("BATCHSEG_TEST_KEEP_EACH"):
            tile_stream.KEEP_EVERY_S = 0.0  # read at each report: every tile reported is written at once
        self.crash_once = os.environ.get("BATCHSEG_TEST_CRASH_ONCE")
        self.batches = os.environ.get("BATCHSEG_TEST_BATCHES")

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        started = time.time()
        results = self._process(items, heartbeat)
        if self.batches:
            with open(self.batches, "a", encoding="utf-8") as fh:
                line = {"paths": [item.path for item in items], "start": started, "end": time.time()}
                fh.write(json.dumps(line) + "\n")
        return results

    def _process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        for item in items:
            if item.window is not None and item.window[:2] == self.poison:
                raise RuntimeError(f"poisoned window {item.window}")
        windows = [item.window for item in items if item.window is not None]
        crash = self._crash_here(windows)
        results = []
        for k, item in enumerate(items):
            if crash and k == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            self._stall()
            time.sleep(self.sleep)
            results.append(self.inner.one(item))
            if self.log and item.window is not None:
                with open(self.log, "a", encoding="utf-8") as fh:
                    fh.write(f"{item.window[0]},{item.window[1]}\n")
            if self.pids and item.window is not None:
                with open(self.pids, "a", encoding="utf-8") as fh:
                    fh.write(f"{item.window[0]},{item.window[1]},{os.getpid()}\n")
            heartbeat([(k, results[-1])])
        return results

    def _stall(self) -> None:
        if not (self.stall_after and self.log and os.path.exists(self.log)):
            return
        with open(self.log, encoding="utf-8") as fh:
            done = len(fh.read().split())
        while done >= self.stall_after:
            time.sleep(1)  # until the test kills the run

    def _crash_here(self, windows: list[tuple[int, int, int, int]]) -> bool:
        """Whether this batch is the one to die in: the first of two or more windows, by any worker."""
        if not self.crash_once or len(windows) < 2:
            return False
        try:
            fd = os.open(self.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False  # another batch died already
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{windows[0][0]},{windows[0][1]}\n")
        return True

    @staticmethod
    def _log_opens(log: str) -> None:
        """Log which thread opens each image (the prefetch thread, or the one reading a tile)."""
        real_open = source_module.open_source

        def logged(path: str, **kwargs: Any) -> source_module.ImageSource:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"{os.path.basename(path)} {threading.current_thread().name}\n")
            return real_open(path, **kwargs)

        source_module.open_source = logged

    def prefetch(self, item: Item) -> None:
        if self.prefetched:
            with open(self.prefetched, "a", encoding="utf-8") as fh:
                fh.write(f"{item.path}\n")
        self.inner.prefetch(item)

    def close(self) -> None:
        self.inner.close()


def load(spec: EngineSpec, slot: int) -> PoisonEngine:
    return PoisonEngine(load_threshold(spec, slot))
