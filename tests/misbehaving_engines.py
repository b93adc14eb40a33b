"""Engines that misbehave on purpose, for runs of ``python -m batchseg run --engine misbehaving_engines:F``.

Each factory loads an engine that finds nothing in every image (an empty label map, which the
worker writes; ``ok``, after half a second for an image named ``slow...``), except for images whose
name starts with ``bad``, where it does what its name says:

    hangs               starts writing the mask (a temp file), then sleeps forever (only the
                        watchdog ends it)
    segfaults           starts writing the mask (a temp file), then SIGSEGV: killed by a signal
    runs_out_of_memory  asks for a 4 PiB buffer: a real MemoryError, at no risk to the machine
    fails_alike         every image, bad or not, raises the same RuntimeError (circuit breaker)
    holds_masks         the mask of a bad image is held open by "another program" (a Windows
                        sharing violation, winerror 32, simulated with the rename hook) for ever;
                        an image named ``flaky...`` is held for its first two renames only
    sam3_holding_masks  the real SAM3 engine (--model), with masks held as holds_masks does

Module-level factories and light imports, so spawned workers find them by name and start fast.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from batchseg import atomic, imageio
from batchseg.records import Item
from batchseg.worker.contract import Capabilities, EngineSpec, HeartbeatFn, Segmentation

#: How long a held mask is waited for in these tests (the product's default is 30 s).
HELD_PATIENCE_S = 0.4


class MisbehavingEngine:
    capabilities = Capabilities(device="cpu misbehaving")

    def __init__(self, spec: EngineSpec, bad: Callable[[MisbehavingEngine, Item], None]) -> None:
        self.output_dir = spec.config.output_dir
        self.bad = bad

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Segmentation]:
        return [self._one(item) for item in items]

    def close(self) -> None:
        pass

    def target(self, item: Item) -> str:
        return os.path.join(self.output_dir, imageio.mask_relpath(item.path))

    def _one(self, item: Item) -> Segmentation:
        if item.path.startswith("bad") or self.bad is fails_the_same_way:
            self.bad(self, item)
        if item.path.startswith("slow"):
            time.sleep(0.5)
        return Segmentation(np.zeros((3, 4), np.uint16), [])


def hang(engine: MisbehavingEngine, item: Item) -> None:
    with atomic.atomic_path(engine.target(item)) as tmp:
        tmp.write_bytes(b"\x89PNG a third of a mask")
        while True:
            time.sleep(0.05)


def segfault(engine: MisbehavingEngine, item: Item) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test folder
    with atomic.atomic_path(engine.target(item)) as tmp:
        tmp.write_bytes(b"\x89PNG half a mask")
        os.kill(os.getpid(), signal.SIGSEGV)


def exhaust_memory(engine: MisbehavingEngine, item: Item) -> None:
    bytearray(1 << 52)  # more than any address space: malloc fails at once, nothing is touched


def fails_the_same_way(engine: MisbehavingEngine, item: Item) -> None:
    raise RuntimeError("the model returned NaN scores")


def hangs(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    return MisbehavingEngine(spec, hang)


def segfaults(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    return MisbehavingEngine(spec, segfault)


def runs_out_of_memory(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    return MisbehavingEngine(spec, exhaust_memory)


def fails_alike(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    return MisbehavingEngine(spec, fails_the_same_way)


def holds_masks(spec: EngineSpec, slot: int) -> MisbehavingEngine:
    atomic.HELD_FILE_PATIENCE_S = HELD_PATIENCE_S
    atomic._rename = SharingViolation(os.replace)
    return MisbehavingEngine(spec, lambda engine, item: None)


def sam3_holding_masks(spec: EngineSpec, slot: int) -> Any:
    """The real SAM3 engine, with the masks of bad images held open: the worker's writer decides."""
    from batchseg.engines.sam3.engine import load_engine

    atomic.HELD_FILE_PATIENCE_S = HELD_PATIENCE_S
    atomic._rename = SharingViolation(os.replace)
    return load_engine(spec, slot)


class SharingViolation:
    """The rename hook: what Windows does while another program has the target open.

    Refuses names ``held`` picks, ``times`` times each (None: for ever); ``flaky...`` twice."""

    def __init__(
        self,
        rename: Callable[[str, str], None],
        held: Callable[[str], bool] | None = None,
        times: int | None = None,
    ) -> None:
        self.rename = rename
        self.held = held or _held_mask
        self.times = times
        self.refused: dict[str, int] = {}

    def __call__(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        name = os.path.basename(dst)
        limit = 2 if name.startswith("flaky") else self.times
        if self.held(name) and (limit is None or self.refused.get(name, 0) < limit):
            self.refused[name] = self.refused.get(name, 0) + 1
            text = "The process cannot access the file because it is being used by another process"
            exc = PermissionError(13, text, str(dst))
            exc.winerror = 32  # type: ignore[attr-defined]  # set by Windows itself; not settable elsewhere
            raise exc
        self.rename(src, dst)


def _held_mask(name: str) -> bool:
    return name.startswith(("bad", "flaky"))
