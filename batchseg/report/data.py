"""What the report shows, gathered from the manifest (pyarrow compute), the run's metadata and its log.

Every statistic is a column operation on images.parquet / detections.parquet: no per-image Python
loop and no per-file scan, so a 100,000-image run is summed up in about a second. Only the
gallery's few hundred candidates are checked on disk (does their preview exist).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import OutputError
from ..logs import LOG_NAME_RE
from ..prompting import classes_of
from ..records import ALL_STATES, Status
from ..store.manifest import manifest_paths, read_manifest_run
from ..store.summary import FailureGroup, summarize_manifest
from .previews import PREVIEW_STATUSES, preview_relpath

__all__ = ["FailureGroup", "GalleryItem", "LogSession", "PromptStats", "ReportData", "collect_report"]

SCORE_BINS = 20
PATHS_PER_FAILURE_GROUP = 20
FAILURE_GROUPS = 30
GALLERY_TOP = 48
GALLERY_SAMPLE = 96
GALLERY_FAILURES = 200
#: Buckets of detections per image: (label, low, high) inclusive.
COUNT_BUCKETS = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2-5", 2, 5),
    ("6-10", 6, 10),
    ("11-20", 11, 20),
    ("21-50", 21, 50),
    ("51-100", 51, 100),
    (">100", 101, 2**31),
)
_STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?[+-]\d\d:\d\d)"
_SUMMARY_RE = re.compile(_STAMP + r" INFO +summary .*; ([0-9hms]+) elapsed; exit code (\d+)$")
_START_RE = re.compile(_STAMP + r" INFO +batchseg \S+ run started")
_READY_RE = re.compile(r" worker_ready: \S+ ready on (.+)$")


@dataclass
class LogSession:
    """The latest session of the run, from its log file."""

    log_path: str  # relative to the output folder
    started: float | None = None
    ended: float | None = None
    step: float = 1.0  # the stamps' resolution: whole seconds in older logs, else milliseconds
    elapsed: str | None = None
    exit_code: int | None = None
    devices: list[str] = field(default_factory=list)


@dataclass
class PromptStats:
    prompt: str
    detections: int
    images: int
    mean_score: float | None
    score_hist: list[int]


@dataclass
class GalleryItem:
    path: str
    preview: str  # relative to the output folder
    status: str
    n_detections: int | None
    caption: str


@dataclass
class ReportData:
    output_dir: Path
    run_id: str
    model_id: str
    version: str
    config: dict[str, Any]
    created_at: float
    counts: dict[str, int]
    total: int
    detections: int
    images_per_s: float | None
    first_started: float | None
    last_finished: float | None
    devices: list[str]
    failures: list[FailureGroup]
    failure_total: int
    prompts: list[PromptStats]
    classes: list[tuple[str, int, int]]  # (class, detections, images with one), where --class was given
    count_hist: list[tuple[str, int]]
    gallery: dict[str, list[GalleryItem]]
    session: LogSession | None
    logs: list[str]


def collect_report(output_dir: Path) -> ReportData:
    """Gather the report's content; OutputError when ``output_dir`` holds no readable manifest."""
    output_dir = Path(output_dir)
    images_path, detections_path = manifest_paths(output_dir)
    run = read_manifest_run(output_dir)
    if run is None:
        raise OutputError(f"no readable batchseg manifest at {images_path}: run batchseg first")
    columns = ["path", "status", "error_type", "error_message", "n_detections", "started_at", "finished_at"]
    try:
        images = pq.read_table(images_path, columns=columns + ["device"])
        dets = (
            pq.read_table(detections_path, columns=["path", "prompt", "score"])
            if detections_path.is_file()
            else pa.table(
                {
                    "path": pa.array([], pa.string()),
                    "prompt": pa.array([], pa.string()),
                    "score": pa.array([], pa.float64()),
                }
            )
        )
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read the manifest in {images_path.parent}: {exc}") from exc
    # Counts and failure groups: the store's one summary, as ``batchseg status`` shows them.
    summary = summarize_manifest(output_dir, run, 0.0, FAILURE_GROUPS, PATHS_PER_FAILURE_GROUP)
    counts = dict.fromkeys(ALL_STATES, 0)
    counts.update(summary.counts)
    session = read_session(output_dir)
    started, finished = _epoch(images["started_at"]), _epoch(images["finished_at"])
    devices = sorted(d for d in pc.unique(images["device"]).to_pylist() if d)
    prompts = list(run.config.get("prompts", []))
    return ReportData(
        output_dir=output_dir,
        run_id=run.run_id,
        model_id=run.model_id,
        version=run.batchseg_version,
        config=run.config,
        created_at=run.created_at,
        counts=counts,
        total=images.num_rows,
        detections=dets.num_rows,
        images_per_s=_rate(started, finished, session),
        first_started=_min(started),
        last_finished=_max(finished),
        devices=devices or (session.devices if session else []),
        failures=summary.errors,
        failure_total=summary.failed,
        prompts=_prompt_stats(dets, prompts),
        classes=_class_counts(dets, classes_of(run.config)),
        count_hist=_count_hist(images),
        gallery=_gallery(output_dir, images),
        session=session,
        logs=_logs(output_dir),
    )


def _epoch(column: pa.ChunkedArray) -> np.ndarray:
    """Epoch seconds as float64, NaN where missing."""
    micros: np.ndarray = column.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return micros / 1e6


def _min(values: np.ndarray) -> float | None:
    return float(np.nanmin(values)) if values.size and not np.isnan(values).all() else None


def _max(values: np.ndarray) -> float | None:
    return float(np.nanmax(values)) if values.size and not np.isnan(values).all() else None


