"""``batchseg status OUTPUT``: where a run stands, from its checkpoint or, without one, its manifest.

Reads only: a read-only SQLite connection (safe beside a live run) or the Parquet files. How many
images are left is only known to a run that walked the input folder: the report gives what the
output folder knows (``pending`` rows a run discovered but did not finish, ``running`` ones, and the
images that are not ok).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import OutputError
from .lock import LockInfo, is_locked
from .records import FAILURE_VALUES, Status
from .store.db import RunInfo
from .store.manifest import read_manifest_run
from .store.summary import StoreSummary, summarize, summarize_manifest
from .store.tables import ALL_STATES, CHECKPOINT_NAME, PENDING, RUNNING

__all__ = ["ErrorGroup", "StatusReport", "collect_status", "format_status"]

#: Throughput is measured over the images finished in this last stretch of activity.
RATE_WINDOW_S = 300.0
TOP_ERRORS = 5


@dataclass
class ErrorGroup:
    """Images that failed the same way, with one example."""

    status: str
    error_type: str | None
    count: int
    example_path: str
    example_message: str | None


@dataclass
class StatusReport:
    """What ``batchseg status`` shows; ``to_json()`` for scripts."""

    output_dir: str
    source: str  # "checkpoint" or "manifest"
    run_id: str
    model_id: str
    prompts: list[str]
    config_hash: str
    created_at: float
    updated_at: float  # last checkpoint write or manifest export
    counts: dict[str, int]
    total: int
    not_ok: int  # error, timeout, crashed, invalid_input: what `batchseg retry` reruns
    in_flight: int  # `running` rows: live workers, or a crash (the next run redoes them)
    pending: int  # discovered by a run that stopped before trying them
    images_per_s: float | None  # over the last RATE_WINDOW_S seconds of activity
    duration_p50_s: float | None  # per ok image
    duration_p95_s: float | None
    last_finished_at: float | None
    top_errors: list[ErrorGroup] = field(default_factory=list)
    live: LockInfo | None = None  # the process holding the folder, if any
    note: str | None = None  # why the checkpoint could not be read, when the manifest stood in

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def collect_status(output_dir: Path) -> StatusReport:
    """Status of the run in ``output_dir``; OutputError when it holds neither checkpoint nor manifest."""
    output_dir = Path(output_dir)
    live = is_locked(output_dir)
    problem: OutputError | None = None
    if (output_dir / CHECKPOINT_NAME).is_file():
        try:
            report = _from_checkpoint(output_dir)
            report.live = live
            return report
        except OutputError as exc:  # damaged, or holds no run: the manifest may still tell
            problem = exc
    run = read_manifest_run(output_dir)
    if run is None:
        if live is not None:
            return _starting(output_dir, live)  # a run holds the folder and has recorded nothing yet
        if problem is not None:
            raise problem
        raise OutputError(f"no batchseg run in {output_dir}: neither {CHECKPOINT_NAME} nor manifest/ found")
    report = _from_manifest(output_dir, run)
    report.live = live
    report.note = str(problem) if problem is not None else None
    return report


def _starting(output_dir: Path, live: LockInfo) -> StatusReport:
    return StatusReport(
        output_dir=str(output_dir),
        source="checkpoint",
        run_id="",
        model_id="",
        prompts=[],
        config_hash="",
        created_at=live.started_at,
        updated_at=live.started_at,
        counts=dict.fromkeys(ALL_STATES, 0),
        total=0,
        not_ok=0,
        in_flight=0,
        pending=0,
        images_per_s=None,
        duration_p50_s=None,
        duration_p95_s=None,
        last_finished_at=None,
        live=live,
        note="a run is starting: nothing recorded yet",
    )


# ---- from the store's summary ----------------------------------------------------------------------


def _from_checkpoint(output_dir: Path) -> StatusReport:
    return _from_summary(output_dir, "checkpoint", summarize(output_dir, RATE_WINDOW_S, TOP_ERRORS))


def _from_manifest(output_dir: Path, run: RunInfo) -> StatusReport:
    summary = summarize_manifest(output_dir, run, RATE_WINDOW_S, TOP_ERRORS)
    return _from_summary(output_dir, "manifest", summary)


def _from_summary(output_dir: Path, source: str, summary: StoreSummary) -> StatusReport:
    n, first_start = summary.recent
    rate = _rate(n, first_start, summary.last_finished) if summary.last_finished is not None else None
    errors = [
        ErrorGroup(g.status, g.error_type, g.count, g.paths[0], g.example_message) for g in summary.errors
    ]
    return _report(
        output_dir,
        source,
        summary.run,
        summary.counts,
        summary.ok_durations,
        rate,
        summary.last_finished,
        errors,
        summary.updated_at,
    )


# ---- shared ---------------------------------------------------------------------------------------


def _rate(n: int, first_start: float | None, last: float) -> float | None:
    if not n or first_start is None or last <= first_start:
        return None
    return float(n / (last - first_start))


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: a duration that some image really took."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _report(
    output_dir: Path,
    source: str,
    run: RunInfo,
    raw_counts: dict[str, int],
    durations: list[float],
    rate: float | None,
    last: float | None,
    errors: list[ErrorGroup],
    updated: float,
) -> StatusReport:
    counts = dict.fromkeys(ALL_STATES, 0)
    counts.update(raw_counts)
    durations.sort()
    return StatusReport(
        output_dir=str(output_dir),
        source=source,
        run_id=run.run_id,
        model_id=run.model_id,
        prompts=list(run.config.get("prompts", [])),
        config_hash=run.config_hash,
        created_at=run.created_at,
        updated_at=updated,
        counts=counts,
        total=sum(counts.values()),
        not_ok=sum(counts[s] for s in FAILURE_VALUES),
        in_flight=counts[RUNNING],
        pending=counts[PENDING],
        images_per_s=rate,
        duration_p50_s=_percentile(durations, 50),
        duration_p95_s=_percentile(durations, 95),
        last_finished_at=last,
        top_errors=errors,
    )


def _when(epoch: float | None) -> str:
    return "-" if not epoch else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_status(report: StatusReport) -> str:
    """The human-readable report, a few lines."""
    live = f"running now: batchseg {report.live.describe()}" if report.live else "no run is active"
    shown = [s for s in ALL_STATES if report.counts.get(s) or s in (Status.OK.value, PENDING)]
    lines = [
        f"{report.output_dir}: run {report.run_id} ({live})",
        f"model {report.model_id}; prompts: {', '.join(report.prompts) or '-'}",
        f"images: {report.total:,} - " + ", ".join(f"{s} {report.counts[s]:,}" for s in shown),
    ]
    speed = f"{report.images_per_s:.2f} images/s" if report.images_per_s else "no images finished"
    if report.duration_p50_s is not None and report.duration_p95_s is not None:
        speed += f"; per ok image p50 {report.duration_p50_s:.2f} s, p95 {report.duration_p95_s:.2f} s"
    lines.append(f"speed: {speed} (last finished {_when(report.last_finished_at)})")
    if report.in_flight and not report.live:
        lines.append(f"{report.in_flight:,} images were in flight when the run stopped (redone next run)")
    if report.not_ok:
        lines.append(f"not ok: {report.not_ok:,}; rerun them with: batchseg retry {report.output_dir}")
        for g in report.top_errors:
            kind = f"{g.status} {g.error_type}" if g.error_type else g.status
            message = f": {_shorten(g.example_message)}" if g.example_message else ""
            lines.append(f"  {kind} x{g.count:,}, e.g. {g.example_path}{message}")
    lines.append(f"from the {report.source}, updated {_when(report.updated_at)}")
    if report.note:
        lines.append(f"note: {report.note}")
    return "\n".join(lines)


def _shorten(text: str, limit: int = 160) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."
