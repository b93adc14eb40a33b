"""The checkpoint: durable state of one run in ``OUTPUT/checkpoint.sqlite`` (SQLite, WAL mode).

Durability: every ``record()`` is one transaction, committed with ``synchronous=FULL``. In WAL mode
``NORMAL`` syncs the log only at checkpoints, so the last commits can roll back after a power cut even
though ``record()`` returned; ``FULL`` fsyncs the log on every commit, so a result that ``record()``
returned for survives a power cut as well as a killed process. The price is one fsync per commit
(see ``record_many`` for results that arrive together).

Row states: an image row holds a final :class:`~batchseg.records.Status` value, or ``pending``
(discovered, not tried yet) or ``running`` (handed to a worker). ``plan()`` decides what a run has
left to do:

* an image is *done* when its row is final (``ok``, ``error``, ``timeout``, ``crashed``,
  ``invalid_input``) for the same size and mtime (content hash with ``--hash``) and, for ``ok``, its
  mask file is in place. Failed images are done: a plain resume does not redo them, ``batchseg retry``
  does (``failed_items`` + ``reset_for_retry``);
* a new or changed input is pending; ``running`` rows left by a crash are pending again;
* a row whose file is no longer discovered becomes ``missing`` (its outputs stay in place); if the file
  comes back unchanged, its earlier status is restored.

Only the parent process writes the checkpoint; readers (manifest export, ``batchseg status``) use
their own read-only connection, which WAL lets run beside the writer.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import replace_with_retry
from ..config import RunConfig, upgrade_fingerprint
from ..errors import ConfigMismatchError, OutputError
from ..records import Item, ItemResult, Status

__all__ = [
    "ALL_STATES",
    "CHECKPOINT_NAME",
    "DONE_STATUSES",
    "PENDING",
    "RUNNING",
    "Checkpoint",
    "Plan",
    "RunInfo",
    "connect_readonly",
    "read_run_info",
    "describe_fingerprint_change",
]

CHECKPOINT_NAME = "checkpoint.sqlite"
PREVIOUS_RUNS = "previous-runs"
#: Row states that are not a Status: discovered but not tried, and handed to a worker.
PENDING = "pending"
RUNNING = "running"
#: Final statuses: a row in one of these for an unchanged input is not redone on a plain resume.
DONE_STATUSES = frozenset(
    s.value for s in (Status.OK, Status.ERROR, Status.TIMEOUT, Status.CRASHED, Status.INVALID_INPUT)
)
_OK = Status.OK.value
_MISSING = Status.MISSING.value
#: Every row state, for zero-filled counts.
ALL_STATES = tuple(s.value for s in Status) + (PENDING, RUNNING)

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    fingerprint TEXT NOT NULL,      -- json of RunConfig.fingerprint_fields()
    config_hash TEXT NOT NULL,      -- RunConfig.fingerprint()
    config TEXT NOT NULL,           -- json of the latest session's RunConfig.to_dict()
    batchseg_version TEXT NOT NULL,
    model_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_type TEXT,
    error_message TEXT,
    traceback TEXT,
    exit_code INTEGER,
    n_detections INTEGER,
    mask_path TEXT,
    started_at REAL,
    finished_at REAL,
    duration_s REAL,
    worker_pid INTEGER,
    device TEXT,
    run_id TEXT,
    updated_at REAL NOT NULL,
    prior_status TEXT               -- the status a row had before it became missing
);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS detections (
    path TEXT NOT NULL,
    prompt TEXT NOT NULL,
    idx INTEGER NOT NULL,
    score REAL NOT NULL,
    box_x0 REAL NOT NULL,
    box_y0 REAL NOT NULL,
    box_x1 REAL NOT NULL,
    box_y1 REAL NOT NULL,
    area_px INTEGER NOT NULL,
    mask_rle TEXT NOT NULL,
    mask_height INTEGER,
    mask_width INTEGER,
    run_id TEXT,
    PRIMARY KEY (path, idx)
) WITHOUT ROWID;
"""

