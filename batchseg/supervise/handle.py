"""One worker process as the pool sees it: its pipe, its task in flight, its way to an end.

Parent side: must not import torch.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

from ..worker.contract import EngineSpec
from ..worker.messages import Shutdown, Task, Threads
from .launch import Launcher, WorkerProcess
from .ledger import Entry

__all__ = ["InFlight", "WorkerHandle", "describe_exit", "kill_all"]


@dataclass(eq=False)
class InFlight:
    """A task sent to a worker, and what its heartbeats said so far."""

    task_id: int
    entries: list[Entry]
    settled: set[int] = field(default_factory=set)  # indices whose result came in a Heartbeat
    reached: int | None = None  # no entry from this index on was touched (None: any may have been)

    def unsettled(self) -> list[tuple[int, Entry]]:
        return [(k, entry) for k, entry in enumerate(self.entries) if k not in self.settled]


class WorkerHandle:
    """One worker process and where it is in its life: loading -> idle <-> busy -> stopping.

    Workers use the ``spawn`` start method on every OS and are daemon processes; each loads one
    engine and says Ready. ``deadline`` (monotonic) is the end of whatever the worker is doing:
    its load, its task's budget, or the current stage of its stop.

    Stopping climbs a ladder, each stage with its own grace: a graceful stop sends Shutdown (the
    engine closes, ``close_grace``); then terminate, ``stop_grace``; then kill, ``stop_grace``;
    a process that survives even that (stuck in the kernel) is given up on. ``kill`` skips the
    ladder: the last resort on every exit path of the pool.
    """

    def __init__(self, wid: int, slot: int, process: WorkerProcess, conn: Connection, threads: int) -> None:
        self.wid = wid
        self.slot = slot
        self.process = process
        self.conn = conn
        self.threads = threads
        self.state = "loading"
        self.deadline: float | None = None
        self.device: str | None = None
        self.task_size = 1  # items per task the engine suggested in its Ready
        self.heartbeat_every = 0  # items between the engine's heartbeats (0: none)
        self.images = 0
        self.task: InFlight | None = None
        self.acked_wall: float | None = None  # epoch seconds of the task's Ack
        self.stop_stage: str | None = None  # close -> term -> kill
        self.conn_open = True

    @classmethod
    def spawn(
        cls, launcher: Launcher, wid: int, slot: int, spec: EngineSpec, threads: int, load_timeout: float
    ) -> WorkerHandle:
        """Start a worker; its engine sees ``threads`` as its configuration's threads."""
        spec = replace(spec, config=spec.config.with_changes(threads=threads))
        process, parent_end = launcher.start(spec, slot, threads)
        worker = cls(wid, slot, process, parent_end, threads)
        worker.deadline = time.monotonic() + load_timeout
        return worker

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def live(self) -> bool:
        return self.state in ("loading", "idle", "busy")

    @property
    def name(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"

    def send_task(self, task: InFlight, budget: float, may_split: bool = False) -> None:
        """Hand over a task; ``budget`` bounds a worker that never acknowledges (the Ack restarts it);
        ``may_split``: see ``messages.Task``."""
        self.task = task
        self.state = "busy"
        self.acked_wall = None
        self.deadline = time.monotonic() + budget
        try:
            self.conn.send(Task(task.task_id, tuple(entry.item for entry in task.entries), may_split))
        except OSError:
            pass  # the worker died; its exit settles the task

    def set_threads(self, count: int) -> None:
        if count < self.threads and self.conn_open:
            try:
                self.conn.send(Threads(count))
                self.threads = count
            except OSError:
                pass  # the worker died; its exit tells

    def stop(self, graceful: bool, close_grace: float, stop_grace: float) -> None:
        self.state = "stopping"
        if graceful and self.conn_open:
            try:
                self.conn.send(Shutdown())
                self.stop_stage = "close"
                self.deadline = time.monotonic() + close_grace
                return
            except OSError:
                pass
        _terminate(self.process)
        self.stop_stage = "term"
        self.deadline = time.monotonic() + stop_grace

    def escalate(self, stop_grace: float) -> bool:
        """The next stage of a stop whose grace ran out; False: unkillable, stop waiting for it."""
        if self.stop_stage == "close":
            _terminate(self.process)
            self.stop_stage = "term"
        elif self.stop_stage == "term":
            _kill(self.process)
            self.stop_stage = "kill"
        else:
            return False
        self.deadline = time.monotonic() + stop_grace
        return True


def kill_all(workers: list[WorkerHandle], stop_grace: float) -> None:
    """Terminate, short wait, kill, join every worker; never raises."""
    for worker in workers:
        _terminate(worker.process)
    end = time.monotonic() + stop_grace
    for worker in workers:
        worker.process.join(max(0.0, end - time.monotonic()))
    for worker in workers:
        if worker.process.is_alive():
            _kill(worker.process)
            worker.process.join(1.0)
        worker.conn.close()


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