def _rate(started: np.ndarray, finished: np.ndarray, session: LogSession | None) -> float | None:
    """Images finished per second of wall time: in the latest session when its log tells its span,
    else from the first start to the last finish in the manifest."""
    if session is not None and session.started is not None and session.ended is not None:
        span = session.ended - session.started
        # Log stamps are cut down to their resolution (milliseconds; whole seconds in older logs):
        # the session's images finished at or after its start stamp and before its end stamp plus
        # one step. Anything before the start belongs to the session before (a retry right after a
        # run counted that run's last images as its own).
        done = np.count_nonzero((finished >= session.started) & (finished < session.ended + session.step))
        return done / span if span > 0 and done else None
    first, last = _min(started), _max(finished)
    if first is None or last is None or last <= first:
        return None
    return float(np.count_nonzero(~np.isnan(finished)) / (last - first))


def _class_counts(dets: pa.Table, classes: dict[str, str]) -> list[tuple[str, int, int]]:
    """Detections and images with one per class (``--class``; a prompt without one is its own
    class), largest first; empty where no class was given."""
    if not classes:
        return []
    detections: dict[str, int] = {}
    images: dict[str, set[str]] = {}
    for path, prompt in zip(dets["path"].to_pylist(), dets["prompt"].to_pylist(), strict=True):
        name = classes.get(prompt, prompt)
        detections[name] = detections.get(name, 0) + 1
        images.setdefault(name, set()).add(path)
    for name in classes.values():
        detections.setdefault(name, 0)
    ordered = sorted(detections.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(name, count, len(images.get(name, ()))) for name, count in ordered]


def _prompt_stats(dets: pa.Table, run_prompts: list[str]) -> list[PromptStats]:
    if dets.num_rows:
        grouped = dets.group_by("prompt").aggregate(
            [("score", "count"), ("score", "mean"), ("path", "count_distinct")]
        )
        by_prompt = {r["prompt"]: r for r in grouped.to_pylist()}
    else:
        by_prompt = {}
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    out = []
    for prompt in run_prompts + sorted(set(by_prompt) - set(run_prompts)):
        row = by_prompt.get(prompt)
        if row is None:
            out.append(PromptStats(prompt, 0, 0, None, [0] * SCORE_BINS))
            continue
        scores = dets.filter(pc.equal(dets["prompt"], prompt))["score"].to_numpy()
        hist, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=edges)
        out.append(
            PromptStats(
                prompt, row["score_count"], row["path_count_distinct"], row["score_mean"], hist.tolist()
            )
        )
    return out


def _count_hist(images: pa.Table) -> list[tuple[str, int]]:
    ok = images.filter(pc.equal(images["status"], Status.OK.value))
    n = pc.fill_null(ok["n_detections"], 0).to_numpy(zero_copy_only=False)
    return [(label, int(np.count_nonzero((n >= lo) & (n <= hi)))) for label, lo, hi in COUNT_BUCKETS]


def _gallery(output_dir: Path, images: pa.Table) -> dict[str, list[GalleryItem]]:
    """Up to a few hundred images whose preview exists: most detections, failures, a sample."""
    ok = images.filter(pc.equal(images["status"], Status.OK.value))
    top = pc.select_k_unstable(
        ok, k=min(GALLERY_TOP, ok.num_rows), sort_keys=[("n_detections", "descending"), ("path", "ascending")]
    )
    most = ok.take(top)
    failed = images.filter(pc.is_in(images["status"], pa.array(PREVIEW_STATUSES[1:])))
    failed = failed.take(pc.sort_indices(failed["path"])[:GALLERY_FAILURES])
    picks = np.random.default_rng(0).choice(ok.num_rows, size=min(GALLERY_SAMPLE, ok.num_rows), replace=False)
    sample = ok.take(pa.array(np.sort(picks), pa.int64()))
    return {
        "most": _items(output_dir, most),
        "failures": _items(output_dir, failed),
        "sample": _items(output_dir, sample),
    }


def _items(output_dir: Path, rows: pa.Table) -> list[GalleryItem]:
    items = []
    for row in rows.select(["path", "status", "n_detections", "error_type"]).to_pylist():
        preview = preview_relpath(row["path"])
        if not (output_dir / preview).is_file():
            continue
        if row["status"] == Status.OK.value:
            caption = f"{row['n_detections'] or 0} detections"
        else:
            caption = f"{row['status']}: {row['error_type'] or ''}".strip(": ")
        items.append(GalleryItem(row["path"], preview, row["status"], row["n_detections"], caption))
    return items


def _logs(output_dir: Path) -> list[str]:
    """Run logs, newest first, relative to the output folder."""
    folder = output_dir / "logs"
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = LOG_NAME_RE.match(entry.name)
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), f"logs/{entry.name}"))
    return [rel for _, rel in sorted(found, reverse=True)]


def read_session(output_dir: Path) -> LogSession | None:
    """Start, end, exit code and devices of the latest session, from its log (None without one)."""
    logs = _logs(output_dir)
    if not logs:
        return None
    session = LogSession(log_path=logs[0])
    try:
        text = (output_dir / logs[0]).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return session
    for line in text.splitlines():
        if session.started is None and (m := _START_RE.match(line)):
            session.started = _parse_stamp(m.group(1))
            session.step = 1.0 if "." not in m.group(1) else 0.001
        elif m := _SUMMARY_RE.match(line):
            session.ended = _parse_stamp(m.group(1))
            session.elapsed, session.exit_code = m.group(2), int(m.group(3))
        elif (m := _READY_RE.search(line)) and m.group(1) not in session.devices:
            session.devices.append(m.group(1))
    return session


def _parse_stamp(text: str) -> float:
    return _dt.datetime.fromisoformat(text).timestamp()