_IMAGE_UPSERT = """
INSERT INTO images (path, size_bytes, mtime_ns, content_hash, width, height, status, attempts,
    error_type, error_message, traceback, exit_code, n_detections, mask_path, started_at, finished_at,
    duration_s, worker_pid, device, run_id, updated_at, prior_status)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL)
ON CONFLICT(path) DO UPDATE SET
    size_bytes=excluded.size_bytes, mtime_ns=excluded.mtime_ns, content_hash=excluded.content_hash,
    width=excluded.width, height=excluded.height, status=excluded.status,
    -- attempts add up over sessions while the row waits (resume, retry); a final row starts over
    attempts=CASE WHEN images.status IN ('pending', 'running') THEN images.attempts ELSE 0 END
        + excluded.attempts,
    error_type=excluded.error_type, error_message=excluded.error_message,
    traceback=excluded.traceback, exit_code=excluded.exit_code, n_detections=excluded.n_detections,
    mask_path=excluded.mask_path, started_at=excluded.started_at, finished_at=excluded.finished_at,
    duration_s=excluded.duration_s, worker_pid=excluded.worker_pid, device=excluded.device,
    run_id=excluded.run_id, updated_at=excluded.updated_at, prior_status=NULL
"""

_DETECTION_INSERT = """
INSERT INTO detections (path, prompt, idx, score, box_x0, box_y0, box_x1, box_y1, area_px, mask_rle,
    mask_height, mask_width, run_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
"""


@dataclass(frozen=True)
class RunInfo:
    """The run a checkpoint belongs to."""

    run_id: str
    created_at: float
    updated_at: float
    fingerprint: dict[str, Any]
    config_hash: str
    config: dict[str, Any]
    batchseg_version: str
    model_id: str


@dataclass
class Plan:
    """What a run has left to do. ``pending`` keeps the input order.

    ``counts`` keys: ``done`` (final, unchanged, files in place; includes ``failed``), ``failed``,
    ``new``, ``changed``, ``resumed`` (discovered earlier, never finished), ``in_flight_reset``
    (``running`` at a crash), ``mask_missing`` (``ok`` but its mask file is gone), ``restored``
    (missing earlier, back unchanged), ``missing`` (rows whose file is no longer discovered; outputs
    left in place), ``pending`` (= len(pending)).
    """

    pending: list[Item]
    counts: dict[str, int] = field(default_factory=dict)


