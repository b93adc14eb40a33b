"""The durable store: one run's state in ``OUTPUT/checkpoint.sqlite`` (SQLite, WAL mode).

Durability: every ``record()`` is one transaction, committed with ``synchronous=FULL``. In WAL mode
``NORMAL`` syncs the log only at checkpoints, so the last commits can roll back after a power cut even
though ``record()`` returned; ``FULL`` fsyncs the log on every commit, so a result that ``record()``
returned for survives a power cut as well as a killed process (see ``record_many`` for results that
arrive together).

Row states: a final :class:`~batchseg.records.Status` value, or ``pending``/``running``
(:mod:`batchseg.store.tables`). What a resume does is decided in :mod:`batchseg.store.plan`.
Only the parent process writes; readers (manifest export, ``batchseg status``) use their own
read-only connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import itertools
import json
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import OutputError
from ..records import Item, ItemResult, Status
from .db import (
    WRITTEN_COLUMNS as _WRITTEN,
)
from .db import (
    RunInfo,
    Seed,
    connect_readonly,
    connect_writer,
    database_error,
    describe_fingerprint_change,
    init_run,
    read_run_info,
    rollback,
)
from .folder import MaskCheck, check_masks, check_output_writable, remove_orphan_masks
from .plan import Plan, Planner, Row
from .tables import ALL_STATES, CHECKPOINT_NAME, DETECTIONS, IMAGES, path_from, path_raw, path_text

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "Plan",
    "RunInfo",
    "Seed",
    "connect_readonly",
    "describe_fingerprint_change",
    "read_run_info",
]

# attempts add up over sessions while the row waits (resume, retry); a final row starts over.
_IMAGE_UPSERT = (
    IMAGES.insert(_WRITTEN)
    + " ON CONFLICT(path) DO UPDATE SET "
    + ", ".join(
        "attempts=CASE WHEN images.status IN ('pending', 'running') THEN images.attempts ELSE 0 END"
        " + excluded.attempts"
        if c == "attempts"
        else f"{c}=excluded.{c}"
        for c in _WRITTEN[1:]
    )
    + ", prior_status=NULL"
)
_DETECTION_COLUMNS = tuple(c.name for c in DETECTIONS.stored)
# A changed input starts over: every result column of its row back to NULL.
_KEPT_ON_CHANGE = (
    "path",
    "path_raw",
    "size_bytes",
    "mtime_ns",
    "content_hash",
    "status",
    "attempts",
    "run_id",
)
_RESET_CHANGED = (
    "UPDATE images SET size_bytes=?, mtime_ns=?, content_hash=?, status='pending', attempts=0, "
    + "".join(f"{c}=NULL, " for c in (*_WRITTEN, "prior_status") if c not in (*_KEPT_ON_CHANGE, "updated_at"))
    + "updated_at=? WHERE path=?"
)
_DETECTION_INSERT = DETECTIONS.insert()


class Checkpoint:
    """Durable per-image state of one run. Open with :meth:`open` or :meth:`open_existing` (a run
    opens it through :func:`batchseg.store.rebuild.open_run`, which also moves an earlier run aside
    and rebuilds a lost checkpoint from the manifest).

    Thread-safe for one writer process: writes are serialised by a lock, so the supervisor may call
    ``record`` from any thread. Usable as a context manager (closes on exit). Methods take the paths
    as the OS gives them (a name that is not valid UTF-8 included) and return them so.
    """

    def __init__(self, conn: sqlite3.Connection, output_dir: Path, run_id: str, *, read_only: bool) -> None:
        self._conn = conn
        self.output_dir = output_dir
        self.path = output_dir / CHECKPOINT_NAME
        self.run_id = run_id
        self.read_only = read_only
        self._lock = threading.Lock()
        self.journal_mode: str = conn.execute("PRAGMA journal_mode").fetchone()[0]

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, output_dir: Path, config: RunConfig, *, seed: Callable[[], Seed | None] | None = None
    ) -> Checkpoint:
        """Open the checkpoint of ``output_dir`` for ``config``, creating it if needed.

        A checkpoint made with other fingerprint fields raises ConfigMismatchError naming each
        change. A checkpoint that holds no run yet is filled from what ``seed`` returns (called
        only then). Take the RunLock first.
        """
        output_dir = Path(output_dir)
        check_output_writable(output_dir)
        path = output_dir / CHECKPOINT_NAME
        conn = connect_writer(path)
        try:
            run_id = init_run(conn, path, config, seed)
        except BaseException:
            conn.close()
            raise
        return cls(conn, output_dir, run_id, read_only=False)

    @classmethod
    def open_existing(cls, output_dir: Path, *, read_only: bool = False) -> Checkpoint:
        """Open the checkpoint an earlier run left (retry, status); OutputError when there is none."""
        output_dir = Path(output_dir)
        path = output_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise OutputError(f"no batchseg checkpoint in {output_dir} (expected {path})")
        conn = connect_readonly(path) if read_only else connect_writer(path)
        try:
            row = read_run_info(conn, path)
        except BaseException:
            conn.close()
            raise
        if row is None:
            conn.close()
            raise OutputError(f"the checkpoint {path} holds no run; start one with batchseg run")
        return cls(conn, output_dir, row.run_id, read_only=read_only)

    def close(self) -> None:
        """Close the connection; the last writer to close folds the log back into the file."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------------

    def run_info(self) -> RunInfo:
        """The run row: id, fingerprint, latest config, version, model."""
        with self._guard():
            row = read_run_info(self._conn, self.path)
        if row is None:
            raise OutputError(f"the checkpoint {self.path} holds no run")
        return row

    def stored_config(self) -> dict[str, Any]:
        """The RunConfig.to_dict() of the latest session that opened this checkpoint."""
        return self.run_info().config

    def counts(self) -> dict[str, int]:
        """Rows per state: every Status value plus ``pending`` and ``running``, zero-filled."""
        counts = dict.fromkeys(ALL_STATES, 0)
        with self._guard():
            rows = self._conn.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall()
        for status, n in rows:
            counts[status] = n
        return counts

    def failed_items(self, statuses: Sequence[Status | str]) -> list[Item]:
        """Items whose row has one of ``statuses``, by path (what ``batchseg retry`` reruns)."""
        wanted = [str(s) for s in statuses]
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        with self._guard():
            rows = self._conn.execute(
                "SELECT path, path_raw, size_bytes, mtime_ns, content_hash FROM images"
                f" WHERE status IN ({marks}) ORDER BY path",
                wanted,
            ).fetchall()
        return [Item(path_from(text, raw), size, mtime, digest) for text, raw, size, mtime, digest in rows]

    def settled_paths(self) -> Container[str]:
        """Paths whose row holds a result of their own (not a name clash): discovery keeps these
        when a newcomer's name clashes with them. Asked one path at a time (discovery asks only
        about a clash), so a folder of a million rows is not read into memory for it."""
        return _SettledPaths(self)

    def is_settled(self, path: str) -> bool:
        """Whether ``path`` has a row holding a result of its own (``settled_paths``)."""
        with self._guard():
            row = self._conn.execute(
                "SELECT 1 FROM images WHERE path=? AND error_type IS NOT 'NameCollision'", (path_text(path),)
            ).fetchone()
        return row is not None

    @contextmanager
    def read_connection(self) -> Iterator[sqlite3.Connection]:
        """A separate read-only connection (its own snapshot; the writer goes on meanwhile)."""
        conn = connect_readonly(self.path)
        try:
            yield conn
        finally:
            conn.close()

    # ---- planning ------------------------------------------------------------------------------

    def plan(self, items: list[Item], *, use_hash: bool) -> Plan:
        """Compare the discovered ``items`` with the checkpoint and return what is left to do.

        Writes the outcome (new rows ``pending``, changed rows reset, vanished rows ``missing``,
        stale ``running`` rows ``pending``) in one transaction, and removes the mask files no row
        names. Two SELECTs and one walk of masks/, each in path order: a folder of a million images
        holds no row nor mask name in memory beyond its items.
        """
        with self._guard():
            named = self._conn.execute(
                "SELECT mask_path FROM images WHERE mask_path IS NOT NULL ORDER BY mask_path"
            )
            masks = check_masks(self.output_dir, (row[0] for row in named))
        keys = [path_text(i.path) for i in items]  # the same strings: a path is valid UTF-8 as a rule
        ordered = all(map(operator.lt, keys, itertools.islice(keys, 1, None)))  # as discover gives them
        planner = Planner(use_hash)
        with self._guard():
            rows = self._conn.execute(
                "SELECT path, size_bytes, mtime_ns, content_hash, status, mask_path, prior_status FROM images"
                + (" ORDER BY path" if ordered else "")
            )
            planner.match(items, keys, self._plan_rows(rows, masks), ordered)
        del keys
        planner.counts["orphan_masks"] = remove_orphan_masks(self.output_dir, masks.orphans)
        now = time.time()
        key = path_text
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO images (path, path_raw, size_bytes, mtime_ns, content_hash, status, attempts,"
                " run_id, updated_at) VALUES (?,?,?,?,?,'pending',0,?,?)",
                (
                    (
                        key(i.path),
                        path_raw(i.path),
                        i.size_bytes,
                        i.mtime_ns,
                        i.content_hash,
                        self.run_id,
                        now,
                    )
                    for i in planner.new
                ),
            )
            conn.executemany(
                _RESET_CHANGED,
                ((i.size_bytes, i.mtime_ns, i.content_hash, now, key(i.path)) for i in planner.changed),
            )
            conn.executemany("DELETE FROM detections WHERE path=?", ((key(i.path),) for i in planner.changed))
            conn.executemany(
                "UPDATE images SET status='pending', prior_status=NULL, updated_at=? WHERE path=?",
                ((now, p) for p in planner.reopen),
            )
            conn.executemany(
                "UPDATE images SET status=?, prior_status=NULL, updated_at=? WHERE path=?",
                ((status, now, p) for p, status in planner.restore),
            )
            conn.executemany(
                "UPDATE images SET mtime_ns=?, content_hash=?, updated_at=? WHERE path=?",
                ((i.mtime_ns, i.content_hash, now, key(i.path)) for i in planner.touch),
            )
            conn.executemany(
                "UPDATE images SET prior_status=status, status='missing', updated_at=? WHERE path=?",
                ((now, p) for p in planner.missing),
            )
        return Plan(planner.pending, planner.counts)

    def _plan_rows(self, rows: Iterable[tuple[Any, ...]], masks: MaskCheck) -> Iterator[tuple[str, Row]]:
        """Each stored row as the ``Planner`` reads it."""
        gone, statuses = masks.gone, {s: s for s in ALL_STATES}  # one string per status, not per row
        for path, size, mtime, digest, status, mask_path, prior in rows:
            missing = mask_path is not None and mask_path in gone
            yield (
                path,
                (size, mtime, digest, statuses.get(status, status), missing, statuses.get(prior, prior)),
            )

    # ---- writing -------------------------------------------------------------------------------

    def mark_started(self, paths: Iterable[str], started_at: float | None = None) -> None:
        """Mark pending rows ``running`` (so a crash shows what was in flight); optional."""
        now = time.time()
        when = now if started_at is None else started_at
        with self._write() as conn:
            conn.executemany(
                "UPDATE images SET status='running', started_at=?, updated_at=? "
                "WHERE path=? AND status='pending'",
                ((when, now, path_text(p)) for p in paths),
            )

    def release_running(self) -> None:
        """``running`` rows back to ``pending``: called when a run ends, so that only a manifest
        exported while a run is live shows ``running`` (a crash leaves them to ``plan``)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE images SET status='pending', updated_at=? WHERE status='running'", (time.time(),)
            )

    def record(self, result: ItemResult, item: Item) -> None:
        """Store one result durably: the image row and its detections in one committed transaction.

        ``item`` is the input as it was handed to the worker: its size, mtime and hash are what a
        later run compares against. Old detections of the path are replaced.
        """
        self.record_many([(result, item)])

    def record_many(self, pairs: Sequence[tuple[ItemResult, Item]]) -> None:
        """Store several results in one transaction (one fsync): durable when this returns.

        Raises ValueError, writing nothing, for a result that does not match its item or repeats a
        detection index.
        """
        now = time.time()
        rows = [(self._image_row(r, i, now), self._detection_rows(r)) for r, i in pairs]
        with self._write() as conn:
            for image_row, detection_rows in rows:
                conn.execute(_IMAGE_UPSERT, image_row)
                conn.execute("DELETE FROM detections WHERE path=?", (image_row[0],))
                conn.executemany(_DETECTION_INSERT, detection_rows)

    def reset_for_retry(self, paths: Iterable[str]) -> int:
        """Make these rows ``pending`` again, keeping their attempts; returns how many changed."""
        now = time.time()
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(
                "UPDATE images SET status='pending', prior_status=NULL, updated_at=? WHERE path=?",
                ((now, path_text(p)) for p in paths),
            )
            return conn.total_changes - before

    def _image_row(self, result: ItemResult, item: Item, now: float) -> tuple[Any, ...]:
        if result.path != item.path:
            raise ValueError(f"result for {result.path!r} recorded with item {item.path!r}")
        values = {
            "path": path_text(item.path),
            "path_raw": path_raw(item.path),
            "size_bytes": item.size_bytes,
            "mtime_ns": item.mtime_ns,
            "content_hash": item.content_hash,
            "status": str(result.status),
            "n_detections": len(result.detections),
            "mask_path": None if result.mask_path is None else path_text(result.mask_path),
            "duration_s": result.duration_s,
            "run_id": self.run_id,
            "updated_at": now,
        }
        row = (values[c] if c in values else getattr(result, c) for c in _WRITTEN)
        # An error message or traceback may quote an undecodable name: SQLite takes only UTF-8.
        return tuple(path_text(v) if isinstance(v, str) else v for v in row)

    def _detection_rows(self, result: ItemResult) -> list[tuple[Any, ...]]:
        indexes = [d.index for d in result.detections]
        if len(set(indexes)) != len(indexes):
            # Checked before writing: a broken result must not pass for a damaged checkpoint.
            raise ValueError(f"result for {result.path!r} repeats a detection index: {indexes}")
        path = path_text(result.path)
        rows = []
        for d in result.detections:
            x0, y0, x1, y1 = (float(v) for v in d.box)
            values = {
                "path": path,
                "prompt": d.prompt,
                "idx": d.index,
                "score": float(d.score),
                "box_x0": x0,
                "box_y0": y0,
                "box_x1": x1,
                "box_y1": y1,
                "area_px": int(d.area_px),
                "mask_rle": d.mask_rle,
                "mask_height": result.height,
                "mask_width": result.width,
                "run_id": self.run_id,
                "tiles": int(d.tiles),
                "folded": json.dumps(list(d.folded)) if d.folded else None,
            }
            rows.append(tuple(values[c] for c in _DETECTION_COLUMNS))
        return rows

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialise use of the connection and turn SQLite errors into OutputError."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                raise database_error(self.path, exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction, committed (and fsynced) when the block ends."""
        if self.read_only:
            raise OutputError(f"the checkpoint {self.path} was opened read-only")
        with self._guard():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise


class _SettledPaths(Container[str]):
    """``Checkpoint.settled_paths``: membership asked of the checkpoint."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.checkpoint.is_settled(path)
