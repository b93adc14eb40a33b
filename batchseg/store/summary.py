"""What ``batchseg status`` needs from a run: counts, ok durations, recent activity, failure groups.

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

__all__ = ["StoreSummary", "summarize", "summarize_manifest"]

#: The columns the summary reads, in the order of the in-memory table's columns.
_COLUMNS = ("path", "status", "error_type", "error_message", "started_at", "finished_at", "duration_s")


@dataclass
class StoreSummary:
    """Counts, ok durations, recent activity and failure groups of one checkpoint.

    ``recent``: (images finished, earliest start) within ``window_s`` of ``last_finished``;
    ``errors``: (status, error_type, count, example path, example message), largest first.
    """

    run: RunInfo
    counts: dict[str, int]
    ok_durations: list[float]
    last_finished: float | None
    recent: tuple[int, float | None]
    errors: list[tuple[str, str | None, int, str, str | None]]
    updated_at: float


def summarize(output_dir: Path, window_s: float, top: int) -> StoreSummary:
    """The summary of the checkpoint in ``output_dir``; OutputError when it is unreadable or empty."""
    path = Path(output_dir) / CHECKPOINT_NAME
    conn = connect_readonly(path)
    try:
        conn.execute("BEGIN")  # one snapshot
        run = read_run_info(conn, path)
        if run is None:
            raise OutputError(f"the checkpoint {path} holds no run yet")
        summary = _summary(conn, run, window_s, top)
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise OutputError(f"cannot read the checkpoint {path}: {exc}") from exc
    finally:
        conn.close()
    return summary


def summarize_manifest(output_dir: Path, run: RunInfo, window_s: float, top: int) -> StoreSummary:
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
        return _summary(conn, run, window_s, top)
    finally:
        conn.close()


def _summary(conn: sqlite3.Connection, run: RunInfo, window_s: float, top: int) -> StoreSummary:
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
    errors = _errors(conn, top)
    updated = conn.execute("SELECT max(updated_at) FROM images").fetchone()[0]
    return StoreSummary(run, counts, durations, last, recent, errors, max(updated or 0.0, run.updated_at))


def _errors(conn: sqlite3.Connection, top: int) -> list[tuple[str, str | None, int, str, str | None]]:
    marks = ",".join("?" * len(FAILURE_VALUES))
    groups = conn.execute(
        f"SELECT status, error_type, count(*), min(path) FROM images WHERE status IN ({marks})"
        " GROUP BY status, error_type ORDER BY count(*) DESC, status, min(path) LIMIT ?",
        (*FAILURE_VALUES, top),
    ).fetchall()
    out = []
    for status, error_type, count, example in groups:
        message = conn.execute("SELECT error_message FROM images WHERE path=?", (example,)).fetchone()[0]
        out.append((status, error_type, count, example, message))
    return out