def describe_fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One ``name: old -> new`` line per field that differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(not set)"), new.get(key, "(not set)")
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that never blocks the writer and never checkpoints its log."""
    if not path.is_file():
        raise OutputError(f"no checkpoint at {path}")
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro",
        uri=True,
        isolation_level=None,
        timeout=_BUSY_TIMEOUT_S,
        check_same_thread=False,
    )
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _database_error(path, exc) from exc
    return conn


class Checkpoint:
    """Durable per-image state of one run. Open with :meth:`open` or :meth:`open_existing`.

    Thread-safe for one writer process: writes are serialised by a lock, so the supervisor may call
    ``record`` from any thread. Usable as a context manager (closes on exit).
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
    def open(cls, output_dir: Path, config: RunConfig, *, new_run: bool = False) -> Checkpoint:
        """Open the checkpoint of ``output_dir`` for ``config``, creating it if needed.

        A checkpoint made with other fingerprint fields raises ConfigMismatchError naming each
        change. With ``new_run`` the earlier run's checkpoint, manifest/ and masks/ move to
        ``previous-runs/<old run id>/`` first. When the checkpoint file is gone but manifest/ is
        there, the checkpoint is rebuilt from the manifest. Take the RunLock before calling this.
        """
        output_dir = Path(output_dir)
        _ensure_writable_dir(output_dir)
        path = output_dir / CHECKPOINT_NAME
        if new_run:
            _archive_previous_run(output_dir)
        conn = _connect_writer(path)
        try:
            run_id = _init_run(conn, path, config)
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
        conn = connect_readonly(path) if read_only else _connect_writer(path)
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
                f"SELECT path, size_bytes, mtime_ns, content_hash FROM images WHERE status IN ({marks})"
                " ORDER BY path",
                wanted,
            ).fetchall()
        return [Item(path, size, mtime, digest) for path, size, mtime, digest in rows]

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
        stale ``running`` rows ``pending``) in one transaction. One SELECT, one scan of masks/.
        """
        with self._guard():
            known = {
                row[0]: row[1:]
                for row in self._conn.execute(
                    "SELECT path, size_bytes, mtime_ns, content_hash, status, mask_path, prior_status"
                    " FROM images"
                )
            }
        planner = _Planner(known, self.output_dir, use_hash)
        for item in items:
            planner.add(item)
        planner.finish()
        now = time.time()
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO images (path, size_bytes, mtime_ns, content_hash, status, attempts, run_id,"
                " updated_at) VALUES (?,?,?,?,'pending',0,?,?)",
                ((i.path, i.size_bytes, i.mtime_ns, i.content_hash, self.run_id, now) for i in planner.new),
            )
            conn.executemany(
                "UPDATE images SET size_bytes=?, mtime_ns=?, content_hash=?, status='pending', attempts=0,"
                " width=NULL, height=NULL, error_type=NULL, error_message=NULL, traceback=NULL,"
                " exit_code=NULL, n_detections=NULL, mask_path=NULL, started_at=NULL, finished_at=NULL,"
                " duration_s=NULL, worker_pid=NULL, device=NULL, prior_status=NULL, updated_at=?"
                " WHERE path=?",
                ((i.size_bytes, i.mtime_ns, i.content_hash, now, i.path) for i in planner.changed),
            )
            conn.executemany("DELETE FROM detections WHERE path=?", ((i.path,) for i in planner.changed))
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
                ((i.mtime_ns, i.content_hash, now, i.path) for i in planner.touch),
            )
            conn.executemany(
                "UPDATE images SET prior_status=status, status='missing', updated_at=? WHERE path=?",
                ((now, p) for p in planner.missing),
            )
        return Plan(planner.pending, planner.counts)

    # ---- writing -------------------------------------------------------------------------------

    def mark_started(self, paths: Iterable[str], started_at: float | None = None) -> None:
        """Mark pending rows ``running`` (so a crash shows what was in flight); optional."""
        now = time.time()
        when = now if started_at is None else started_at
        with self._write() as conn:
            conn.executemany(
                "UPDATE images SET status='running', started_at=?, updated_at=? "
                "WHERE path=? AND status='pending'",
                ((when, now, p) for p in paths),
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
                ((now, p) for p in paths),
            )
            return conn.total_changes - before

    def update_config(self, config: RunConfig) -> None:
        """Store ``config`` as the latest session's (the fingerprint must match)."""
        with self._write() as conn:
            _store_session_config(conn, self.path, config)

    def _image_row(self, result: ItemResult, item: Item, now: float) -> tuple[Any, ...]:
        if result.path != item.path:
            raise ValueError(f"result for {result.path!r} recorded with item {item.path!r}")
        return (
            item.path,
            item.size_bytes,
            item.mtime_ns,
            item.content_hash,
            result.width,
            result.height,
            str(result.status),
            result.attempts,
            result.error_type,
            result.error_message,
            result.traceback,
            result.exit_code,
            len(result.detections),
            result.mask_path,
            result.started_at,
            result.finished_at,
            result.duration_s,
            result.worker_pid,
            result.device,
            self.run_id,
            now,
        )

    def _detection_rows(self, result: ItemResult) -> list[tuple[Any, ...]]:
        indexes = [d.index for d in result.detections]
        if len(set(indexes)) != len(indexes):
            # Checked before writing: a broken result must not pass for a damaged checkpoint.
            raise ValueError(f"result for {result.path!r} repeats a detection index: {indexes}")
        return [
            (
                result.path,
                d.prompt,
                d.index,
                float(d.score),
                float(d.box[0]),
                float(d.box[1]),
                float(d.box[2]),
                float(d.box[3]),
                int(d.area_px),
                d.mask_rle,
                result.height,
                result.width,
                self.run_id,
            )
            for d in result.detections
        ]

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialise use of the connection and turn SQLite errors into OutputError."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                raise _database_error(self.path, exc) from exc

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
                _rollback(conn)
                raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo an open transaction without hiding the error that got here: SQLite has already rolled
    back after some errors (a full disk), and a failing ROLLBACK must not replace the cause."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class _Planner:
    """Sorts discovered items against the known rows; plan() writes what it found."""

    def __init__(self, known: dict[str, tuple[Any, ...]], output_dir: Path, use_hash: bool) -> None:
        self.known = known
        self.output_dir = output_dir
        self.use_hash = use_hash
        self._masks: set[str] | None = None
        self.pending: list[Item] = []
        self.new: list[Item] = []
        self.changed: list[Item] = []
        self.touch: list[Item] = []
        self.reopen: list[str] = []
        self.restore: list[tuple[str, str]] = []
        self.missing: list[str] = []
        self.counts = dict.fromkeys(
            (
                "done",
                "failed",
                "new",
                "changed",
                "resumed",
                "in_flight_reset",
                "mask_missing",
                "restored",
                "missing",
                "pending",
            ),
            0,
        )

    def add(self, item: Item) -> None:
        row = self.known.pop(item.path, None)
        if row is None:
            self._pend(item, "new", self.new)
            return
        size, mtime, digest, status, mask_path, prior = row
        if self._changed(item, size, mtime, digest):
            self._pend(item, "changed", self.changed)
            return
        if mtime != item.mtime_ns or (item.content_hash is not None and digest != item.content_hash):
            self.touch.append(item)  # same content by hash: keep the new mtime and hash
        restored = status == _MISSING
        if restored:
            status = prior if prior is not None else PENDING
        if status in DONE_STATUSES and not (status == _OK and self._mask_gone(mask_path)):
            self.counts["done"] += 1
            self.counts["failed"] += status != _OK
            if restored:
                self.counts["restored"] += 1
                self.restore.append((item.path, status))
            return
        if status in DONE_STATUSES:
            reason = "mask_missing"
        elif status == RUNNING:
            reason = "in_flight_reset"
        else:
            reason = "resumed"
        self.counts[reason] += 1
        self.pending.append(item)
        if status != PENDING or restored:
            self.reopen.append(item.path)

    def finish(self) -> None:
        self.missing = [path for path, row in self.known.items() if row[3] != _MISSING]
        self.counts["missing"] = len(self.missing)
        self.counts["pending"] = len(self.pending)

    def _pend(self, item: Item, reason: str, bucket: list[Item]) -> None:
        self.counts[reason] += 1
        bucket.append(item)
        self.pending.append(item)

    def _changed(self, item: Item, size: int, mtime: int, digest: str | None) -> bool:
        if size != item.size_bytes:
            return True
        if self.use_hash and digest is not None and item.content_hash is not None:
            # With --hash the content decides: a copied folder with new mtimes is not redone.
            return bool(digest != item.content_hash)
        return bool(mtime != item.mtime_ns)

    def _mask_gone(self, mask_path: str | None) -> bool:
        if mask_path is None:
            return False
        if self._masks is None:
            self._masks = _existing_files(self.output_dir, "masks")
        return mask_path not in self._masks


