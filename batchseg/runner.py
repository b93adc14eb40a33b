"""The library entry points behind the CLI: ``run`` a folder, ``retry`` failed images, ``demo``.

Data flow: RunConfig -> lock -> checkpoint.open -> discover(input) -> checkpoint.plan(items)
-> run_pool (workers, watchdog) -> checkpoint.record_many(results) (durable before an image counts
as done) -> manifest export (every --manifest-interval and at the end) -> RunSummary with the exit
code.

The parent never imports torch: SAM3 lives in the worker processes only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .config import RunConfig
from .discover import _check_root, discover
from .errors import BatchsegError, ExitCode, OutputError, StoppedEarly
from .lock import RunLock
from .logs import RunLog
from .progress import Progress
from .records import FINAL_FAILURES, FailureCategory, Item, ItemResult, Status, failure_result
from .report import PreviewMaker, report_after_run
from .signals import StopRequest
from .sources import check_geo_extra
from .store.checkpoint import Checkpoint
from .store.folder import check_output_writable, remove_stale_temp_files
from .store.manifest import read_manifest_run
from .store.rebuild import open_run
from .supervise.contract import EngineSpec
from .supervise.pool import PoolEvent, PoolSettings, run_pool
from .upkeep import WorkerFiles, export, warn_empty_input

__all__ = ["RunSummary", "run", "retry", "exit_code_for"]

#: Longest a received result waits for its commit (one turn of the pool's loop, see _Recorder)...
COMMIT_WINDOW_S = 0.5
#: ...or until this many are waiting.
COMMIT_GROUP = 64
#: Pool events too frequent to log one line each (a recycled worker every N images is routine).
QUIET_EVENTS = {"worker_started", "task_started"}


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` follows design.md (0 ok, 3 some not ok, 4 stopped early)."""

    output_dir: Path
    counts: dict[str, int]
    processed: int
    elapsed_s: float
    stopped: str | None = None
    message: str | None = None
    log_path: Path | None = None
    collisions: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.counts, self.stopped)


def exit_code_for(counts: dict[str, int], stopped: str | None) -> int:
    if stopped:
        return StoppedEarly.exit_code
    failed = sum(counts.get(str(s), 0) for s in FINAL_FAILURES)
    return ExitCode.NOT_ALL_OK if failed else ExitCode.OK


def resolve_config(config: RunConfig) -> RunConfig:
    """Absolute paths: workers and logs must not depend on the working folder. (Threads are the
    pool's to share out: only it knows how many workers there are.)"""
    model = config.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return config.with_changes(
        input=Path(config.input).expanduser().resolve(),
        output=Path(config.output_dir).expanduser().resolve(),
        model=model,
    )


def run(
    config: RunConfig,
    *,
    factory: str | None = None,
    retry_statuses: Sequence[Status] | None = None,
    stream: TextIO | None = None,
) -> RunSummary:
    """Process every pending image of ``config.input``; resumable at any point.

    ``retry_statuses``: rerun the images whose recorded status is one of these (``batchseg retry``).
    ``factory`` overrides ``config.engine`` for this run only (it is not stored).
    """
    config = resolve_config(config)
    factory = factory or config.engine
    output_dir = config.output_dir
    check_output_writable(output_dir)
    with RunLock(output_dir), RunLog(output_dir / "logs", keep=config.log_keep) as log:
        try:
            return _run_locked(config, factory, retry_statuses, log, stream)
        except BatchsegError as exc:
            log.warning(f"run ended: {type(exc).__name__}: {exc}")
            raise


