"""The checkpoint file itself: connections, the schema built from :mod:`batchseg.store.tables`
(created, or upgraded from an earlier version), the run row and its fingerprint check.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import RunConfig, upgrade_fingerprint
from ..errors import ConfigMismatchError, OutputError
from ..options import OPTIONS
from ..values import show
from .tables import DETECTIONS, IMAGES, PENDING, PREVIOUS_RUNS, RESULT_COLUMNS, RUNNING

__all__ = [
    "WRITTEN_COLUMNS",
    "RunInfo",
    "Seed",
    "check_fingerprint",
    "connect_readonly",
    "connect_writer",
    "database_error",
    "describe_fingerprint_change",
    "init_run",
    "read_run_info",
    "resolve_tile",
    "rollback",
]

SCHEMA_VERSION = 2  # 2: images.path_raw
_BUSY_TIMEOUT_S = 30.0

_RUN_DDL = """CREATE TABLE IF NOT EXISTS run (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    fingerprint TEXT NOT NULL,      -- json of RunConfig.fingerprint_fields()
    config_hash TEXT NOT NULL,      -- RunConfig.fingerprint()
    config TEXT NOT NULL,           -- json of the latest session's RunConfig.to_dict()
    batchseg_version TEXT NOT NULL,
    model_id TEXT NOT NULL
)"""
_RUN_COLUMNS = "run_id, created_at, updated_at, fingerprint, config_hash, config, batchseg_version, model_id"
_SCHEMA = (
    _RUN_DDL,
    IMAGES.ddl(),
    "CREATE INDEX IF NOT EXISTS images_status ON images(status)",
    DETECTIONS.ddl(),
)

WRITTEN_COLUMNS = (*RESULT_COLUMNS, "updated_at")


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
class Seed:
    """Rows to load into a fresh checkpoint whose file was lost, handed in by whoever read them (the
    manifest): ``images`` yields batches of rows in ``RESULT_COLUMNS`` order, ``detections`` batches
    in the detections table's column order."""

    run: RunInfo
    source: Path
    images: Callable[[], Iterator[list[tuple[Any, ...]]]]
    detections: Callable[[], Iterator[list[tuple[Any, ...]]]]


_CLI_NAMES = {o.name: o.cli_name for o in OPTIONS}


def describe_fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One ``--option: old -> new`` line per field that differs, named as the user gives it, each
    value cut to one line (``values.show``)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(not set)"), new.get(key, "(not set)")
        if before != after:
            name = _CLI_NAMES.get(key, key)  # output_format is no option
            lines.append(f"{name}: {show(before)} -> {show(after)}")
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
        raise database_error(path, exc) from exc
    return conn


def rollback(conn: sqlite3.Connection) -> None:
    """Undo an open transaction without hiding the error that got here: SQLite has already rolled
    back after some errors (a full disk), and a failing ROLLBACK must not replace the cause."""
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


# ---- connection and run row helpers ---------------------------------------------------------------


def connect_writer(path: Path) -> sqlite3.Connection:
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
        raise database_error(path, exc) from exc
    return conn


def database_error(path: Path, exc: sqlite3.DatabaseError) -> OutputError:
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


