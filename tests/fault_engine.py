"""A misbehaving Engine for the pool tests; what it does to an image is chosen by its file name.

The part of the name before the first ``_`` or ``.`` picks the behaviour::

    hang        sleeps forever (only the watchdog ends it)
    exit        os._exit(3)
    segv        reads address 0: SIGSEGV
    raise       raises ValueError("bad pixels in <path>")
    oom         allocates until MemoryError, under an RLIMIT_AS cap so the machine is safe
    invalid     returns invalid_input
    slow        sleeps the setting ``slow_s`` seconds (default 0.3), then ok
    threads     like slow, with ``height`` = the worker's OMP_NUM_THREADS (what the pool told it)
    warn        warns (RuntimeWarning naming the image), then ok
    flakyexit   os._exit(3) on its first attempt, ok afterwards (a marker file in state_dir)
    flakyraise  ValueError on its first attempt, ok afterwards
    await       waits until ``await_loads`` (a setting) loads have begun (in any worker), then ok
    anything    ok at once

The settings (``settings``) are a JSON object a test writes beside the run's inputs
(``write_settings``), {} when there is none. Loading follows them: ``load`` = "fail" | "hang" |
"exit" | "killonce" (the first load SIGKILLs its own process, as the out-of-memory killer does; a
marker file in state_dir); ``load_delay`` seconds (after the first ``fast_loads`` loads);
``ok_loads`` = N: the first N loads succeed, later ones fail; ``device`` = "cuda" pretends to be
on GPU ``slot`` with ``gpu_count`` GPUs; ``preferred_task_size`` is the task size it states. Every
load appends "pid slot" to ``state_dir``/loads.txt.

Module-level factory and no heavy imports, so spawned workers start fast and it pickles by name.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batchseg.config import RunConfig
from batchseg.records import Item, Status, failure_result
from batchseg.worker.contract import Capabilities, EngineSpec, HeartbeatFn, Outcome, Segmentation

OOM_HEADROOM = 256 * 1024 * 1024
#: The file in a run's input folder that holds the test engines' settings (hidden: never an image).
SETTINGS_NAME = ".engine-settings.json"


def write_settings(folder: Path, **values: Any) -> Path:
    """Settings for the test engines of a run whose input is ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETTINGS_NAME).write_text(json.dumps(values), encoding="utf-8")
    return folder


def found(width: int = 4, height: int = 3) -> Segmentation:
    """Nothing found in an image of ``width`` x ``height`` (the worker writes its empty label map)."""
    return Segmentation(np.zeros((height, width), np.uint16), [])


def settings(config: RunConfig) -> dict[str, Any]:
    """What ``write_settings`` wrote beside the inputs of ``config``; {} when nothing was."""
    path = Path(config.input) / SETTINGS_NAME
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


class FaultyEngine:
    """Engine whose behaviour per image comes from the image's file name."""

    heartbeat_every = 0

    def __init__(self, chosen: dict[str, Any], slot: int) -> None:
        self.chosen = chosen
        self.state_dir = Path(chosen["state_dir"]) if "state_dir" in chosen else None
        cuda = chosen.get("device") == "cuda"
        self.capabilities = Capabilities(
            device=f"cuda:{slot} fake" if cuda else "cpu fault-engine",
            # A suggestion a real engine derives from free GPU memory.
            task_size=int(chosen.get("preferred_task_size", 1)),
            heartbeat_every=self.heartbeat_every,
            gpu_count=int(chosen.get("gpu_count", 1)) if cuda else 0,
        )

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        outcomes = [self._one(item) for item in items]
        for k, outcome in enumerate(outcomes):
            if isinstance(outcome, Segmentation):  # width: lets tests see the batch each item travelled in
                outcomes[k] = found(width=len(items), height=outcome.labels.shape[0])
        return outcomes

    def close(self) -> None:
        pass

    def _one(self, item: Item) -> Outcome:
        kind = behaviour(item.path)
        if kind == "hang":
            while True:
                time.sleep(0.05)
        if kind == "exit" or (kind == "flakyexit" and self._first_attempt(item)):
            os._exit(3)
        if kind == "segv":
            _segfault()
        if kind == "raise" or (kind == "flakyraise" and self._first_attempt(item)):
            raise ValueError(f"bad pixels in {item.path}")
        if kind == "oom":
            _exhaust_memory()
        if kind == "invalid":
            message = f"{item.path} is not an image"
            return failure_result(item, Status.INVALID_INPUT, error_type="InvalidImageError", message=message)
        if kind == "slow":
            time.sleep(float(self.chosen.get("slow_s", 0.3)))
        if kind == "threads":
            time.sleep(float(self.chosen.get("slow_s", 0.3)))
            return found(height=int(os.environ["OMP_NUM_THREADS"]))  # the threads it was given
        if kind == "await":
            assert self.state_dir is not None, "await needs the setting state_dir"
            while len(loads(self.state_dir)) < int(self.chosen["await_loads"]):
                time.sleep(0.02)  # the pool's watchdog bounds a pool that never gets there
        if kind == "warn":
            warnings.warn(f"something to know about {item.path}", RuntimeWarning, stacklevel=1)
        return found()

    def _first_attempt(self, item: Item) -> bool:
        assert self.state_dir is not None, "flaky images need the setting state_dir"
        marker = self.state_dir / f"tried-{Path(item.path).name}"
        if marker.exists():
            return False
        marker.touch()
        return True