def _run_locked(
    config: RunConfig,
    factory: str,
    retry_statuses: Sequence[Status] | None,
    log: RunLog,
    stream: TextIO | None,
) -> RunSummary:
    started = time.monotonic()
    output_dir = config.output_dir
    log.start(
        config.to_dict(),
        {"batchseg": __version__, "pid": os.getpid(), "devices": "reported by each worker when it is ready"},
    )
    removed = remove_stale_temp_files(output_dir)
    if removed:
        log.info(f"removed {removed} unfinished temp file(s) left by an interrupted run")
    _check_root(config.input)  # before the checkpoint stores a run for a folder that is not there
    checkpoint = open_run(output_dir, config, new_run=config.new_run)
    try:
        found = discover(
            config.input,
            config.include,
            config.exclude,
            with_hash=config.hash,
            skip=[output_dir],
            keep=checkpoint.settled_paths(),
        )
        if retry_statuses:
            checkpoint.reset_for_retry([i.path for i in checkpoint.failed_items(list(retry_statuses))])
        plan = checkpoint.plan(found.items, use_hash=config.hash)
        check_geo_extra(config, (item.path for item in plan.pending))  # before any worker starts
        log.info(f"found {len(found.items)} images in {config.input}; {len(plan.pending)} to process")
        if plan.counts["orphan_masks"]:
            log.info(f"removed {plan.counts['orphan_masks']} mask file(s) whose result was never recorded")
        if not found.items and not found.excluded and not found.collisions:
            warn_empty_input(config.input, checkpoint, log, stream)
        for path, kept in found.collisions.items():
            _record_collision(checkpoint, config, path, kept, log)
        _record_skipped(checkpoint, config.input, found.excluded)
        stopped, message, processed = _process(config, factory, checkpoint, plan.pending, log, stream)
        export(checkpoint, output_dir, log, final=True, stream=stream)
        counts = checkpoint.counts()
    finally:
        checkpoint.close()
    summary = RunSummary(
        output_dir=output_dir,
        counts=counts,
        processed=processed,
        elapsed_s=time.monotonic() - started,
        stopped=stopped,
        message=message,
        log_path=log.path,
        collisions=dict(found.collisions),
    )
    log.summary(counts, summary.elapsed_s, summary.exit_code)
    report_after_run(config, log, retried=retry_statuses is not None, stopped=summary.stopped)
    return summary


def _record_collision(checkpoint: Checkpoint, config: RunConfig, path: str, kept: str, log: RunLog) -> None:
    item = _stat_item(config.input, path)
    message = f"its output name clashes with '{kept}' on a case-insensitive disk; rename one of them"
    result = failure_result(item, Status.INVALID_INPUT, error_type="NameCollision", message=message)
    result.worker_pid = None  # decided here, in no worker
    checkpoint.record(result, item)
    log.failure(path, str(Status.INVALID_INPUT), message)


def _record_skipped(checkpoint: Checkpoint, root: Path, paths: Sequence[str]) -> None:
    """Images left out by --include/--exclude get a ``skipped`` row, so the manifest lists every image
    of the folder; one transaction for all of them."""
    now = time.time()
    pairs = [
        (
            ItemResult(path=p, status=Status.SKIPPED, attempts=0, started_at=now, finished_at=now),
            _stat_item(root, p),
        )
        for p in paths
    ]
    if pairs:
        checkpoint.record_many(pairs)


def _stat_item(root: Path, rel: str) -> Item:
    st = (root / rel).stat()
    return Item(path=rel, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)


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


