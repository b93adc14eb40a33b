"""The one description of the stored tables: each column's name, SQL type and Arrow type.

The checkpoint's DDL, its upserts and select lists, and the manifests' Arrow schemas are all built
from ``IMAGES`` and ``DETECTIONS`` here, so a column is added in one place. Paths are stored as text
that is always valid UTF-8 (``path_text``) plus, only for a name that is not valid UTF-8, its raw
bytes (``path_raw``), so such a file is kept without loss and found again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa

from ..records import ALL_STATES, FINAL_STATUSES, RowState

__all__ = [
    "ALL_STATES",
    "CHECKPOINT_NAME",
    "DETECTIONS",
    "DONE_STATUSES",
    "IMAGES",
    "PENDING",
    "RUNNING",
    "Column",
    "Table",
    "path_from",
    "path_raw",
    "path_text",
]

CHECKPOINT_NAME = "checkpoint.sqlite"
MASKS_DIR = "masks"
MANIFEST_DIR = "manifest"
PREVIOUS_RUNS = "previous-runs"

#: Row states that are not a Status (records.RowState), as stored.
PENDING = RowState.PENDING.value
RUNNING = RowState.RUNNING.value
#: Final statuses: a row in one of these for an unchanged input is not redone on a plain resume.
DONE_STATUSES = frozenset(s.value for s in FINAL_STATUSES)

UTC_US = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Column:
    """One stored column. ``sql`` None: only in the manifest (per-run values); ``arrow`` None: only
    in the checkpoint. ``arrow_name`` renames it in the manifest (SQL's reserved ``index``)."""

    name: str
    sql: str | None
    arrow: pa.DataType | None
    arrow_name: str | None = None
    default: object = None  # the value of rows written before the column existed

    @property
    def manifest_name(self) -> str:
        return self.arrow_name or self.name


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    without_rowid: bool = False

    @property
    def stored(self) -> tuple[Column, ...]:
        """The checkpoint's columns, in order."""
        return tuple(c for c in self.columns if c.sql is not None)

    @property
    def exported(self) -> tuple[Column, ...]:
        """The manifest's columns, in order."""
        return tuple(c for c in self.columns if c.arrow is not None)

    def ddl(self) -> str:
        lines = [f"    {c.name} {c.sql}" for c in self.stored] + [f"    PRIMARY KEY ({', '.join(self.key)})"]
        tail = " WITHOUT ROWID" if self.without_rowid else ""
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n" + ",\n".join(lines) + f"\n){tail}"

    def insert(self, names: tuple[str, ...] | None = None, *, replace: bool = False) -> str:
        names = names or tuple(c.name for c in self.stored)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        return f"{verb} INTO {self.name} ({', '.join(names)}) VALUES ({','.join('?' * len(names))})"

    def select(self, names: tuple[str, ...], order: str = "") -> str:
        return f"SELECT {', '.join(names)} FROM {self.name}" + (f" ORDER BY {order}" if order else "")

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.manifest_name, c.arrow) for c in self.exported])


def _c(
    name: str,
    sql: str | None,
    arrow: pa.DataType | None,
    arrow_name: str | None = None,
    default: object = None,
) -> Column:
    return Column(name, sql, arrow, arrow_name, default)