def behaviour(path: str) -> str:
    name = Path(path).name
    return name.replace(".", "_").split("_")[0]


def load_faulty(spec: EngineSpec, slot: int) -> FaultyEngine:
    """The factory the pool's workers call (``EngineSpec.factory = "fault_engine:load_faulty"``)."""
    chosen = settings(spec.config)
    loads = _record_load(chosen, slot)
    if loads > int(chosen.get("fast_loads", 0)):
        time.sleep(float(chosen.get("load_delay", 0)))
    mode = chosen.get("load")
    if mode == "fail":
        raise RuntimeError("weights are corrupt")
    if mode == "exit":
        os._exit(5)
    if mode == "killonce" and _first_load_killed(chosen):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        while True:
            time.sleep(0.05)
    if "ok_loads" in chosen and loads > int(chosen["ok_loads"]):
        raise RuntimeError(f"load {loads}: the model folder vanished")
    return FaultyEngine(chosen, slot)


def _first_load_killed(chosen: dict[str, Any]) -> bool:
    marker = Path(chosen["state_dir"]) / "load-killed"
    try:
        marker.open("x").close()
    except FileExistsError:
        return False
    return True


def loads(state_dir: Path) -> list[tuple[int, int]]:
    """(pid, slot) of every load so far."""
    path = state_dir / "loads.txt"
    if not path.exists():
        return []
    return [(int(pid), int(slot)) for pid, slot in (line.split() for line in path.read_text().splitlines())]


def _record_load(chosen: dict[str, Any], slot: int) -> int:
    if "state_dir" not in chosen:
        return 1
    path = Path(chosen["state_dir"]) / "loads.txt"
    with path.open("a") as log:  # appends of one short line are atomic enough for these tests
        log.write(f"{os.getpid()} {slot}\n")
    return len(path.read_text().splitlines())


def _segfault() -> None:
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test folder
    ctypes.string_at(0)


def _exhaust_memory() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + OOM_HEADROOM, hard))
    hog: list[bytearray] = []
    try:
        while True:
            hog.append(bytearray(16 * 1024 * 1024))
    finally:
        hog.clear()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class HeartbeatEngine(FaultyEngine):
    """Like FaultyEngine, but reports after every item, as the SAM3 engine does per sub-batch."""

    heartbeat_every = 1

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        results = []
        for item in items:
            results.extend(super().process([item], heartbeat))
            heartbeat()
        return results


def load_heartbeat(spec: EngineSpec, slot: int) -> HeartbeatEngine:
    _record_load(settings(spec.config), slot)
    return HeartbeatEngine(settings(spec.config), slot)


class StreamingEngine(FaultyEngine):
    """Reports like the SAM3 engine: how far it will go before touching an item, and each result
    as soon as it is done. Every item it starts is logged to ``state_dir``/started.txt."""

    heartbeat_every = 1

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        results = []
        for k, item in enumerate(items):
            heartbeat((), k + 1)
            if self.state_dir is not None:
                with (self.state_dir / "started.txt").open("a") as log:
                    log.write(f"{item.path}\n")
            results.extend(super().process([item], heartbeat))
            heartbeat([(k, results[-1])])
        return results


def load_streaming(spec: EngineSpec, slot: int) -> StreamingEngine:
    _record_load(settings(spec.config), slot)
    return StreamingEngine(settings(spec.config), slot)


class SubBatchEngine(FaultyEngine):
    """Reports like the SAM3 engine with sub-batches: each result once its sub-batch of
    ``sub_batch`` (a setting) items (default 2) is done, never in between."""

    def __init__(self, chosen: dict[str, Any], slot: int) -> None:
        self.heartbeat_every = int(chosen.get("sub_batch", 2))
        super().__init__(chosen, slot)

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        results: list[Outcome] = []
        for start in range(0, len(items), self.heartbeat_every):
            part = items[start : start + self.heartbeat_every]
            heartbeat((), start + len(part))
            done = super().process(part, heartbeat)
            heartbeat(list(enumerate(done, start)))
            results.extend(done)
        return results


def load_sub_batch(spec: EngineSpec, slot: int) -> SubBatchEngine:
    _record_load(settings(spec.config), slot)
    return SubBatchEngine(settings(spec.config), slot)


def started(state_dir: Path) -> list[str]:
    """Paths the streaming engine started, in order, over every worker."""
    path = state_dir / "started.txt"
    return path.read_text().splitlines() if path.exists() else []
