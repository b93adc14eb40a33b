"""The pool: feeds items to spawned worker processes and keeps a run alive through bad images.

``run_pool`` is a single-threaded event loop in the parent (``Pool``); item bookkeeping lives in
``ledger``, one process in ``handle``, the messages in ``messages``. Must not import torch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import wait

from ..errors import ConfigError
from ..records import Item, ItemResult, Status, failure_result
from ..worker.contract import EngineSpec
from ..worker.messages import Ack, Done, Heartbeat, LoadFailed, Ready, Unplaced
from .handle import InFlight, WorkerHandle, describe_exit, kill_all
from .launch import Launcher, LocalLauncher, usable_cores
from .ledger import RETRYABLE, Entry, Ledger
from .loads import LoadFailures
from .settings import EventKind, PoolEvent, PoolOutcome, PoolSettings

__all__ = [
    "Launcher",
    "LocalLauncher",
    "PoolEvent",
    "PoolOutcome",
    "PoolSettings",
    "describe_exit",
    "run_pool",
    "usable_cores",
]

_TICK_S = 0.2  # longest wait between two looks at should_stop()


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

    ``items`` is consumed lazily. Raises ``ModelLoadError`` when the engine cannot be loaded and
    ``ConfigError`` when it refuses the configuration; any exception from a callback propagates.
    No worker process survives: every exit path (normal end, an exception, KeyboardInterrupt)
    goes through a ``finally`` that terminates, kills and joins; workers are daemons; and a
    worker exits by itself when its parent dies (see ``batchseg.worker.process``). ``launcher``
    says where workers run: processes here (the default) or Ray actors (``ray_backend``).
    """
    emit = on_event or (lambda _event: None)
    ledger = Ledger(items, settings, on_result, emit)
    pool = Pool(spec, settings, ledger, emit, should_stop, launcher or LocalLauncher())
    try:
        return pool.run()
    finally:
        kill_all(pool.workers, settings.stop_grace)
        pool.workers.clear()