IMAGES = Table(
    "images",
    (
        _c("path", "TEXT NOT NULL", pa.string()),  # path_text(): valid UTF-8, escaped where not
        _c("path_raw", "BLOB", pa.binary()),  # the name's bytes, only when it is not valid UTF-8
        _c("size_bytes", "INTEGER NOT NULL", pa.int64()),
        _c("mtime_ns", "INTEGER NOT NULL", pa.int64()),
        _c("content_hash", "TEXT", pa.string()),
        _c("width", "INTEGER", pa.int32()),
        _c("height", "INTEGER", pa.int32()),
        _c("status", "TEXT NOT NULL", pa.string()),
        _c("attempts", "INTEGER NOT NULL DEFAULT 0", pa.int32()),
        _c("error_type", "TEXT", pa.string()),
        _c("error_message", "TEXT", pa.string()),
        _c("traceback", "TEXT", pa.string()),
        _c("exit_code", "INTEGER", pa.int32()),
        _c("n_detections", "INTEGER", pa.int32()),
        _c("mask_path", "TEXT", pa.string()),  # path_text() of the mask file
        _c("preview_path", None, pa.string()),  # its overlay preview, where one exists (at export)
        _c("started_at", "REAL", UTC_US),
        _c("finished_at", "REAL", UTC_US),
        _c("duration_s", "REAL", pa.float64()),
        _c("worker_pid", "INTEGER", pa.int64()),
        _c("device", "TEXT", pa.string()),
        _c("run_id", "TEXT", pa.string()),
        _c("crs_wkt", "TEXT", pa.string()),  # the input's CRS as WKT2, when it has one
        _c("crs_epsg", "INTEGER", pa.int32()),
        # Six numbers, JSON text in SQLite (JSON_LIST_COLUMNS). A plain list, not a fixed-size one:
        # pyarrow releases the project accepts fail to read back a null in a fixed-size list column.
        _c("transform", "TEXT", pa.list_(pa.float64())),
        _c("georef_source", "TEXT", pa.string()),
        _c("updated_at", "REAL NOT NULL", None),
        _c("prior_status", "TEXT", None),  # the status a row had before it became missing
        _c("config_hash", None, pa.string()),
        _c("model_id", None, pa.string()),
        _c("batchseg_version", None, pa.string()),
    ),
    key=("path",),
)

DETECTIONS = Table(
    "detections",
    (
        _c("path", "TEXT NOT NULL", pa.string()),
        _c("prompt", "TEXT NOT NULL", pa.string()),
        _c("idx", "INTEGER NOT NULL", pa.int32(), "index"),
        _c("score", "REAL NOT NULL", pa.float64()),
        _c("box_x0", "REAL NOT NULL", pa.float64()),
        _c("box_y0", "REAL NOT NULL", pa.float64()),
        _c("box_x1", "REAL NOT NULL", pa.float64()),
        _c("box_y1", "REAL NOT NULL", pa.float64()),
        _c("area_px", "INTEGER NOT NULL", pa.int64()),
        _c("mask_rle", "TEXT NOT NULL", pa.string()),
        _c("mask_height", "INTEGER", pa.int32()),
        _c("mask_width", "INTEGER", pa.int32()),
        _c("run_id", "TEXT", pa.string()),
        # Tiles of a tiled image folded into this detection (1 for an image processed whole);
        # a checkpoint or manifest written before tiling reads as 1.
        _c("tiles", "INTEGER NOT NULL DEFAULT 1", pa.int32(), default=1),
    ),
    key=("path", "idx"),
    without_rowid=True,
)

#: Columns that hold epoch seconds in SQLite and UTC timestamps in the manifest.
TIME_COLUMNS = ("started_at", "finished_at")
#: Columns held as JSON text in SQLite and as a list in the manifest (the input's affine transform).
JSON_LIST_COLUMNS = ("transform",)
#: images columns a result sets (the rest: updated_at and prior_status, set by the store).
RESULT_COLUMNS = tuple(c.name for c in IMAGES.stored if c.name not in ("updated_at", "prior_status"))


# ---- paths that are not valid UTF-8 -----------------------------------------------------------------


def path_text(path: str) -> str:
    """``path`` as valid UTF-8 text: a name's undecodable bytes become ``\\xNN`` escapes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_raw(path: str) -> bytes | None:
    """The bytes of a name that is not valid UTF-8 (what ``os.fsencode`` gives), else None."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(path)


def path_from(text: str, raw: bytes | None) -> str:
    """The path as the OS gave it (``os.fsdecode`` of the raw bytes), from the stored pair."""
    return os.fsdecode(raw) if raw is not None else text
