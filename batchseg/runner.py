"""The library entry points behind the CLI: ``run`` a folder, ``retry`` failed images, ``demo``.

Data flow: RunConfig -> preflight (every check; nothing written) -> lock -> store.rebuild.open_run
-> discover(input) -> checkpoint.plan(items)
-> pool_pass.PoolPass (the pool, results durable before an image counts as done, manifest exports)
-> final export -> RunSummary with the exit code.

The parent never imports torch: SAM3 lives in the worker processes only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .config import RunConfig
from .discover import Discovery, discover
from .engine_names import engine_target
from .errors import BatchsegError, ConfigError, ExitCode, OutputError, StoppedEarly
from .exemplars import unplaced_lines
from .geo.detect import check_geo_extra
from .lock import RunLock
from .logs import RunLog
from .pool_pass import PoolPass
from .preflight import FreshFolder, preflight, stored_run
from .records import FINAL_FAILURES, Item, ItemResult, Status, failure_result
from .remote import discover_objects, is_remote, remove_orphans, stat_item
from .report import report_after_run
from .store.checkpoint import Checkpoint
from .store.folder import check_output_writable, remove_stale_temp_files
from .store.manifest import export_manifest
from .store.rebuild import open_run
from .store.tables import MANIFEST_DIR
from .supervise.early import early_start
from .supervise.launch import Launcher
from .supervise.settings import PoolSettings
from .upkeep import export, warn_empty_input
from .worker.contract import EngineSpec

__all__ = ["RunSummary", "run", "retry", "exit_code_for"]


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is an ``errors.ExitCode`` (0 ok, 3 some not ok, 4 stopped early)."""

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
    """Absolute paths: workers and logs must not depend on the working folder; the engine as
    ``MODULE:FUNCTION``, the form the fingerprint holds. (Threads are the pool's to share out: only
    it knows how many workers there are.)"""
    model = config.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return config.with_changes(
        input=config.input if is_remote(config.input) else Path(config.input).expanduser().resolve(),
        output=Path(config.output_dir).expanduser().resolve(),
        model=model,
        engine=engine_target(config.engine),
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
    ``factory`` overrides ``config.engine`` for this run only (it is not stored). Every check of
    the configuration comes first (``preflight``): a run refused for it writes nothing.
    """
    config = resolve_config(config)
    factory = engine_target(factory) if factory else config.engine
    checked = preflight(config, factory)
    config = checked.config
    output_dir = config.output_dir
    with FreshFolder(output_dir) as fresh:
        check_output_writable(output_dir)
        with RunLock(output_dir), RunLog(output_dir / "logs", keep=config.log_keep) as log:
            for note in checked.notes:
                log.info(note)
            try:
                return _run_locked(config, factory, retry_statuses, log, stream, fresh)
            except BatchsegError as exc:
                log.warning(f"run ended: {type(exc).__name__}: {exc}")
                raise


def _run_locked(
    config: RunConfig,
    factory: str,
    retry_statuses: Sequence[Status] | None,
    log: RunLog,
    stream: TextIO | None,
    fresh: FreshFolder,
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
    checkpoint = open_run(output_dir, config, new_run=config.new_run)
    try:
        # The first worker loads its model while the folder is walked and planned (EarlyStart).
        with _first_worker(config, factory) as launcher:
            found, pending = _plan(config, checkpoint, retry_statuses, log, stream)
            work = PoolPass(config, factory, checkpoint, pending, log, stream, _stop_time(config), launcher)
            try:
                stopped, message, processed = work.run()
            except KeyboardInterrupt:
                _export_on_the_way_out(checkpoint, output_dir, log, stream)
                raise
            except ConfigError:  # a worker's load refused the configuration
                if work.progress.done:
                    fresh.work_done()
                raise
        fresh.work_done()
        if is_remote(config.input):
            remove_orphans()  # the workers' downloads of S3 objects: the workers are gone
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


def _first_worker(config: RunConfig, factory: str) -> contextlib.AbstractContextManager[Launcher | None]:
    """This machine's first worker, started now (``EarlyStart``); Ray places its own (None)."""
    if config.backend == "ray":
        return contextlib.nullcontext(None)
    return early_start(EngineSpec(config=config, factory=factory), PoolSettings.from_config(config))


def _plan(
    config: RunConfig,
    checkpoint: Checkpoint,
    retry_statuses: Sequence[Status] | None,
    log: RunLog,
    stream: TextIO | None,
) -> tuple[Discovery, list[Item]]:
    """Discover the input, record what is decided without a worker (collisions, skipped images),
    and return what is left to process. The discovered items are let go: only the pending stay."""
    found = (discover_objects if is_remote(config.input) else discover)(  # a folder or an S3 prefix
        config.input,
        config.include,
        config.exclude,
        with_hash=config.hash,
        skip=[config.output_dir],
        keep=checkpoint.settled_paths(),
    )
    if retry_statuses:
        checkpoint.reset_for_retry([i.path for i in checkpoint.failed_items(list(retry_statuses))])
    # An object in S3 is known by its ETag (Item.content_hash) and size, as a file with --hash.
    plan = checkpoint.plan(found.items, use_hash=config.hash or is_remote(config.input))
    check_geo_extra(config, (item.path for item in plan.pending))  # before any image is sent
    log.info(f"found {len(found.items)} images in {config.input}; {len(plan.pending)} to process")
    for line in unplaced_lines(config, (item.path for item in found.items)):
        log.warning(line)  # exemplar boxes that fall in no image: said, never dropped silently
        if stream is not None:
            stream.write(f"{line}\n")
    if plan.counts["orphan_masks"]:
        log.info(f"removed {plan.counts['orphan_masks']} mask file(s) whose result was never recorded")
    if not found.items and not found.excluded and not found.collisions:
        warn_empty_input(config.input, checkpoint, log, stream)
    found.items = []  # a million Items are let go: the plan holds those left to do
    for path, kept in found.collisions.items():
        _record_collision(checkpoint, config, path, kept, log)
    _record_skipped(checkpoint, config.input, found.excluded)
    return found, plan.pending


def _export_on_the_way_out(
    checkpoint: Checkpoint, output_dir: Path, log: RunLog, stream: TextIO | None
) -> None:
    """Stopped at once (a second Ctrl-C): the workers are gone, but what the checkpoint holds is
    exported, so the folder shows the images recorded so far (the polygons of --vectors wait for
    the next run: they read every image). Another Ctrl-C here, or a failure, is said, not hidden."""
    folder = output_dir / MANIFEST_DIR
    try:
        export_manifest(checkpoint, output_dir, polygons=False)
        text = f"stopped at once: {folder} holds the images recorded so far"
    except (BatchsegError, OSError, KeyboardInterrupt) as exc:
        why = "interrupted again" if isinstance(exc, KeyboardInterrupt) else str(exc)
        text = (
            f"stopped at once: the manifest in {folder} was not exported ({why}); the checkpoint "
            "holds every result recorded, and the next run exports it"
        )
    log.warning(text)
    if stream is not None:
        stream.write(f"{text}\n")


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
    if is_remote(root):
        return stat_item(root, rel)
    st = (root / rel).stat()
    return Item(path=rel, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)


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
    found = stored_run(output_dir)
    if found is None:
        raise OutputError(f"{output_dir} holds no batchseg run (no checkpoint, no manifest)")
    return found.config


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
