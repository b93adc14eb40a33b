"""The supervisor: feeds items to spawned worker processes and keeps a run alive through bad images.

``run_pool`` is a single-threaded event loop in the parent. It never blocks on a worker: it waits on
every worker's pipe and process sentinel at once, so a worker that hangs, dies or reloads never stalls
the others. Three parts are kept apart: ``_Ledger`` (item bookkeeping: lazy intake, attempts, final
results, circuit breaker), ``_Worker`` (one process and where it is in its life) and ``_Pool``
(scheduling and lifecycle decisions).

Process model
    Workers use the ``spawn`` start method on every OS and are daemon processes. Each loads one engine
    (``EngineSpec.factory``) and says ``Ready``. The pool starts ONE worker first: if the model cannot
    load (``LoadFailed``, death or ``load_timeout`` before ``Ready``), ``ModelLoadError`` is raised
    before any image is touched. Then the pool grows to its size: ``workers``, or with
    ``workers=None`` one per GPU when the first worker reports CUDA (one if the device names a GPU,
    e.g. ``cuda:1``) and one on CPU.

Watchdog
    A task is one item, or ``batch_size`` items; its budget is ``timeout x len(items)`` and its clock
    starts at the worker's ``Ack`` (a worker that never acknowledges gets the same budget from the
    send). Past the budget the worker is terminated, killed ``stop_grace``
    seconds later if still alive, and replaced. A worker that dies makes its task ``crashed`` with the
    exit code (negative = signal number) and pid. A batch of several items that times out or crashes
    is not charged to its items: they are run again one at a time, so only the poison image is marked.
    (When ``engine.process`` raises on a batch, the worker itself reruns the items one by one.)

Attempts
    An item gets ``max_attempts`` tries; ``error``, ``timeout`` and ``crashed`` are retried, each retry
    on a worker process other than the ones that failed it. A timed-out or crashed worker is dead, so
    any other worker qualifies. After an ``error`` the worker lives on; when no other worker can take
    the retry (e.g. ``workers=1``), that worker is recycled first, so a process left in a bad state
    (a poisoned CUDA context) never decides the last attempt. Retries go before fresh items, so a
    failure becomes final quickly and the circuit breaker sees it. ``on_result`` gets each item's
    final result once, with ``attempts`` filled in.

Replacement and warm standby
    A replacement loads in the background while the other workers keep taking tasks. On CUDA it starts
    only once the process it replaces has exited, so two models never share one GPU's memory; on CPU
    it starts at once. ``standby=True`` keeps one extra worker loaded and idle (CPU only): a timed-out,
    crashed or recycled worker is then replaced instantly instead of after a model load. It costs one
    more model in RAM the whole run (SAM3 in float32 is about 3.5 GB) plus a little CPU while the
    spare loads, which is why it is off by default, and never used on CUDA, where a spare would hold
    a second copy of the model in GPU memory. ``max_images_per_worker`` recycles a worker after that
    many items: it is told to close its engine and exit, and its replacement starts (on CPU) while it
    does, or the standby takes over at once.

Load failures later on
    A replacement or standby that fails to load is retried after ``load_backoff`` seconds, doubling;
    after ``load_retries`` failures in a row the run ends with ``ModelLoadError`` (never an endless
    respawn loop). Any worker's ``Ready`` resets the count.

Circuit breaker
    The same failure on ``max_consecutive_failures`` FINAL results in a row (the ``error_type`` for
    ``error``; ``timeout`` or ``crashed`` for those) stops the run at once: in-flight items are
    abandoned (they are redone on resume) and the outcome is ``stopped="circuit_breaker"`` with a
    message naming the failure and an example image. An ``ok`` result resets the streak;
    ``invalid_input`` (and ``skipped``/``missing``) neither counts nor resets it: bad files are the
    user's data, not a broken setup, and a folder of unreadable files must still be walked to the end.

Stopping
    ``should_stop()`` returning a reason drains the pool: no new task starts (retries included), tasks
    in flight finish or time out, and the outcome says ``stopped=reason``. Items with attempts left
    are not reported; a resumed run does them. No worker process survives ``run_pool``: every exit
    path (normal end, an exception from a callback, KeyboardInterrupt) goes through a ``finally`` that
    terminates, kills and joins; workers are daemons; and a worker exits by itself when its parent
    dies (see ``batchseg.supervise.worker``).

This module must not import torch: it runs in the parent.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Protocol

from ..config import RunConfig
from ..errors import ConfigError, ModelLoadError
from ..records import Item, ItemResult, Status
from .contract import EngineSpec
from .worker import Ack, Done, Heartbeat, LoadFailed, Ready, Shutdown, Task, worker_main

__all__ = [
    "Launcher",
    "LocalLauncher",
    "PoolEvent",
    "PoolOutcome",
    "PoolSettings",
    "describe_exit",
    "run_pool",
]

_CTX = multiprocessing.get_context("spawn")
_RETRYABLE = frozenset({Status.ERROR, Status.TIMEOUT, Status.CRASHED})
_TICK_S = 0.2  # longest wait between two looks at should_stop()


@dataclass(frozen=True)
class PoolSettings:
    """How the pool runs; see the module docstring for what each knob does."""

    workers: int | None = None  # None: one per GPU on CUDA, one on CPU
    threads: int | None = None  # torch threads per worker; None: usable cores / workers
    batch_size: int | None = 1  # items per task; None: what each worker's engine suggests
    timeout: float = 300.0  # seconds per item, from the worker's Ack
    load_timeout: float = 600.0  # seconds for a worker to load the engine
    max_attempts: int = 2
    max_images_per_worker: int | None = None  # None: never recycle
    max_consecutive_failures: int | None = 20  # None or 0: no circuit breaker
    standby: bool = False  # keep one loaded spare worker (CPU only)
    stop_grace: float = 2.0  # seconds between terminate and kill
    close_grace: float = 10.0  # seconds a worker gets to close its engine when asked to exit
    load_retries: int = 3  # replacement load failures in a row before ModelLoadError
    load_backoff: float = 2.0  # first wait before a failed replacement load is retried; doubles

    def __post_init__(self) -> None:
        positive = {
            "workers": self.workers,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "max_attempts": self.max_attempts,
            "max_images_per_worker": self.max_images_per_worker,
            "timeout": self.timeout,
            "load_timeout": self.load_timeout,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be greater than 0, not {value}")

    @classmethod
    def from_config(cls, config: RunConfig, **overrides: object) -> PoolSettings:
        """The pool settings of a RunConfig (``batch_size=None``: the engine's suggestion)."""
        values: dict[str, object] = {
            "workers": config.workers,
            "threads": config.threads,
            # --batch-size is the engine's forward batch; it suggests the task size from it.
            "batch_size": None,
            "timeout": config.timeout,
            "load_timeout": config.load_timeout,
            "max_attempts": config.max_attempts,
            "max_images_per_worker": config.max_images_per_worker,
            "max_consecutive_failures": config.max_consecutive_failures,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PoolEvent:
    """Something the log should tell: a failed attempt, a worker started, ready, stopped or replaced.

    ``kind`` is one of: worker_started, worker_ready, worker_exited, worker_timeout, worker_lost,
    load_failed, recycle, standby_promoted, pool_size, attempt_failed (an attempt that will be
    retried; final results go to ``on_result``), batch_split, stopping, circuit_breaker,
    worker_warning (a warning shown in a worker), and task_started (a worker took a task: ``paths``
    are its items).
    """

    kind: str
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
    workers_started: int = 0


def run_pool(
    spec: EngineSpec,
    items: Iterable[Item],
    settings: PoolSettings,
    on_result: Callable[[ItemResult], None],
    should_stop: Callable[[], str | None] = lambda: None,
    on_event: Callable[[PoolEvent], None] | None = None,
    launcher: Launcher | None = None,
) -> PoolOutcome:
    """Run every item through a pool of engine workers; call ``on_result`` once per item, final.

    ``items`` is consumed lazily. Raises ``ModelLoadError`` when the model cannot be loaded; any
    exception from a callback propagates, after every worker is stopped. ``launcher`` starts the
    workers: processes on this machine (the default) or Ray actors (``ray_backend.RayLauncher``).
    """
    emit = on_event or (lambda _event: None)
    ledger = _Ledger(items, settings, on_result, emit)
    pool = _Pool(spec, settings, ledger, emit, should_stop, launcher or LocalLauncher())
    try:
        return pool.run()
    finally:
        pool.kill_all()


class WorkerProcess(Protocol):
    """What the pool needs of a worker process: ``multiprocessing.Process`` or a Ray actor's bridge."""

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
    """Starts worker processes for the pool: where they run and how many a device allows."""

    def start(self, spec: EngineSpec, slot: int, threads: int) -> tuple[WorkerProcess, Connection]:
        """A started worker serving ``spec`` and the supervisor's end of its duplex connection."""
        ...

    def pool_size(self, spec: EngineSpec, cuda: bool, gpu_count: int) -> int:
        """Workers when the user set none (``gpu_count``: CUDA devices the first worker saw)."""
        ...

    def threads(self, workers: int) -> int:
        """Torch threads per worker when the user set none."""
        ...


class LocalLauncher:
    """Worker processes on this machine, started with ``spawn``."""

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
        return max(1, _usable_cores() // workers)


def describe_exit(code: int | None) -> str:
    """'exited with code 3' / 'was killed by signal 11 (SIGSEGV)'."""
    if code is None:
        return "is still running"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    hint = "; the out-of-memory killer does this" if name == "SIGKILL" else ""
    return f"was killed by signal {-code} ({name}{hint})"


@dataclass(eq=False)
class _Entry:
    """One item on its way: how many attempts it had and which workers failed it."""

    item: Item
    attempts: int = 0
    tried: set[int] = field(default_factory=set)


class _Ledger:
    """Item bookkeeping: lazy intake, retry queue, settling attempts, the circuit breaker."""

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
        self._returned: deque[_Entry] = deque()  # never started (a task ended before them): first
        self._lookahead: Item | None = None
        self._exhausted = False
        self.retries: deque[_Entry] = deque()
        self._settings = settings
        self._on_result = on_result
        self._emit = emit
        self.counts: Counter[str] = Counter()
        self._streak: tuple[str, int] = ("", 0)
        self.tripped: str | None = None

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

    def take_fresh(self, count: int) -> list[_Entry]:
        entries: list[_Entry] = []
        while len(entries) < count and self._returned:
            entries.append(self._returned.popleft())
        while len(entries) < count and self.has_fresh():
            assert self._lookahead is not None
            entries.append(_Entry(self._lookahead))
            if self._untaken is not None:
                self._untaken -= 1
            self._lookahead = None
        return entries

    def take_retry(self, wid: int) -> _Entry | None:
        """The first queued retry that worker ``wid`` has not failed."""
        for index, entry in enumerate(self.retries):
            if wid not in entry.tried:
                del self.retries[index]
                return entry
        return None

    def requeue(self, entry: _Entry) -> None:
        """Run again without charging an attempt (an item of a failed batch)."""
        self.retries.append(entry)

    def fresh_left(self) -> int | None:
        """Fresh items still to hand out (None: unknown, the source has no length)."""
        return None if self._untaken is None else self._untaken + len(self._returned)

    def give_back(self, entries: list[_Entry]) -> None:
        """Items of a failed task that the engine never touched: fresh work again, batched as any."""
        self._returned.extendleft(reversed(entries))

    def settle(self, entry: _Entry, result: ItemResult, wid: int) -> None:
        """Count one attempt: queue a retry, or report the final result."""
        entry.attempts += 1
        result.attempts = entry.attempts
        if result.status in _RETRYABLE and entry.attempts < self._settings.max_attempts:
            entry.tried.add(wid)
            self.retries.append(entry)
            self._emit(
                PoolEvent(
                    "attempt_failed",
                    f"{result.path}: attempt {entry.attempts} of {self._settings.max_attempts} "
                    f"{_failure_text(result)}; retrying on another worker process",
                    pid=result.worker_pid,
                    result=result,
                    traceback=result.traceback,
                )
            )
            return
        self.counts[result.status.value] += 1
        self._on_result(result)
        self._watch_streak(result)

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
            self._emit(PoolEvent("circuit_breaker", self.tripped, result=result))


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


@dataclass(eq=False)
class _Task:
    task_id: int
    entries: list[_Entry]
    settled: set[int] = field(default_factory=set)  # indices whose result came in a Heartbeat
    reached: int | None = None  # no entry from this index on was touched (None: any may have been)

    def unsettled(self) -> list[tuple[int, _Entry]]:
        return [(k, entry) for k, entry in enumerate(self.entries) if k not in self.settled]


@dataclass(eq=False)
class _Worker:
    """One worker process and where it is in its life: loading -> idle <-> busy -> stopping."""

    wid: int
    slot: int  # -1 while a standby
    process: WorkerProcess
    conn: Connection
    state: str = "loading"
    deadline: float | None = None  # monotonic: end of the load, the task budget or the stop stage
    device: str | None = None
    batch_size: int = 1  # items per task the engine suggested in its Ready
    heartbeat_every: int = 0  # items between the engine's heartbeats (0: none)
    images: int = 0
    task: _Task | None = None
    acked_wall: float | None = None  # epoch seconds of the task's Ack
    stop_stage: str | None = None  # close -> term -> kill
    conn_open: bool = True

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def live(self) -> bool:
        return self.state in ("loading", "idle", "busy")

    @property
    def name(self) -> str:
        where = "standby worker" if self.slot < 0 else f"worker {self.slot}"
        return f"{where} (pid {self.pid})"


class _Pool:
    """Scheduling and worker lifecycle: the event loop behind ``run_pool``."""

    def __init__(
        self,
        spec: EngineSpec,
        settings: PoolSettings,
        ledger: _Ledger,
        emit: Callable[[PoolEvent], None],
        should_stop: Callable[[], str | None],
        launcher: Launcher,
    ) -> None:
        self.launcher = launcher
        self.spec = spec
        self.settings = settings
        self.ledger = ledger
        self.emit = emit
        self.should_stop = should_stop
        self.workers: list[_Worker] = []  # every process not yet reaped, stopping ones included
        self.target = 1
        self.kind: str | None = None  # "cuda" or "cpu", from the first Ready
        self.device: str | None = None
        self.load_failures = 0
        self.spawn_after = 0.0  # monotonic; backoff after a failed replacement load
        self.draining: str | None = None
        self.started = 0
        self._wids = itertools.count(1)
        self._task_ids = itertools.count(1)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> PoolOutcome:
        if not self.ledger.has_work():
            return self._outcome(None, "nothing to do")
        self._spawn(0)
        while True:
            self._poll_stop()
            if self.ledger.tripped:
                return self._outcome("circuit_breaker", self.ledger.tripped)
            if self._finished():
                break
            self._fill_slots()
            self._dispatch()
            self._pump(self._wait_time())
            self._enforce_deadlines()
        self._close_all()
        if self.draining:
            done = sum(self.ledger.counts.values())
            return self._outcome(self.draining, f"stopped ({self.draining}) after {done} images")
        return self._outcome(None, "")

    def _poll_stop(self) -> None:
        if self.draining:
            return
        reason = self.should_stop()
        if reason:
            self.draining = reason
            busy = sum(w.state == "busy" for w in self.workers)
            self.emit(PoolEvent("stopping", f"stopping ({reason}): finishing {busy} task(s) in progress"))

    def _finished(self) -> bool:
        if any(w.state == "busy" for w in self.workers):
            return False
        return bool(self.draining) or not self.ledger.has_work()

    def _outcome(self, stopped: str | None, message: str) -> PoolOutcome:
        return PoolOutcome(stopped, message, dict(self.ledger.counts), self.device, self.started)

    def _wait_time(self) -> float:
        now = time.monotonic()
        moments = [w.deadline for w in self.workers if w.deadline is not None]
        if self.spawn_after > now:
            moments.append(self.spawn_after)
        return max(0.0, min([_TICK_S] + [moment - now for moment in moments]))

    # -- scheduling -------------------------------------------------------------------------------

    def _fill_slots(self) -> None:
        if self.draining or self.kind is None or time.monotonic() < self.spawn_after:
            return
        if not self.ledger.has_work():
            return
        for slot in range(self.target):
            if self._occupant(slot) is None and self._slot_clear(slot):
                spare = next((w for w in self.workers if w.slot < 0 and w.state == "idle"), None)
                if spare is not None:
                    spare.slot = slot
                    self.emit(PoolEvent("standby_promoted", f"{spare.name} takes over", slot, spare.pid))
                else:
                    self._spawn(slot)
        if self._standby_wanted():
            self._spawn(-1)

    def _occupant(self, slot: int) -> _Worker | None:
        return next((w for w in self.workers if w.slot == slot and w.live), None)

    def _slot_clear(self, slot: int) -> bool:
        # On a GPU the old process must be gone first: two models in one GPU's memory can OOM.
        return self.kind != "cuda" or not any(w.slot == slot for w in self.workers)

    def _standby_wanted(self) -> bool:
        if not self.settings.standby or self.kind != "cpu":
            return False
        return not any(w.slot < 0 and w.live for w in self.workers)

    def _dispatch(self) -> None:
        if self.draining:
            return
        for worker in sorted(self.workers, key=lambda w: w.slot):
            if worker.slot < 0 or worker.state != "idle":
                continue
            entry = self.ledger.take_retry(worker.wid)
            if entry is not None:
                self._send(worker, [entry])
            elif self._retry_stranded():
                self._retire(worker, "a retry needs a worker process that has not failed it")
            else:
                entries = self.ledger.take_fresh(self._batch_size(worker))
                if entries:
                    self._send(worker, entries)

    def _retry_stranded(self) -> bool:
        """A queued retry that no live worker may take and no empty slot will."""
        if not self.ledger.retries:
            return False
        if any(self._occupant(slot) is None for slot in range(self.target)):
            return False
        regulars = [w.wid for w in self.workers if w.slot >= 0 and w.live]
        return any(all(wid in entry.tried for wid in regulars) for entry in self.ledger.retries)

    def _batch_size(self, worker: _Worker) -> int:
        size = self.settings.batch_size or worker.batch_size
        left = self.ledger.fresh_left()
        if self.settings.batch_size is None and self.target > 1 and left is not None:
            # The engine's long tasks, cut near the end to a fair share of what is left, so one
            # GPU does not finish a whole task alone while the others wait (never below one of
            # the engine's sub-batches).
            size = min(size, max(worker.heartbeat_every or 1, -(-left // self.target)))
        if self.settings.max_images_per_worker:
            size = min(size, self.settings.max_images_per_worker - worker.images)
        return max(1, size)

    def _send(self, worker: _Worker, entries: list[_Entry]) -> None:
        task = _Task(next(self._task_ids), entries)
        worker.task = task
        worker.state = "busy"
        worker.acked_wall = None
        # Provisional deadline: bounds a worker that never acknowledges; the Ack restarts the clock.
        worker.deadline = time.monotonic() + self._budget(task)
        try:
            worker.conn.send(Task(task.task_id, tuple(entry.item for entry in entries)))
        except OSError:
            pass  # the worker died; its exit settles the task

    def _budget(self, task: _Task, worker: _Worker | None = None) -> float:
        """timeout x the items the worker may finish before it next reports (Done or Heartbeat)."""
        items = len(task.entries)
        if worker is not None and worker.heartbeat_every:
            items = min(items, worker.heartbeat_every)
        return self.settings.timeout * items

    # -- messages and exits -----------------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        waitables: list[object] = [w.process.sentinel for w in self.workers]
        waitables += [w.conn for w in self.workers if w.conn_open]
        if waitables:
            wait(waitables, timeout)  # type: ignore[arg-type]
        else:
            time.sleep(timeout)
        for worker in list(self.workers):
            self._read(worker)
            if not worker.process.is_alive():
                self._on_exit(worker)

    def _read(self, worker: _Worker) -> None:
        while worker.conn_open:
            try:
                if not worker.conn.poll(0):
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.conn_open = False
                return
            if worker.state != "stopping":  # a stopped worker's late words no longer count
                self._on_message(worker, message)

    def _on_message(self, worker: _Worker, message: object) -> None:
        task = worker.task
        for note in getattr(message, "notes", ()):
            self.emit(PoolEvent("worker_warning", f"{worker.name}: {note}", worker.slot, worker.pid))
        if isinstance(message, Ready):
            self._on_ready(worker, message)
        elif isinstance(message, LoadFailed):
            if message.error_type == "ConfigError" and self.kind is None:
                # e.g. a prompt longer than the model reads: the user's to fix, not the model's.
                self._stop(worker, graceful=False)
                raise ConfigError(message.message)
            detail = (
                message.message
                if message.error_type == "ModelLoadError"
                else (f"{message.error_type}: {message.message}")
            )
            self._on_load_failure(worker, detail, message.traceback)
        elif isinstance(message, Ack) and task is not None and message.task_id == task.task_id:
            worker.acked_wall = time.time()
            worker.deadline = time.monotonic() + self._budget(task, worker)
            paths = tuple(entry.item.path for entry in task.entries)
            text = f"{worker.name} took {len(paths)} image(s)"
            self.emit(PoolEvent("task_started", text, worker.slot, worker.pid, paths=paths))
        elif isinstance(message, Heartbeat) and task is not None and message.task_id == task.task_id:
            worker.deadline = time.monotonic() + self._budget(task, worker)
            if message.reached is not None:
                task.reached = max(task.reached or 0, message.reached)
            for index, result in message.results:
                if 0 <= index < len(task.entries) and index not in task.settled:
                    task.settled.add(index)
                    self.ledger.settle(task.entries[index], result, worker.wid)
        elif isinstance(message, Done) and task is not None and message.task_id == task.task_id:
            self._on_done(worker, task, message.results)

    def _on_ready(self, worker: _Worker, ready: Ready) -> None:
        worker.state = "idle"
        worker.deadline = None
        worker.device = ready.device
        worker.batch_size = ready.task_size
        worker.heartbeat_every = ready.heartbeat_every
        self.load_failures = 0
        self.emit(PoolEvent("worker_ready", f"{worker.name} ready on {ready.device}", worker.slot, ready.pid))
        if self.kind is None:
            self.device = ready.device
            self.kind = "cuda" if ready.device.startswith("cuda") else "cpu"
            self.target = self._pool_size(ready)
            if self.target > 1:
                self.emit(PoolEvent("pool_size", f"starting {self.target - 1} more worker(s)"))

    def _pool_size(self, ready: Ready) -> int:
        if self.settings.workers:
            return self.settings.workers
        return self.launcher.pool_size(self.spec, self.kind == "cuda", ready.gpu_count)

    def _on_done(self, worker: _Worker, task: _Task, results: list[ItemResult]) -> None:
        worker.task = None
        worker.state = "idle"
        worker.deadline = None
        worker.images += len(task.entries)
        if len(results) != len(task.entries):  # the worker guards this; never trust a pipe blindly
            results = [_missing_result(entry.item, worker) for entry in task.entries]
        limit = self.settings.max_images_per_worker
        if limit and worker.images >= limit:
            self._retire(worker, f"recycled after {worker.images} images")
        elif not any(r.status in _RETRYABLE for r in results):
            # Next task first: recording results (a durable commit each) must not idle the worker.
            self._dispatch()
        for index, entry in task.unsettled():
            self.ledger.settle(entry, results[index], worker.wid)

    def _on_exit(self, worker: _Worker) -> None:
        self._read(worker)  # words sent just before the end (Done, LoadFailed)
        worker.process.join(0)
        self.workers.remove(worker)
        worker.conn.close()
        how = describe_exit(worker.process.exitcode)
        if worker.state == "stopping":
            self.emit(PoolEvent("worker_exited", f"{worker.name} {how}", worker.slot, worker.pid))
        elif worker.state == "loading":
            self._on_load_failure(worker, f"the worker process {how} while loading the model", None)
        else:
            message = f"{worker.name} {how} unexpectedly"
            self.emit(PoolEvent("worker_exited", message, worker.slot, worker.pid))
            if worker.task is not None:
                self._fail_task(worker, worker.task, Status.CRASHED, worker.process.exitcode)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.deadline is None or now < worker.deadline:
                continue
            if worker.state == "loading":
                self._on_load_failure(
                    worker, f"the model did not load within {self.settings.load_timeout:g} s", None
                )
            elif worker.state == "busy" and worker.task is not None:
                task = worker.task
                self.emit(
                    PoolEvent(
                        "worker_timeout",
                        f"{worker.name}: no result within {self._budget(task, worker):g} s; stopping it",
                        worker.slot,
                        worker.pid,
                    )
                )
                self._stop(worker, graceful=False)
                self._fail_task(worker, task, Status.TIMEOUT, None)
            elif worker.state == "stopping":
                self._escalate(worker)

    def _fail_task(self, worker: _Worker, task: _Task, status: Status, code: int | None) -> None:
        """A task ended by a timeout or a crash: results already reported stand; items the engine
        never touched go back as fresh work; the others are suspects, rerun one at a time (a lone
        suspect takes the failure)."""
        worker.task = None
        reached = len(task.entries) if task.reached is None else task.reached
        unsettled = task.unsettled()
        self.ledger.give_back([entry for k, entry in unsettled if k >= reached])
        suspects = [entry for k, entry in unsettled if k < reached]
        if not suspects:
            return
        if len(suspects) > 1:
            self.emit(
                PoolEvent(
                    "batch_split",
                    f"a batch of {len(task.entries)} images ended {status.value} on {worker.name}; "
                    f"running the {len(suspects)} unfinished ones it had started again one at a time",
                    worker.slot,
                    worker.pid,
                )
            )
            for entry in suspects:
                self.ledger.requeue(entry)
            return
        if status is Status.TIMEOUT:
            budget = self._budget(task, worker)
            message = f"no result within {budget:g} s; worker process {worker.pid} was stopped"
        else:
            message = f"worker process {worker.pid} {describe_exit(code)}"
        result = ItemResult(
            path=suspects[0].item.path,
            status=status,
            error_message=message,
            exit_code=code,
            started_at=worker.acked_wall,
            finished_at=time.time(),
            worker_pid=worker.pid,
            device=worker.device,
        )
        self.ledger.settle(suspects[0], result, worker.wid)

    # -- lifecycle --------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        factory_slot = slot if slot >= 0 else self.target  # a standby gets a slot past the workers
        process, parent_end = self.launcher.start(self.spec, factory_slot, self._threads())
        worker = _Worker(next(self._wids), slot, process, parent_end)
        worker.deadline = time.monotonic() + self.settings.load_timeout
        self.workers.append(worker)
        self.started += 1
        self.emit(PoolEvent("worker_started", f"{worker.name} loading the model", slot, worker.pid))

    def _threads(self) -> int:
        if self.settings.threads:
            return self.settings.threads
        return self.launcher.threads(self.settings.workers or self.target)

    def _retire(self, worker: _Worker, why: str) -> None:
        self.emit(PoolEvent("recycle", f"{worker.name}: {why}", worker.slot, worker.pid))
        self._stop(worker, graceful=True)

    def _stop(self, worker: _Worker, graceful: bool) -> None:
        worker.state = "stopping"
        if graceful and worker.conn_open:
            try:
                worker.conn.send(Shutdown())
                worker.stop_stage = "close"
                worker.deadline = time.monotonic() + self.settings.close_grace
                return
            except OSError:
                pass
        _terminate(worker.process)
        worker.stop_stage = "term"
        worker.deadline = time.monotonic() + self.settings.stop_grace

    def _escalate(self, worker: _Worker) -> None:
        if worker.stop_stage == "close":
            _terminate(worker.process)
            worker.stop_stage = "term"
        elif worker.stop_stage == "term":
            _kill(worker.process)
            worker.stop_stage = "kill"
        else:  # unkillable (stuck in the kernel): stop waiting for it
            self.workers.remove(worker)
            self.emit(PoolEvent("worker_lost", f"{worker.name} did not die; giving up on it", worker.slot))
            return
        worker.deadline = time.monotonic() + self.settings.stop_grace

    def _on_load_failure(self, worker: _Worker, detail: str, trace: str | None) -> None:
        if worker.process.is_alive():
            self._stop(worker, graceful=False)
        message = f"{worker.name}: {detail}"
        self.emit(PoolEvent("load_failed", message, worker.slot, worker.pid, traceback=trace))
        if self.kind is None:
            raise ModelLoadError(f"the model could not be loaded: {detail}")
        if self.draining:
            return  # no replacement is needed any more
        self.load_failures += 1
        if self.load_failures > self.settings.load_retries:
            raise ModelLoadError(
                f"a replacement worker failed to load the model {self.load_failures} times in a row; "
                f"last: {detail}"
            )
        self.spawn_after = time.monotonic() + self.settings.load_backoff * 2 ** (self.load_failures - 1)

    def _close_all(self) -> None:
        """Ask every worker to exit (idle ones close their engine), then wait, escalating as needed."""
        for worker in list(self.workers):
            if worker.state != "stopping":
                self._stop(worker, graceful=worker.state == "idle")
        while self.workers:
            self._pump(self._wait_time())
            self._enforce_deadlines()

    def kill_all(self) -> None:
        """Last resort on every exit path: terminate, short wait, kill, join. Never raises."""
        for worker in self.workers:
            _terminate(worker.process)
        end = time.monotonic() + self.settings.stop_grace
        for worker in self.workers:
            worker.process.join(max(0.0, end - time.monotonic()))
        for worker in self.workers:
            if worker.process.is_alive():
                _kill(worker.process)
                worker.process.join(1.0)
            worker.conn.close()
        self.workers.clear()


def _missing_result(item: Item, worker: _Worker) -> ItemResult:
    now = time.time()
    return ItemResult(
        path=item.path,
        status=Status.ERROR,
        error_type="ProtocolError",
        error_message="the worker returned a different number of results than items",
        started_at=worker.acked_wall,
        finished_at=now,
        worker_pid=worker.pid,
        device=worker.device,
    )


def _terminate(process: WorkerProcess) -> None:
    try:
        if process.is_alive():
            process.terminate()
    except (OSError, ValueError):
        pass


def _kill(process: WorkerProcess) -> None:
    try:
        if process.is_alive():
            process.kill()
    except (OSError, ValueError):
        pass


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
