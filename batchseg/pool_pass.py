"""One pass of the pool over the pending images: results made durable, progress, log lines,
manifest exports and the decision to stop, each a named step of ``PoolPass``.

Parent side: must not import torch.
"""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path
from typing import TextIO

from .config import RunConfig
from .errors import BatchsegError, OutputError
from .logs import RunLog
from .records import FailureCategory, Item, ItemResult, Status, failure_result
from .report import PreviewMaker
from .run_progress import Progress
from .signals import StopRequest
from .store.checkpoint import Checkpoint
from .supervise.pool import Launcher, PoolEvent, PoolOutcome, PoolSettings, run_pool
from .supervise.settings import EventKind
from .upkeep import WorkerFiles, export
from .worker.contract import EngineSpec

__all__ = ["COMMIT_GROUP", "COMMIT_WINDOW_S", "PoolPass"]

#: Longest a received result waits for its commit (one turn of the pool's loop, see _Recorder)...
COMMIT_WINDOW_S = 0.5
#: ...or until this many are waiting.
COMMIT_GROUP = 64
#: Pool events too frequent to log one line each (a recycled worker every N images is routine).
QUIET_EVENTS = {EventKind.WORKER_STARTED, EventKind.TASK_STARTED}
#: Pool events the log shows as warnings.
WARNING_EVENTS = {
    EventKind.ATTEMPT_FAILED,
    EventKind.WORKER_TIMEOUT,
    EventKind.WORKER_LOST,
    EventKind.WORKER_UNPLACED,
    EventKind.LOAD_FAILED,
    EventKind.WORKER_WARNING,
}


class PoolPass:
    """Runs the pool over ``pending`` and answers its callbacks: ``on_result`` (record, preview,
    progress, log, periodic export), ``on_event`` (log, in-flight rows, a dead worker's temp
    files) and ``should_stop`` (commit what came in, progress line, stop reasons)."""

    def __init__(
        self,
        config: RunConfig,
        factory: str,
        checkpoint: Checkpoint,
        pending: list[Item],
        log: RunLog,
        stream: TextIO | None,
        stop_after: float | None,
        launcher: Launcher | None = None,
    ) -> None:
        self.config, self.factory, self.checkpoint = config, factory, checkpoint
        self.pending, self.log = pending, log
        self.stop_after = stop_after
        self.launcher = launcher  # None: the configuration's (processes here, or Ray)
        self.recorder = _Recorder(checkpoint, {item.path: item for item in pending}, config.output_dir)
        self.progress = Progress(total=len(pending), stream=stream, interval=config.progress_interval)
        self.output_failures: list[ItemResult] = []
        self.last_export = self.last_log_line = time.monotonic()
        self.in_flight = WorkerFiles(config.output_dir, log)
        self.stop_request: StopRequest | None = None
        self.previews: PreviewMaker | None = None

    def run(self) -> tuple[str | None, str | None, int]:
        """(stop reason, message, images processed)."""
        if not self.pending:
            return None, None, 0
        with StopRequest() as self.stop_request, PreviewMaker.for_run(self.config) as self.previews:
            try:
                outcome = self._run_pool()
            finally:
                self._settle()
        if self.output_failures:
            first = self.output_failures[0]
            raise OutputError(f"cannot write results to {self.config.output_dir}: {first.error_message}")
        if outcome.stopped:
            self.log.warning(f"run stopped early ({outcome.stopped}): {outcome.message or ''}".strip())
        return outcome.stopped, outcome.message, self.progress.done

    def _run_pool(self) -> PoolOutcome:
        spec = EngineSpec(config=self.config, factory=self.factory)
        given = contextlib.nullcontext(self.launcher) if self.launcher else None
        with given or _launcher(self.config) as launcher:
            return run_pool(
                spec,
                self.pending,
                PoolSettings.from_config(self.config),
                on_result=self.on_result,
                should_stop=self.should_stop,
                on_event=self.on_event,
                launcher=launcher,
            )

    def _settle(self) -> None:
        """Whatever ended the pool (even Ctrl-C twice), results already received are kept."""
        self.recorder.flush()
        # Left running, they would be pending again at the next start anyway (plan): a failure
        # here must not hide the one that ended the pool.
        with contextlib.suppress(BatchsegError):
            self.checkpoint.release_running()
        self.progress.close()

    # -- the pool's callbacks ------------------------------------------------------------------------

    def on_result(self, result: ItemResult) -> None:
        if result.category is FailureCategory.OUTPUT:
            # The output folder failed, not the image (the pool never retries it): left pending,
            # so a rerun does it.
            self.output_failures.append(result)
            return
        self.recorder.add(result)
        if self.previews is not None:
            self.previews.submit(result)  # made on the maker's threads, off the pool's loop
        self.progress.update(result)
        if result.status is not Status.OK:
            self.log.failure(result.path, str(result.status), _reason(result))
        self._export_if_due()

    def on_event(self, event: PoolEvent) -> None:
        self.in_flight.see(event)
        if event.kind == EventKind.TASK_STARTED:
            self.checkpoint.mark_started(event.paths)  # `batchseg status` shows what is in flight
        if event.kind in QUIET_EVENTS:
            return
        text = f"{event.kind}: {event.message}"
        if event.kind in WARNING_EVENTS:
            self.log.warning(text)
        else:
            self.log.info(text)

    def should_stop(self) -> str | None:
        self.recorder.flush()
        self._progress_line()
        return self._stop_reason()

    # -- steps ---------------------------------------------------------------------------------------

    def _export_if_due(self) -> None:
        if time.monotonic() - self.last_export > self.config.manifest_interval:
            self.recorder.flush()
            export(self.checkpoint, self.config.output_dir, self.log, final=False)
            self.last_export = time.monotonic()

    def _progress_line(self) -> None:
        self.progress.tick()  # images can take minutes: keep the plain progress lines coming
        if time.monotonic() - self.last_log_line >= self.config.progress_interval:
            self.log.progress(self.progress.line())
            self.last_log_line = time.monotonic()

    def _stop_reason(self) -> str | None:
        if self.output_failures:
            return "output_error"
        if self.stop_request is not None and self.stop_request.reason:
            return self.stop_request.reason
        if self.stop_after is not None and time.time() >= self.stop_after:
            return "deadline"
        return None


