"""Item bookkeeping for the pool: lazy intake, attempts and retries, final results, the breaker.

Parent side: must not import torch.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field

from ..records import FailureCategory, Item, ItemResult, Status
from .settings import EventKind, PoolEvent, PoolSettings
from .splits import SplitItems

__all__ = ["RETRYABLE", "Entry", "Ledger"]

#: Statuses worth another attempt on another worker process.
RETRYABLE = frozenset({Status.ERROR, Status.TIMEOUT, Status.CRASHED})


@dataclass(eq=False)
class Entry:
    """One item on its way: how many attempts it had and which workers failed it."""

    item: Item
    attempts: int = 0
    tried: set[int] = field(default_factory=set)


class Ledger:
    """Every item from intake to its one final result.

    Intake is lazy: ``items`` is read only as workers need work, so a huge folder is never copied
    up front. Items of a task that ended early and that the engine never touched come back first
    (``give_back``), as fresh work.

    Attempts: an item gets ``max_attempts`` tries; ``error``, ``timeout`` and ``crashed`` are
    retried, each retry on a worker process other than the ones that failed it (``take_retry``).
    Retries go before fresh items, so a failure becomes final quickly and the circuit breaker
    sees it. A failure of the output folder (``FailureCategory.OUTPUT``) is final at once: another
    worker writes to the same folder. ``on_result`` gets each item's final result once, with
    ``attempts`` filled in.

    Circuit breaker: the same failure on ``max_consecutive_failures`` final results in a row (the
    ``error_type`` for ``error``; ``timeout`` or ``crashed`` for those) sets ``tripped``, and the
    pool stops at once: in-flight items are abandoned (redone on resume). An ``ok`` result resets
    the streak; ``invalid_input`` (and ``skipped``/``missing``) neither counts nor resets it: bad
    files are the user's data, not a broken setup, and a folder of unreadable files must still be
    walked to the end.

    Splits: a result that splits an item into parts (``supervise.splits``) is no attempt; the
    parts go in front of the fresh work, each settled like an item, and the item's join follows
    its last part. Only whole items reach ``on_result`` and the breaker.
    """

    def __init__(
        self,
        items: Iterable[Item],
        settings: PoolSettings,
        on_result: Callable[[ItemResult], None],
        emit: Callable[[PoolEvent], None],
    ) -> None:
        # Items not yet taken from ``items``, where its length is known (a list): lets tasks
        # shrink near the end so several workers finish together.
        self._untaken: int | None = len(items) if isinstance(items, Sized) else None
        self._source: Iterator[Item] = iter(items)
        self._returned: deque[Entry] = deque()  # never started (a task ended before them): first
        self._lookahead: Item | None = None
        self._exhausted = False
        self.retries: deque[Entry] = deque()
        self._settings = settings
        self._on_result = on_result
        self._emit = emit
        self.counts: Counter[str] = Counter()
        self._streak: tuple[str, int] = ("", 0)
        self.tripped: str | None = None
        self._splits = SplitItems()
        self._spread: dict[str, Entry] = {}  # items out as parts: their entries wait for the join
        self._began: dict[str, float] = {}  # when a split item's worker split it: its start

    def has_fresh(self) -> bool:
        if self._returned:
            return True
        if self._lookahead is None and not self._exhausted:
            try:
                self._lookahead = next(self._source)
            except StopIteration:
                self._exhausted = True
        return self._lookahead is not None

    def has_work(self) -> bool:
        return bool(self.retries) or self.has_fresh()

    def take_fresh(self, count: int) -> list[Entry]:
        entries: list[Entry] = []
        while len(entries) < count and self._returned:
            entry = self._returned.popleft()
            if not self._splits.dropped(entry.item):
                entries.append(entry)
        while len(entries) < count and self.has_fresh():
            assert self._lookahead is not None
            entries.append(Entry(self._lookahead))
            if self._untaken is not None:
                self._untaken -= 1
            self._lookahead = None
        return entries

    def take_retry(self, wid: int) -> Entry | None:
        """The first queued retry that worker ``wid`` has not failed."""
        for entry in [e for e in self.retries if self._splits.dropped(e.item)]:
            self.retries.remove(entry)
        for index, entry in enumerate(self.retries):
            if wid not in entry.tried:
                del self.retries[index]
                return entry
        return None

    def requeue(self, entry: Entry) -> None:
        """Run again without charging an attempt (an item of a failed batch)."""
        self.retries.append(entry)

    def fresh_left(self) -> int | None:
        """Fresh items still to hand out (None: unknown, the source has no length)."""
        return None if self._untaken is None else self._untaken + len(self._returned)

    def give_back(self, entries: list[Entry]) -> None:
        """Items of a failed task that the engine never touched: fresh work again, batched as any."""
        self._returned.extendleft(reversed(entries))

    def settle(self, entry: Entry, result: ItemResult, wid: int) -> None:
        """Count one attempt: queue a retry, or report the final result."""
        if result.split is not None and entry.item.part is None:
            began = self._began[entry.item.path] = result.started_at or time.time()
            self._spread[entry.item.path] = entry
            parts = [Entry(item) for item in self._splits.split(entry.item, result.split, began)]
            self._returned.extendleft(reversed(parts))  # before other items: this one finishes first
            return
        if self._splits.dropped(entry.item):
            return  # its item failed by another part meanwhile
        entry.attempts += 1
        result.attempts = entry.attempts
        if self._retry(result, entry):
            entry.tried.add(wid)
            self.retries.append(entry)
            self._emit(
                PoolEvent(
                    EventKind.ATTEMPT_FAILED,
                    f"{_where(entry)}: attempt {entry.attempts} of {self._settings.max_attempts} "
                    f"{_failure_text(result)}; retrying on another worker process",
                    pid=result.worker_pid,
                    result=result,
                    traceback=result.traceback,
                )
            )
            return
        if entry.item.part is not None and entry.item.part.key is not None:
            outcome = self._splits.settle_part(entry.item, result)
            if outcome is None:
                return
            whole = self._spread.pop(entry.item.path)
            if isinstance(outcome, Item):
                whole.item = outcome  # the item's join, next in line, with the item's attempts
                self._returned.appendleft(whole)
                return
            result = outcome
        if entry.item.part is not None:  # a split item's result: its time runs from the split
            result.started_at = self._began.pop(entry.item.path, result.started_at)
        self.counts[result.status.value] += 1
        self._on_result(result)
        self._watch_streak(result)

    def _retry(self, result: ItemResult, entry: Entry) -> bool:
        if result.status not in RETRYABLE or result.category is FailureCategory.OUTPUT:
            return False
        return entry.attempts < self._settings.max_attempts

    def _watch_streak(self, result: ItemResult) -> None:
        limit = self._settings.max_consecutive_failures
        if result.status is Status.OK:
            self._streak = ("", 0)
            return
        key = _failure_key(result)
        if key is None or not limit:
            return
        count = self._streak[1] + 1 if self._streak[0] == key else 1
        self._streak = (key, count)
        if count >= limit and self.tripped is None:
            detail = f": {result.error_message}" if result.error_message else ""
            self.tripped = (
                f"circuit breaker: {count} images in a row failed with {key} "
                f"(for example {result.path}{detail}); fix the cause, then run the same command "
                "again to resume"
            )
            self._emit(PoolEvent(EventKind.CIRCUIT_BREAKER, self.tripped, result=result))


def _where(entry: Entry) -> str:
    part = entry.item.part
    if part is None or part.key is None:
        return entry.item.path
    return f"{entry.item.path} {part.noun} {part.key}"


def _failure_key(result: ItemResult) -> str | None:
    if result.status is Status.ERROR:
        return result.error_type or "error"
    if result.status in (Status.TIMEOUT, Status.CRASHED):
        return str(result.status)
    return None


def _failure_text(result: ItemResult) -> str:
    if result.status is Status.ERROR:
        return f"failed with {result.error_type}: {result.error_message}"
    return f"{result.status.value}: {result.error_message}"
