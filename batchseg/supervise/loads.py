"""The pool's rule for worker loads that fail: the run ends, the slot is tried again after a
back-off, or the slot is given up while other workers serve.

Parent side: must not import torch.
"""

from __future__ import annotations

import time

from ..errors import ModelLoadError
from .settings import PoolSettings

__all__ = ["LoadFailures"]


class LoadFailures:
    """Failed loads in a row (any worker's Ready starts the count again), ``spawn_after``
    (monotonic: no worker starts before it) and ``given_up``, the slots never refilled (their
    loads kept failing, or the launcher found no room for them)."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.in_a_row = 0
        self.spawn_after = 0.0
        self.given_up: set[int] = set()

    def ready(self) -> None:
        self.in_a_row = 0

    def failed(self, slot: int, detail: str, *, raised: bool, first: bool, live: int) -> str | None:
        """A load in ``slot`` failed; ``first``: no worker has been ready yet; ``live``: the other
        workers loading or serving. Raises ModelLoadError when the run ends; returns what to tell
        when the slot is given up, else None (the slot gets a new worker after the back-off).

        An engine that ``raised`` before any worker was ready ends the run: the model or its
        folder is at fault, and every worker would fail the same way. Any other failure (a death,
        a timeout, any failure of a replacement) is tried again after ``load_backoff`` seconds,
        doubling: a process killed while loading (the out-of-memory killer on a busy machine)
        says nothing about the model. After ``load_retries`` failures in a row (never an endless
        respawn loop) the slot is given up while other workers live, and the run ends when none
        does."""
        if raised and first:
            raise ModelLoadError(f"the model could not be loaded: {detail}")
        self.in_a_row += 1
        failures = self.in_a_row
        if failures <= self.settings.load_retries:
            self.spawn_after = time.monotonic() + self.settings.load_backoff * 2 ** (failures - 1)
            return None
        if not live:
            if first:
                raise ModelLoadError(f"the model could not be loaded ({failures} tries): {detail}")
            raise ModelLoadError(
                f"a replacement worker failed to load the model {failures} times in a row; last: {detail}"
            )
        self.given_up.add(slot)
        return f"worker {slot}: {failures} loads failed in a row; going on with {live} worker(s)"