def _existing_files(output_dir: Path, top: str) -> set[str]:
    """Relative paths (forward slashes) of the files under output_dir/top: one scandir walk,
    much cheaper than a stat per image on large folders and network disks."""
    found: set[str] = set()
    stack = [(output_dir / top, top)]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), name))
            else:
                found.add(name)
    return found


# ---- connection and run row helpers ---------------------------------------------------------------


def _connect_writer(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
    except sqlite3.Error as exc:
        raise OutputError(f"cannot open the checkpoint {path}: {exc}") from exc
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        # WAL lets the manifest export and `batchseg status` read while the run writes. On a disk
        # without shared memory (some network shares) SQLite keeps another journal mode: still safe.
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _database_error(path, exc) from exc
    return conn


def _database_error(path: Path, exc: sqlite3.DatabaseError) -> OutputError:
    text = str(exc)
    if "disk is full" in text:
        return OutputError(f"the disk holding {path.parent} is full; free space and run again to resume")
    if isinstance(exc, sqlite3.OperationalError) and "malformed" not in text:
        return OutputError(f"cannot use the checkpoint {path}: {text}")
    manifest = path.parent / "manifest" / "images.parquet"
    hint = (
        f" The manifest {manifest} holds the results as of its last export: move {path.name} away and run"
        " the same command again to rebuild the checkpoint from it, or pass --new-run."
        if manifest.is_file()
        else " Move it away and run again (finished images are redone), or pass --new-run."
    )
    return OutputError(f"the checkpoint {path} is damaged ({text}).{hint}")


def _ensure_writable_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {output_dir}: {exc.strerror or exc}") from exc
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"the output folder {output_dir} is not writable")


def read_run_info(conn: sqlite3.Connection, path: Path) -> RunInfo | None:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutputError(f"the checkpoint {path} was written by a newer batchseg; upgrade batchseg")
        has_run = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='run'").fetchone()
        if not has_run:
            return None
        row = conn.execute(
            "SELECT run_id, created_at, updated_at, fingerprint, config_hash, config, batchseg_version,"
            " model_id FROM run LIMIT 1"
        ).fetchone()
    except sqlite3.DatabaseError as exc:
        raise _database_error(path, exc) from exc
    if row is None:
        return None
    run_id, created, updated, fingerprint, config_hash, config, version_text, model_id = row
    return RunInfo(
        run_id,
        created,
        updated,
        json.loads(fingerprint),
        config_hash,
        json.loads(config),
        version_text,
        model_id,
    )