def read_run_info(conn: sqlite3.Connection, path: Path) -> RunInfo | None:
    """The run row read through ``conn``, or None when the checkpoint holds no run yet."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutputError(f"the checkpoint {path} was written by a newer batchseg; upgrade batchseg")
        has_run = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='run'").fetchone()
        if not has_run:
            return None
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM run LIMIT 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise database_error(path, exc) from exc
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


def init_run(
    conn: sqlite3.Connection, path: Path, config: RunConfig, make_seed: Callable[[], Seed | None] | None
) -> str:
    """Create (or upgrade) the schema and the run row, or check the stored fingerprint; returns the
    run id. A checkpoint without a run row is filled from ``seed`` when there is one."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            _add_missing_columns(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            run = read_run_info(conn, path)
            if run is None:
                seed = make_seed() if make_seed is not None else None
                config = resolve_tile(config, seed.run if seed is not None else None)[0]
                if seed is not None:
                    check_fingerprint(seed.source.parent.parent, seed.run.fingerprint, config)
                run_id = seed.run.run_id if seed is not None else new_run_id()
                _insert_run(conn, run_id, config, seed.run.created_at if seed is not None else None)
                if seed is not None:
                    _load_seed(conn, seed)
            else:
                config = resolve_tile(config, run)[0]
                check_fingerprint(path.parent, run.fingerprint, config)
                run_id = run.run_id
                conn.execute(
                    "UPDATE run SET config=?, updated_at=?, batchseg_version=?, model_id=?",
                    (_config_json(config), time.time(), __version__, _model_id(config)),
                )
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    except sqlite3.DatabaseError as exc:
        raise database_error(path, exc) from exc
    return run_id


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A checkpoint written by an earlier version gets the columns added since (all nullable)."""
    for table in (IMAGES, DETECTIONS):
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table.name})")}
        for column in table.stored:
            if column.name not in have:
                conn.execute(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.sql}")


def _load_seed(conn: sqlite3.Connection, seed: Seed) -> None:
    now = time.time()
    status_at = RESULT_COLUMNS.index("status")
    insert = IMAGES.insert(WRITTEN_COLUMNS)
    for rows in seed.images():
        conn.executemany(
            insert,
            (
                (
                    *row[:status_at],
                    PENDING if row[status_at] == RUNNING else row[status_at],
                    *row[status_at + 1 :],
                    now,
                )
                for row in rows
            ),
        )
    insert_detection = DETECTIONS.insert(replace=True)
    for rows in seed.detections():
        conn.executemany(insert_detection, rows)


def _insert_run(conn: sqlite3.Connection, run_id: str, config: RunConfig, created: float | None) -> None:
    now = time.time()
    conn.execute(
        f"INSERT INTO run ({_RUN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
        (
            run_id,
            created or now,
            now,
            json.dumps(config.fingerprint_fields(), sort_keys=True),
            config.fingerprint(),
            _config_json(config),
            __version__,
            _model_id(config),
        ),
    )


def _model_id(config: RunConfig) -> str:
    """The engine and its model as the engine names them (a run resumed after an upgrade gets the
    name too: a colour-threshold run once recorded the default --model)."""
    from ..worker.contract import recorded_model  # imports the engine module: only here

    return recorded_model(config.engine, config)


def _config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def check_fingerprint(folder: Path, stored: dict[str, Any], config: RunConfig) -> None:
    """ConfigMismatchError naming each fingerprint option of ``config`` that differs from ``stored``
    (the fingerprint of the run in ``folder``)."""
    # Compare through JSON so tuples/lists and ints/floats read back the same way.
    current = json.loads(json.dumps(config.fingerprint_fields(), sort_keys=True))
    before = upgrade_fingerprint(stored)  # an absent tile: made before tiling, "off"
    if before["tile"] is None:  # stored unresolved: the engine tiled it as "auto"
        before = {**before, "tile": TILE_NOT_GIVEN}
    changes = describe_fingerprint_change(before, current)
    if changes:
        raise ConfigMismatchError(
            f"the output folder {folder} holds a run made with other settings:\n  "
            + "\n  ".join(changes)
            + "\nPass --new-run to start a new run there (the earlier one moves to"
            f" {PREVIOUS_RUNS}/), or use another --output."
        )


#: What ``--tile`` not given means for a new output folder (and what the engine does with a None).
TILE_NOT_GIVEN = "auto"
#: What it means for a folder whose run has no ``tile`` at all: made by 0.1.0, before tiling.
TILE_BEFORE_TILING = "off"


def resolve_tile(config: RunConfig, stored: RunInfo | None) -> tuple[RunConfig, str | None]:
    """``config`` with ``tile`` not given (None) resolved against the run of its output folder, and
    a note for the log when that run predates tiling. One rule for the CLI (``preflight``) and the
    library (``Checkpoint.open``), so a folder made through either resumes through the other:
    ``auto`` for a new folder, the stored value for an existing one, ``off`` for a run that stored
    no ``tile`` key (0.1.0), and ``auto`` for a run that stored None (a configuration opened before
    this rule existed: the engine tiled it as ``auto``). An absent key and a stored None differ."""
    if config.tile is not None:
        return config, None
    if stored is None:
        return config.with_changes(tile=TILE_NOT_GIVEN), None
    if "tile" not in stored.config:
        note = (
            "--tile not given: off, as in the run this output folder holds (made before tiling); "
            "pass --tile auto with --new-run to tile large images"
        )
        return config.with_changes(tile=TILE_BEFORE_TILING), note
    tile = stored.config["tile"]
    return config.with_changes(tile=TILE_NOT_GIVEN if tile is None else str(tile)), None