def _process(
    config: RunConfig,
    factory: str,
    checkpoint: Checkpoint,
    pending: list[Item],
    log: RunLog,
    stream: TextIO | None,
) -> tuple[str | None, str | None, int]:
    """Run the pool over ``pending``; returns (stop reason, message, images processed)."""
    if not pending:
        return None, None, 0
    recorder = _Recorder(checkpoint, {item.path: item for item in pending}, config.output_dir)
    progress = Progress(total=len(pending), stream=stream, interval=config.progress_interval)
    stop_after = _stop_time(config)
    output_failure: list[ItemResult] = []
    last_export = time.monotonic()
    last_log_line = time.monotonic()
    in_flight = WorkerFiles(config.output_dir, log)

    def on_result(result: ItemResult) -> None:
        nonlocal last_export
        if result.category is FailureCategory.OUTPUT:
            # The output folder failed, not the image (the pool never retries it): left
            # pending, so a rerun does it.
            output_failure.append(result)
            return
        recorder.add(result)
        previews.submit(result)  # made on the maker's threads, off the pool's loop
        progress.update(result)
        if result.status is not Status.OK:
            log.failure(result.path, str(result.status), _reason(result))
        if time.monotonic() - last_export > config.manifest_interval:
            recorder.flush()
            export(checkpoint, config.output_dir, log, final=False)
            last_export = time.monotonic()

    def on_event(event: PoolEvent) -> None:
        in_flight.see(event)
        if event.kind == "task_started":
            checkpoint.mark_started(event.paths)  # `batchseg status` shows what is in flight
        if event.kind in QUIET_EVENTS:
            return
        text = f"{event.kind}: {event.message}"
        if event.kind in ("attempt_failed", "worker_timeout", "worker_lost", "load_failed", "worker_warning"):
            log.warning(text)
        else:
            log.info(text)

    with StopRequest() as stop_request, PreviewMaker.for_run(config) as previews:

        def should_stop() -> str | None:
            nonlocal last_log_line
            recorder.flush()
            progress.tick()  # images can take minutes: keep the plain progress lines coming
            if time.monotonic() - last_log_line >= config.progress_interval:
                log.progress(progress.line())
                last_log_line = time.monotonic()
            if output_failure:
                return "output_error"
            if stop_request.reason:
                return stop_request.reason
            if stop_after is not None and time.time() >= stop_after:
                return "deadline"
            return None

        spec = EngineSpec(config=config, factory=factory)
        try:
            outcome = run_pool(
                spec,
                pending,
                PoolSettings.from_config(config),
                on_result=on_result,
                should_stop=should_stop,
                on_event=on_event,
            )
        finally:
            # Whatever ended the pool (even Ctrl-C twice), results already received are kept.
            recorder.flush()
            # Left running, they would be pending again at the next start anyway (plan): a
            # failure here must not hide the one that ended the pool.
            with contextlib.suppress(BatchsegError):
                checkpoint.release_running()
            progress.close()
    if output_failure:
        first = output_failure[0]
        raise OutputError(f"cannot write results to {config.output_dir}: {first.error_message}")
    if outcome.stopped:
        log.warning(f"run stopped early ({outcome.stopped}): {outcome.message or ''}".strip())
    return outcome.stopped, outcome.message, progress.done


def _reason(result: ItemResult) -> str:
    parts = [p for p in (result.error_type, result.error_message) if p]
    if result.exit_code is not None:
        parts.append(f"exit code {result.exit_code}")
    return ": ".join(parts) if parts else str(result.status)


def _output_error(output_dir: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"the disk holding {output_dir} is full; free space and run again to resume")
    return OutputError(f"cannot write the checkpoint in {output_dir}: {exc}")


def _stop_time(config: RunConfig) -> float | None:
    """Epoch seconds after which no new image starts (--deadline, --max-runtime)."""
    candidates: list[float] = []
    now = time.time()
    if config.max_runtime is not None:
        candidates.append(now + config.max_runtime)
    if config.deadline:
        candidates.append(deadline_epoch(config.deadline, _dt.datetime.now()))
    return min(candidates) if candidates else None


def deadline_epoch(deadline: str, now: _dt.datetime) -> float:
    """Epoch seconds of the next ``HH:MM`` local time after ``now`` (a naive local datetime): a
    nightly job started at 22:00 with --deadline 06:00 stops the next morning; the same time as
    ``now`` means tomorrow's. Across a daylight-saving change it is still 06:00 on the clock."""
    hour, minute = (int(x) for x in deadline.split(":"))
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if at <= now:
        at += _dt.timedelta(days=1)
    return at.timestamp()


def _stored_config(output_dir: Path) -> dict[str, Any]:
    """The configuration of the run in ``output_dir``: from the checkpoint, else the manifest."""
    try:
        checkpoint = Checkpoint.open_existing(output_dir, read_only=True)
    except BatchsegError:
        run_info = read_manifest_run(output_dir)
        if run_info is None:
            raise OutputError(f"{output_dir} holds no batchseg run (no checkpoint, no manifest)") from None
        return run_info.config
    try:
        return checkpoint.stored_config()
    finally:
        checkpoint.close()


def retry(
    output_dir: Path,
    statuses: Sequence[Status] = FINAL_FAILURES,
    overrides: dict[str, Any] | None = None,
    *,
    factory: str | None = None,
    stream: TextIO | None = None,
) -> RunSummary:
    """Rerun the images of ``output_dir`` whose status is one of ``statuses``, with the stored
    configuration (operational options such as timeout and workers may be overridden)."""
    config = RunConfig.from_dict(_stored_config(output_dir))
    config = config.with_changes(output=output_dir, new_run=False, **(overrides or {}))
    return run(config, factory=factory, retry_statuses=statuses, stream=stream)