def new_run_id() -> str:
    """Sortable and safe as a folder name: ``20260509T073525Z-3fa1c2``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _init_run(conn: sqlite3.Connection, path: Path, config: RunConfig) -> str:
    """Create the schema and run row, or check the stored fingerprint; returns the run id.

    A checkpoint without a run row (new, or its file lost) is seeded from the manifest if one is there.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            run = read_run_info(conn, path)
            if run is None:
                seed = _manifest_seed(path.parent)
                run_id = seed.run_id if seed is not None else new_run_id()
                _insert_run(conn, run_id, config, seed)
                if seed is not None:
                    seed.load(conn)
            else:
                _check_fingerprint(path.parent, run.fingerprint, config)
                run_id = run.run_id
                _store_session_config(conn, path, config)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    except sqlite3.DatabaseError as exc:
        raise _database_error(path, exc) from exc
    return run_id


def _insert_run(conn: sqlite3.Connection, run_id: str, config: RunConfig, seed: Any) -> None:
    now = time.time()
    created = seed.created_at if seed is not None and seed.created_at else now
    if seed is not None:
        _check_fingerprint(seed.source.parent.parent, seed.fingerprint, config)
    conn.execute(
        "INSERT INTO run (run_id, created_at, updated_at, fingerprint, config_hash, config,"
        " batchseg_version, model_id) VALUES (?,?,?,?,?,?,?,?)",
        (
            run_id,
            created,
            now,
            json.dumps(config.fingerprint_fields(), sort_keys=True),
            config.fingerprint(),
            _config_json(config),
            __version__,
            config.model,
        ),
    )


def _store_session_config(conn: sqlite3.Connection, path: Path, config: RunConfig) -> None:
    run = read_run_info(conn, path)
    if run is not None:
        _check_fingerprint(path.parent, run.fingerprint, config)
    conn.execute(
        "UPDATE run SET config=?, updated_at=?, batchseg_version=?",
        (_config_json(config), time.time(), __version__),
    )


def _config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _check_fingerprint(folder: Path, stored: dict[str, Any], config: RunConfig) -> None:
    # Compare through JSON so tuples/lists and ints/floats read back the same way.
    current = json.loads(json.dumps(config.fingerprint_fields(), sort_keys=True))
    changes = describe_fingerprint_change(upgrade_fingerprint(stored), current)
    if changes:
        raise ConfigMismatchError(
            f"the output folder {folder} holds a run made with other settings:\n  "
            + "\n  ".join(changes)
            + "\nPass --new-run to start a new run there (the earlier one moves to"
            f" {PREVIOUS_RUNS}/), or use another --output."
        )


# ---- new run: moving the earlier run aside --------------------------------------------------------


def _archive_previous_run(output_dir: Path) -> Path | None:
    """Move checkpoint, manifest/ and masks/ of the earlier run to previous-runs/<run id>/."""
    path = output_dir / CHECKPOINT_NAME
    names = [n for n in ("masks", "manifest") if (output_dir / n).exists()]
    if not path.exists() and not names:
        return None
    run_id = _settle_checkpoint(path) if path.exists() else None
    if run_id is None:
        run_id = _manifest_run_id(output_dir) or "unknown-" + new_run_id()
    target = output_dir / PREVIOUS_RUNS / run_id
    target.mkdir(parents=True, exist_ok=True)
    # The checkpoint goes last: a crash half-way leaves it with rows whose masks moved, which the
    # next plan() redoes, rather than masks without the rows that explain them.
    db_files = [
        n
        for n in (CHECKPOINT_NAME + "-wal", CHECKPOINT_NAME + "-shm", CHECKPOINT_NAME)
        if (output_dir / n).exists()
    ]
    for name in names + db_files:
        dst = target / name
        if dst.exists():
            raise OutputError(f"cannot move {output_dir / name} aside: {dst} already exists")
        try:
            replace_with_retry(output_dir / name, dst)
        except OSError as exc:
            raise OutputError(f"cannot move {output_dir / name} to {dst}: {exc}") from exc
    return target


def _settle_checkpoint(path: Path) -> str | None:
    """Fold a crashed run's log into the file, so the file moves alone; its run id, or None if damaged."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT run_id FROM run LIMIT 1").fetchone()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def _manifest_run_id(output_dir: Path) -> str | None:
    from .manifest import read_manifest_run  # noqa: PLC0415 - manifest imports this module

    run = read_manifest_run(output_dir)
    return run.run_id if run is not None else None


def _manifest_seed(output_dir: Path) -> Any:
    """When the checkpoint is gone but the manifest is there, a seed that rebuilds the rows from it."""
    from .manifest import manifest_seed  # noqa: PLC0415 - manifest imports this module

    return manifest_seed(output_dir)