class Pool:
    """Scheduling and worker lifecycle: the event loop behind ``run_pool``. It never blocks on a
    worker: it waits on every pipe and process sentinel at once, so a worker that hangs, dies or
    reloads never stalls the others.

    Size: with ``workers`` given, every worker loads at once; with ``workers=None`` one loads
    first, and its Ready sets the size: one per GPU when it reports CUDA (one if the device names
    a GPU, e.g. ``cuda:1``), one on CPU.

    Loading (``loads.LoadFailures``): an engine that raises before any worker is ready ends the
    run (ModelLoadError; ConfigError when it refuses the configuration); a worker that dies or
    times out while loading is replaced after a back-off, and the run goes on with the workers that
    are ready. A worker the launcher finds no room for (``Unplaced``: a Ray cluster short of CPUs
    or GPUs) leaves its slot empty; ConfigError when no slot is left.

    Threads: the pool owns the thread count, since only it knows how many workers there are:
    ``threads``, else the usable cores shared out among the workers, so the total never exceeds
    the cores. A first worker that loaded before the pool knew its size is told its share.

    Stopping: ``should_stop()`` returning a reason drains the pool: no new task starts (retries
    included), tasks in flight finish or time out, and the outcome says ``stopped=reason``. Items
    with attempts left are not reported; a resumed run does them.
    """

    def __init__(
        self,
        spec: EngineSpec,
        settings: PoolSettings,
        ledger: Ledger,
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
        self.workers: list[WorkerHandle] = []  # every process not yet reaped, stopping ones included
        self.target = settings.workers or 1
        self.kind: str | None = None  # "cuda" or "cpu", from the first Ready
        self.device: str | None = None
        self.loads = LoadFailures(settings)
        self.draining: str | None = None
        self._wids = itertools.count(1)
        self._task_ids = itertools.count(1)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> PoolOutcome:
        if not self.ledger.has_work():
            return self._outcome(None, "nothing to do")
        # With --workers given, every worker loads at once (an unindexed cuda spreads them over the
        # GPUs by slot); otherwise the first one's Ready tells how many GPUs there are, and the
        # others start then. Loading one after the other cost a whole model load per extra GPU.
        for slot in range(self.target if self.settings.workers else 1):
            self._spawn(slot)
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
            text = f"stopping ({reason}): finishing {busy} task(s) in progress"
            self.emit(PoolEvent(EventKind.STOPPING, text))

    def _finished(self) -> bool:
        if any(w.state == "busy" for w in self.workers):
            return False
        return bool(self.draining) or not self.ledger.has_work()

    def _outcome(self, stopped: str | None, message: str) -> PoolOutcome:
        return PoolOutcome(stopped, message, dict(self.ledger.counts), self.device)

    def _wait_time(self) -> float:
        now = time.monotonic()
        moments = [w.deadline for w in self.workers if w.deadline is not None]
        if self.loads.spawn_after > now:
            moments.append(self.loads.spawn_after)
        return max(0.0, min([_TICK_S] + [moment - now for moment in moments]))

    # -- scheduling -------------------------------------------------------------------------------

    def _fill_slots(self) -> None:
        """Replacement: a slot without a live worker gets a new one, loading in the background
        while the others keep taking tasks (or load). On CUDA, or before any worker said where it
        runs, it starts only once the process it replaces has exited, so two models never share
        one GPU's memory; on CPU at once (a recycled worker closes its engine while its
        replacement loads)."""
        if self.draining or time.monotonic() < self.loads.spawn_after or not self.ledger.has_work():
            return
        for slot in self._empty_slots():
            if self._slot_clear(slot):
                self._spawn(slot)

    def _empty_slots(self) -> list[int]:
        """Slots without a live worker, less those given up."""
        return [s for s in range(self.target) if s not in self.loads.given_up and self._occupant(s) is None]

    def _occupant(self, slot: int) -> WorkerHandle | None:
        return next((w for w in self.workers if w.slot == slot and w.live), None)

    def _slot_clear(self, slot: int) -> bool:
        return self.kind == "cpu" or not any(w.slot == slot for w in self.workers)

    def _dispatch(self) -> None:
        """Retries first, each to a worker that has not failed it. After an ``error`` the worker
        lives on; when no other worker can take the retry (e.g. ``workers=1``) that worker is
        recycled first, so a process left in a bad state (a poisoned CUDA context) never decides
        the last attempt. A timed-out or crashed worker is gone, so any other one qualifies."""
        if self.draining:
            return
        for worker in sorted(self.workers, key=lambda w: w.slot):
            if worker.state != "idle":
                continue
            entry = self.ledger.take_retry(worker.wid)
            if entry is not None:
                self._send(worker, [entry])
            elif self._retry_stranded():
                self._retire(worker, "a retry needs a worker process that has not failed it")
            else:
                entries = self.ledger.take_fresh(self._task_size(worker))
                if entries:
                    self._send(worker, entries)

    def _retry_stranded(self) -> bool:
        """A queued retry that no live worker may take and no empty slot will."""
        if not self.ledger.retries:
            return False
        if self._empty_slots():
            return False
        live = [w.wid for w in self.workers if w.live]
        return any(all(wid in entry.tried for wid in live) for entry in self.ledger.retries)

    def _task_size(self, worker: WorkerHandle) -> int:
        size = self.settings.task_size or worker.task_size
        left = self.ledger.fresh_left()
        if self.settings.task_size is None and self.target > 1 and left is not None:
            # The engine's long tasks, cut near the end to a fair share of what is left, so one
            # GPU does not finish a whole task alone while the others wait (never below one of
            # the engine's sub-batches).
            size = min(size, max(worker.heartbeat_every or 1, -(-left // self.target)))
        if self.settings.max_images_per_worker:
            size = min(size, self.settings.max_images_per_worker - worker.images)
        return max(1, size)

    def _send(self, worker: WorkerHandle, entries: list[Entry]) -> None:
        task = InFlight(next(self._task_ids), entries)
        worker.send_task(task, self._budget(task), may_split=self.target > 1)

    def _budget(self, task: InFlight, worker: WorkerHandle | None = None) -> float:
        """Watchdog: ``timeout`` x the items the worker may finish before it next reports (Done,
        or a Heartbeat after at most ``heartbeat_every`` items); the clock starts at the Ack."""
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

    def _read(self, worker: WorkerHandle) -> None:
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

    def _on_message(self, worker: WorkerHandle, message: object) -> None:
        task = worker.task
        if isinstance(message, Heartbeat | Done):
            for note in message.notes:
                text = f"{worker.name}: {note}"
                self.emit(PoolEvent(EventKind.WORKER_WARNING, text, worker.slot, worker.pid))
        if isinstance(message, Ready):
            self._on_ready(worker, message)
        elif isinstance(message, LoadFailed):
            if message.config_error and self.kind is None:
                # e.g. a prompt the engine cannot read: the user's to fix, not the model's.
                self._stop(worker, graceful=False)
                raise ConfigError(message.detail)
            self._on_load_failure(worker, message.detail, message.traceback, raised=True)
        elif isinstance(message, Unplaced):
            self._on_unplaced(worker, message.detail)
        elif (
            isinstance(message, Ack | Heartbeat | Done)
            and task is not None
            and message.task_id == task.task_id
        ):
            self._on_task_message(worker, task, message)
        # else: a message about a task that already ended

    def _on_task_message(self, worker: WorkerHandle, task: InFlight, message: Ack | Heartbeat | Done) -> None:
        if isinstance(message, Ack):
            worker.acked_wall = time.time()
            worker.deadline = time.monotonic() + self._budget(task, worker)
            paths = tuple(entry.item.path for entry in task.entries)
            text = f"{worker.name} took {len(paths)} image(s)"
            self.emit(PoolEvent(EventKind.TASK_STARTED, text, worker.slot, worker.pid, paths=paths))
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(worker, task, message)
        else:
            self._on_done(worker, task, message.results)

    def _on_ready(self, worker: WorkerHandle, ready: Ready) -> None:
        capabilities = ready.capabilities
        worker.state = "idle"
        worker.deadline = None
        worker.device = capabilities.device
        worker.task_size = capabilities.task_size
        worker.heartbeat_every = capabilities.heartbeat_every
        self.loads.ready()
        text = f"{worker.name} ready on {capabilities.device} ({worker.threads} thread(s))"
        self.emit(PoolEvent(EventKind.WORKER_READY, text, worker.slot, ready.pid))
        if self.kind is None:
            self.device = capabilities.device
            self.kind = "cuda" if capabilities.device.startswith("cuda") else "cpu"
            if not self.settings.workers:
                self.target = self._pool_size(capabilities.gpu_count)
                if self.target > 1:
                    self.emit(PoolEvent(EventKind.POOL_SIZE, f"starting {self.target - 1} more worker(s)"))
                worker.set_threads(self._threads())

    def _pool_size(self, gpu_count: int) -> int:
        return self.launcher.pool_size(self.spec, self.kind == "cuda", gpu_count)

    def _on_heartbeat(self, worker: WorkerHandle, task: InFlight, beat: Heartbeat) -> None:
        worker.deadline = time.monotonic() + self._budget(task, worker)
        if beat.reached is not None:
            task.reached = max(task.reached or 0, beat.reached)
        for index, result in beat.results:
            if 0 <= index < len(task.entries) and index not in task.settled:
                task.settled.add(index)
                self.ledger.settle(task.entries[index], result, worker.wid)

    def _on_done(self, worker: WorkerHandle, task: InFlight, results: list[ItemResult]) -> None:
        worker.task = None
        worker.state = "idle"
        worker.deadline = None
        worker.images += len(task.entries)
        if len(results) != len(task.entries):  # the worker guards this; never trust a pipe blindly
            results = [self._protocol_failure(entry.item, worker) for entry in task.entries]
        limit = self.settings.max_images_per_worker
        if limit and worker.images >= limit:
            # Recycling bounds a leak: the worker closes its engine and exits; a new one replaces it.
            self._retire(worker, f"recycled after {worker.images} images")
        elif not any(r.status in RETRYABLE for r in results):
            # Next task first: recording results (a durable commit each) must not idle the worker.
            self._dispatch()
        for index, entry in task.unsettled():
            self.ledger.settle(entry, results[index], worker.wid)

    def _protocol_failure(self, item: Item, worker: WorkerHandle) -> ItemResult:
        message = "the worker returned a different number of results than items"
        result = failure_result(
            item, Status.ERROR, error_type="ProtocolError", message=message, device=worker.device,
            started_at=worker.acked_wall,
        )  # fmt: skip
        result.worker_pid = worker.pid
        return result

    def _on_unplaced(self, worker: WorkerHandle, detail: str) -> None:
        worker.state, worker.deadline = "unplaced", None  # its process ends by itself, now
        self.loads.given_up.add(worker.slot)
        text = f"worker {worker.slot} {detail}"
        self.emit(PoolEvent(EventKind.WORKER_UNPLACED, text, worker.slot))
        if len(self.loads.given_up) >= self.target:  # no slot left to fill
            raise ConfigError(f"no worker could be placed; last: {text}")

    def _on_exit(self, worker: WorkerHandle) -> None:
        self._read(worker)  # words sent just before the end (Done, LoadFailed)
        worker.process.join(0)
        self.workers.remove(worker)
        worker.conn.close()
        lost: str | None = getattr(worker.process, "lost", None)  # a Ray actor: its node, Ray's words
        how = lost or describe_exit(worker.process.exitcode)
        if worker.state == "unplaced":
            return  # told when it was given up; it never started
        if worker.state == "stopping":  # pid None: a Ray actor still waiting for a node, no process
            text = f"{worker.name} {how}" if worker.pid else f"worker {worker.slot} stopped before it started"
            self.emit(PoolEvent(EventKind.WORKER_EXITED, text, worker.slot, worker.pid))
        elif worker.state == "loading":
            self._on_load_failure(worker, f"the worker process {how} while loading the model", None)
        else:
            kind = EventKind.WORKER_LOST if lost else EventKind.WORKER_EXITED
            self.emit(
                PoolEvent(kind, f"{worker.name} {lost or how + ' unexpectedly'}", worker.slot, worker.pid)
            )
            if worker.task is not None and getattr(worker.process, "node_lost", False):
                self.ledger.give_back([entry for _, entry in worker.task.unsettled()])  # no image's fault
            elif worker.task is not None:
                self._fail_task(worker, worker.task, Status.CRASHED, worker.process.exitcode)

    def _enforce_deadlines(self) -> None:
        """Past its budget a busy worker is stopped at once (terminate, then kill) and replaced;
        its task fails ``timeout``. A load past ``load_timeout`` is a load failure."""
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
                budget = self._budget(task, worker)
                text = f"{worker.name}: no result within {budget:g} s; stopping it"
                self.emit(PoolEvent(EventKind.WORKER_TIMEOUT, text, worker.slot, worker.pid))
                self._stop(worker, graceful=False)
                self._fail_task(worker, task, Status.TIMEOUT, None)
            elif worker.state == "stopping" and not worker.escalate(self.settings.stop_grace):
                self.workers.remove(worker)
                text = f"{worker.name} did not die; giving up on it"
                self.emit(PoolEvent(EventKind.WORKER_LOST, text, worker.slot))

    def _fail_task(self, worker: WorkerHandle, task: InFlight, status: Status, code: int | None) -> None:
        """A task ended by a timeout or a crash: results already reported stand; items the engine
        never touched go back as fresh work; the others are suspects. Several suspects are not
        charged: they run again one at a time, so only the poison image is marked. A lone
        suspect takes the failure, with the exit code (negative: the signal) and the pid."""
        worker.task = None
        reached = len(task.entries) if task.reached is None else task.reached
        unsettled = task.unsettled()
        self.ledger.give_back([entry for k, entry in unsettled if k >= reached])
        suspects = [entry for k, entry in unsettled if k < reached]
        if len(suspects) > 1:
            self.emit(
                PoolEvent(
                    EventKind.BATCH_SPLIT,
                    f"a batch of {len(task.entries)} images ended {status.value} on {worker.name}; "
                    f"running the {len(suspects)} unfinished ones it had started again one at a time",
                    worker.slot,
                    worker.pid,
                )
            )
            for entry in suspects:
                self.ledger.requeue(entry)
        elif suspects:
            if status is Status.TIMEOUT:
                budget = self._budget(task, worker)
                message = f"no result within {budget:g} s; worker process {worker.pid} was stopped"
            else:
                message = f"worker process {worker.pid} {describe_exit(code)}"
            result = failure_result(
                suspects[0].item,
                status,
                message=message,
                exit_code=code,
                device=worker.device,
                started_at=worker.acked_wall,
            )
            result.worker_pid = worker.pid
            self.ledger.settle(suspects[0], result, worker.wid)

    # -- lifecycle --------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        worker = WorkerHandle.spawn(
            self.launcher, next(self._wids), slot, self.spec, self._threads(), self.settings.load_timeout
        )
        self.workers.append(worker)
        self.emit(PoolEvent(EventKind.WORKER_STARTED, f"{worker.name} loading the model", slot, worker.pid))

    def _threads(self) -> int:
        """This worker's torch threads: the user's count, else its share of the usable cores."""
        if self.settings.threads:
            return self.settings.threads
        return self.launcher.threads(self.target)

    def _retire(self, worker: WorkerHandle, why: str) -> None:
        self.emit(PoolEvent(EventKind.RECYCLE, f"{worker.name}: {why}", worker.slot, worker.pid))
        self._stop(worker, graceful=True)

    def _stop(self, worker: WorkerHandle, graceful: bool) -> None:
        worker.stop(graceful, self.settings.close_grace, self.settings.stop_grace)

    def _on_load_failure(
        self, worker: WorkerHandle, detail: str, trace: str | None, raised: bool = False
    ) -> None:
        """A load that failed (``raised``: the engine raised): the worker is stopped and the failure
        told; ``LoadFailures.failed`` says whether the run ends, or the slot is tried again or given up."""
        if worker.process.is_alive():
            self._stop(worker, graceful=False)
        message = f"{worker.name}: {detail}"
        self.emit(PoolEvent(EventKind.LOAD_FAILED, message, worker.slot, worker.pid, traceback=trace))
        if self.draining and not (raised and self.kind is None):
            return  # no replacement is needed any more
        live = sum(w.live for w in self.workers)
        given_up = self.loads.failed(worker.slot, detail, raised=raised, first=self.kind is None, live=live)
        if given_up:
            self.emit(PoolEvent(EventKind.LOAD_FAILED, given_up, worker.slot))

    def _close_all(self) -> None:
        """Ask every worker to exit (idle ones close their engine), then wait, escalating as needed."""
        for worker in list(self.workers):
            if worker.state not in ("stopping", "unplaced"):
                self._stop(worker, graceful=worker.state == "idle")
        while self.workers:
            self._pump(self._wait_time())
            self._enforce_deadlines()