class _Recorder:
    """Makes final results durable in the checkpoint, in small groups bounded in time.

    One commit (one fsync) per result costs tens of milliseconds on slow disks and would cap a GPU
    run. The pool hands over every result its loop received (a whole batch at once) before it
    asks ``should_stop``, where they are committed together: a result waits at most one turn of
    the pool's loop (well under ``COMMIT_WINDOW_S``), or until ``COMMIT_GROUP`` are waiting. A result
    waiting for its commit is not done yet: if the process dies then, the image is simply
    processed again on resume.
    """

    def __init__(self, checkpoint: Checkpoint, by_path: dict[str, Item], output_dir: Path) -> None:
        self.checkpoint = checkpoint
        self.by_path = by_path
        self.output_dir = output_dir
        self.waiting: list[tuple[ItemResult, Item]] = []

    def add(self, result: ItemResult) -> None:
        self.waiting.append((result, self.by_path[result.path]))
        if len(self.waiting) >= COMMIT_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        pairs, self.waiting = self.waiting, []
        try:
            self.checkpoint.record_many(pairs)
        except OSError as exc:
            raise _output_error(self.output_dir, exc) from exc
        except ValueError:  # a malformed result (engine bug): find it; that image fails, not the run
            for result, item in pairs:
                self._record_one(result, item)

    def _record_one(self, result: ItemResult, item: Item) -> None:
        try:
            self.checkpoint.record(result, item)
        except ValueError as exc:
            broken = failure_result(
                item,
                Status.ERROR,
                error_type="InvalidResult",
                message=str(exc),
                device=result.device,
                started_at=result.started_at,
                finished_at=result.finished_at,
            )
            broken.attempts, broken.worker_pid = result.attempts, result.worker_pid
            self.checkpoint.record(broken, item)


def _launcher(config: RunConfig) -> contextlib.AbstractContextManager[Launcher | None]:
    """Where the workers run: processes here (None: the pool's default) or Ray actors."""
    if config.backend != "ray":
        return contextlib.nullcontext(None)
    from .supervise.ray_backend import RayLauncher

    return RayLauncher(config.ray_address, config.output_dir, config.input)


def _reason(result: ItemResult) -> str:
    parts = [p for p in (result.error_type, result.error_message) if p]
    if result.exit_code is not None:
        parts.append(f"exit code {result.exit_code}")
    return ": ".join(parts) if parts else str(result.status)


def _output_error(output_dir: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"the disk holding {output_dir} is full; free space and run again to resume")
    return OutputError(f"cannot write the checkpoint in {output_dir}: {exc}")
