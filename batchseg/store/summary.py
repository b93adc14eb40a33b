"""What ``batchseg status`` and the report need from a run: counts, ok durations, recent activity,
failure groups.

One computation, SQL on an ``images`` table: the checkpoint's, read in one snapshot beside a live
run, or, where there is no checkpoint, an in-memory copy of the manifest's rows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..errors import OutputError
from ..records import FAILURE_VALUES
from .db import RunInfo, connect_readonly, read_run_info
from .manifest import read_manifest_table
from .tables import CHECKPOINT_NAME

__all__ = ["FailureGroup", "StoreSummary", "summarize", "summarize_manifest"]

#: The columns the summary reads, in the order of the in-memory table's columns.
_COLUMNS = ("path", "status", "error_type", "error_message", "started_at", "finished_at", "duration_s")


@dataclass
class FailureGroup:
    """Images that failed the same way (status and error type): how many, the first ``paths`` by
    path (the first is the example, ``example_message`` its message), and the most common
    messages with their counts."""

    status: str
    error_type: str | None
    count: int
    paths: list[str]
    example_message: str | None
    messages: list[tuple[str, int]]


@dataclass
class StoreSummary:
    """Counts, ok durations, recent activity and failure groups of one checkpoint.

    ``recent``: (images finished, earliest start) within ``window_s`` of ``last_finished``;
    ``errors``: the ``top`` largest failure groups, largest first; ``failed``: failed images in all.
    """

    run: RunInfo
    counts: dict[str, int]
    ok_durations: list[float]
    last_finished: float | None
    recent: tuple[int, float | None]
    errors: list[FailureGroup]
    updated_at: float
    failed: int = 0


def summarize(output_dir: Path, window_s: float, top: int, paths: int = 1) -> StoreSummary:
    """The summary of the checkpoint in ``output_dir``; OutputError when it is unreadable or empty."""
    path = Path(output_dir) / CHECKPOINT_NAME
    conn = connect_readonly(path)
    try:
        conn.execute("BEGIN")  # one snapshot
        run = read_run_info(conn, path)
        if run is None:
            raise OutputError(f"the checkpoint {path} holds no run yet")
        summary = _summary(conn, run, window_s, top, paths)
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise OutputError(f"cannot read the checkpoint {path}: {exc}") from exc
    finally:
        conn.close()
    return summary


def summarize_manifest(
    output_dir: Path, run: RunInfo, window_s: float, top: int, paths: int = 1
) -> StoreSummary:
    """The same summary of the manifest's images.parquet (``run`` read from it); OutputError when
    it is unreadable. Its rows go into an in-memory table the checkpoint's queries read."""
    table = read_manifest_table(output_dir, _COLUMNS)
    columns = [table[name].to_pylist() for name in _COLUMNS[:4]]
    for name in ("started_at", "finished_at"):  # timestamps as the checkpoint holds them: epoch s
        micros = table[name].cast(pa.int64()).to_pylist()
        columns.append([None if m is None else m / 1_000_000 for m in micros])
    columns.append(table["duration_s"].to_pylist())
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"CREATE TABLE images ({', '.join(_COLUMNS)}, updated_at REAL)")
        conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, NULL)", zip(*columns, strict=True))
        return _summary(conn, run, window_s, top, paths)
    finally:
        conn.close()


def _summary(conn: sqlite3.Connection, run: RunInfo, window_s: float, top: int, paths: int) -> StoreSummary:
    counts = dict(conn.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())
    durations = [
        r[0]
        for r in conn.execute("SELECT duration_s FROM images WHERE status='ok' AND duration_s IS NOT NULL")
    ]
    last = conn.execute("SELECT max(finished_at) FROM images").fetchone()[0]
    recent: tuple[int, float | None] = (0, None)
    if last is not None:
        recent = conn.execute(
            "SELECT count(*), min(coalesce(started_at, finished_at)) FROM images WHERE finished_at >= ?",
            (last - window_s,),
        ).fetchone()
    errors = _errors(conn, top, paths)
    failed = sum(counts.get(value, 0) for value in FAILURE_VALUES)
    updated = conn.execute("SELECT max(updated_at) FROM images").fetchone()[0]
    return StoreSummary(
        run, counts, durations, last, recent, errors, max(updated or 0.0, run.updated_at), failed
    )


def _errors(conn: sqlite3.Connection, top: int, paths: int) -> list[FailureGroup]:
    marks = ",".join("?" * len(FAILURE_VALUES))
    # A missing error type groups with the empty one: the same failure as far as a reader can tell.
    groups = conn.execute(
        f"SELECT status, coalesce(error_type, ''), count(*), min(path) FROM images"
        f" WHERE status IN ({marks}) GROUP BY status, coalesce(error_type, '')"
        " ORDER BY count(*) DESC, status, min(path) LIMIT ?",
        (*FAILURE_VALUES, top),
    ).fetchall()
    same = "status=? AND coalesce(error_type, '')=?"
    out = []
    for status, error_type, count, example in groups:
        message = conn.execute("SELECT error_message FROM images WHERE path=?", (example,)).fetchone()[0]
        first = conn.execute(
            f"SELECT path FROM images WHERE {same} ORDER BY path LIMIT ?", (status, error_type, paths)
        ).fetchall()
        common = conn.execute(
            f"SELECT coalesce(error_message, ''), count(*) FROM images WHERE {same}"
            " GROUP BY coalesce(error_message, '') ORDER BY count(*) DESC, 1 LIMIT 3",
            (status, error_type),
        ).fetchall()
        kind = error_type or None
        out.append(FailureGroup(status, kind, count, [p for (p,) in first], message, list(common)))
    return out
