"""One call of ``Sam3Engine.process``: a task's images through the pipeline, sub-batch by sub-batch.

I/O threads read (and on a GPU pin) images one sub-batch ahead and write results behind. Each turn
queues the vision encoder of sub-batch k, then decodes and post-processes sub-batch k-1: on a GPU
the host's waits (the decoders' blocking copy, the post-processing) fall while sub-batch k's
encoder runs, so the device is not left idle. A sub-batch that fails goes down the engine's
``OutOfMemoryLadder``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from ...records import Item, ItemResult
from ...worker.contract import HeartbeatFn, Segmentation
from ...worker.contract import Outcome as EngineOutcome
from .ladder import Failure, Outcome, OutOfMemoryLadder
from .postprocess import ImageSegmentation

__all__ = ["Task", "WriteFn"]

#: ``write(item, segmentation) -> ItemResult``: the worker's writer (``heartbeat.write``), called in
#: an I/O thread so label maps are written while the device runs the next sub-batch.
WriteFn = Callable[[Item, Segmentation], ItemResult]


class _Engine(Protocol):
    """The steps of ``pipeline.Sam3Engine`` a task runs."""

    overlap: bool
    io: ThreadPoolExecutor
    ladder: OutOfMemoryLadder

    @property
    def max_batch(self) -> int: ...

    def read(self, item: Item) -> Image.Image | ItemResult: ...

    def pad_rows(self, n: int) -> int: ...

    def encode_images(self, images: Sequence[Image.Image], pad: int = 0) -> Any: ...

    def decode(self, encoded: Any) -> list[ImageSegmentation]: ...

    def finish(
        self, item: Item, image: Image.Image, seg: ImageSegmentation, started: float, write: WriteFn | None
    ) -> EngineOutcome: ...

    def failure(self, item: Item, exc: BaseException, started: float) -> ItemResult: ...

    def release_memory(self) -> None: ...

    def forget_pinned(self) -> None: ...


@dataclass
class _Flight:
    """A sub-batch encoded (its vision encoder queued on the device) and not yet decoded."""

    positions: list[int]  # in the task
    encoded: Any  # features.EncodedImages; None once decoded or failed: the vision features are freed


class Task:
    """The steps of one task: ``read_ahead``, ``take`` a sub-batch, ``encode`` it, ``decode`` the
    one before, ``settle`` the outcomes (writes queued, results kept), ``beat`` the heartbeat.

    ``heartbeat`` (see ``Engine.process``) is called after each finished sub-batch with the results
    written since, so a watchdog gives each sub-batch its own time budget and a crash later in the
    task loses none of them; and before reads go further than already said. Each image's
    ``started_at`` is its sub-batch's start, ``finished_at`` the end of its own write."""

    def __init__(self, engine: _Engine, items: Sequence[Item], heartbeat: HeartbeatFn) -> None:
        self.engine = engine
        self.items = items
        self.heartbeat = heartbeat
        self.write: WriteFn | None = getattr(heartbeat, "write", None)  # None: outcomes unwritten
        self.results: dict[int, EngineOutcome] = {}
        self.loads: dict[int, Future[Image.Image | ItemResult]] = {}
        self.writes: dict[int, Future[EngineOutcome]] = {}
        self.held: dict[int, Image.Image] = {}  # images read and not yet handed to a write
        self.started: dict[int, float] = {}  # when each image's sub-batch started
        self.pending: _Flight | None = None
        self.reported: set[int] = set()

    def run(self) -> list[EngineOutcome]:
        """One outcome per item, in order."""
        try:
            done = 0
            while done < len(self.items):
                chunk = range(done, min(done + self.engine.max_batch, len(self.items)))
                self.read_ahead(chunk[-1] + 1 + self.engine.max_batch)
                positions = self.take(chunk)
                if positions and not self.encode(positions):
                    continue  # out of memory while queuing: the same images, in smaller sub-batches
                done = chunk[-1] + 1
            self.decode_pending()
            self.results.update({i: future.result() for i, future in self.writes.items()})
        finally:
            # Pinned pixels are keyed by id(image): none may outlive its image (an id can be reused).
            self.engine.forget_pinned()
        return [self.results[i] for i in range(len(self.items))]

    def beat(self, reached: int | None = None) -> None:
        """The results finished since the last beat, and how far reads may go."""
        finished = [(i, r) for i, r in self.results.items() if i not in self.reported]
        finished += [(i, f.result()) for i, f in self.writes.items() if i not in self.reported and f.done()]
        self.reported.update(i for i, _ in finished)
        self.heartbeat(finished, reached)

    def read_ahead(self, upto: int) -> None:
        """Reads queued up to item ``upto`` (excluded), announced before any of them starts."""
        upto = min(upto, len(self.items))
        if upto > len(self.loads):
            self.beat(reached=upto)
        for i in range(len(self.loads), upto):
            self.loads[i] = self.engine.io.submit(self.engine.read, self.items[i])

    def take(self, chunk: range) -> list[int]:
        """Wait for a sub-batch's reads: the positions of the images read (the others have their
        ``invalid_input`` or ``error`` result already)."""
        for i in chunk:
            loaded = self.loads[i].result()
            if isinstance(loaded, ItemResult):
                self.results[i] = loaded
            else:
                self.held[i] = loaded
        return [i for i in chunk if i in self.held]

    def encode(self, positions: list[int]) -> bool:
        """Queue the vision encoder of a sub-batch, then decode the one before (overlapped on a
        GPU). False when the sub-batch ran out of memory and must go again at the halved batch."""
        now = time.time()
        self.started.update((i, now) for i in positions)
        # Failures are handled after the except blocks: a live exception's traceback would keep
        # the failed encoder's GPU memory in use while the images go again.
        failure: Failure | None = None
        queued: _Flight | None = None
        try:
            images = [self.held[i] for i in positions]
            queued = _Flight(positions, self.engine.encode_images(images, self.engine.pad_rows(len(images))))
        except torch.cuda.OutOfMemoryError:
            failure = Failure.OUT_OF_MEMORY
        except Exception:  # noqa: BLE001 - one bad image must not fail its neighbours
            failure = Failure.ERROR
        self.decode_pending()  # sub-batch k-1, while sub-batch k's encoder runs
        self.pending, queued = queued, None
        if not self.engine.overlap:
            self.decode_pending()
        if failure is None:
            return True
        self.engine.release_memory()
        if failure is Failure.OUT_OF_MEMORY and len(positions) > 1:
            self.engine.ladder.halve(len(positions))
            return False
        self.settle(self.engine.ladder.one_by_one(self._images(positions), self.fail))
        return True

    def decode_pending(self) -> None:
        """Decode and post-process the sub-batch in flight, if any."""
        if self.pending is not None:
            flight, self.pending = self.pending, None
            self.settle(self.decode(flight))

    def decode(self, flight: _Flight) -> dict[int, Outcome]:
        """An encoded sub-batch decoded and post-processed; on failure, down the ladder."""
        positions, encoded = flight.positions, flight.encoded
        flight.encoded = None  # whoever still holds the flight, its features die with ``encoded``
        assert encoded is not None, "a sub-batch is decoded once"
        try:
            return dict(zip(positions, self.engine.decode(encoded), strict=True))
        except torch.cuda.OutOfMemoryError:
            failure = Failure.OUT_OF_MEMORY
        except Exception:  # noqa: BLE001 - one bad image must not fail its neighbours
            failure = Failure.ERROR
        del encoded  # the vision features go before the images go again
        self.engine.release_memory()
        return self.engine.ladder.recover(self._images(positions), failure, self.fail)

    def settle(self, outcomes: dict[int, Outcome]) -> None:
        """Segmentations go to the I/O threads to be written; failures are results at once."""
        for i, outcome in outcomes.items():
            image = self.held.pop(i)
            if isinstance(outcome, ItemResult):
                self.results[i] = outcome
            else:
                item, started = self.items[i], self.started[i]
                finish = self.engine.finish
                self.writes[i] = self.engine.io.submit(finish, item, image, outcome, started, self.write)
        self.beat()

    def fail(self, position: int, exc: BaseException, message: str | None = None) -> ItemResult:
        """The ``error`` result of the image at ``position`` (``message`` instead of the exception's)."""
        result = self.engine.failure(self.items[position], exc, self.started[position])
        if message is not None:
            result.error_message = message
        return result

    def _images(self, positions: list[int]) -> dict[int, Image.Image]:
        return {i: self.held[i] for i in positions}
