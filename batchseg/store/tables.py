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
    in the checkpoint. ``arrow_name`` renames it in the manifest (SQL's reserved ``index``). ``doc``
    says what a manifest column holds: the documentation's reference of outputs is made from it."""

    name: str
    sql: str | None
    arrow: pa.DataType | None
    arrow_name: str | None = None
    default: object = None  # the value of rows written before the column existed
    doc: str = ""  # what it holds, for the reader of the manifest (markdown, one paragraph)

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
    *,
    doc: str = "",
) -> Column:
    return Column(name, sql, arrow, arrow_name, default, doc)


IMAGES = Table(
    "images",
    (
        _c(
            "path",
            "TEXT NOT NULL",
            pa.string(),
            doc="relative to the input folder, forward slashes (undecodable bytes of a name as `\\xNN`)",
        ),  # path_text(): valid UTF-8, escaped where not
        _c(
            "path_raw",
            "BLOB",
            pa.binary(),
            doc="the name's bytes, only when it is not valid UTF-8 (else null)",
        ),  # the name's bytes, only when it is not valid UTF-8
        _c("size_bytes", "INTEGER NOT NULL", pa.int64(), doc="size of the input file when it was processed"),
        _c(
            "mtime_ns",
            "INTEGER NOT NULL",
            pa.int64(),
            doc="modification time of the input file when it was processed (ns since the epoch)",
        ),
        _c(
            "content_hash",
            "TEXT",
            pa.string(),
            doc="sha256 of the input file's content, with `--hash` (else null)",
        ),
        _c(
            "width",
            "INTEGER",
            pa.int32(),
            doc="width in pixels, after EXIF orientation (a georeferenced input: the raster's)",
        ),
        _c(
            "height",
            "INTEGER",
            pa.int32(),
            doc="height in pixels, after EXIF orientation (a georeferenced input: the raster's)",
        ),
        _c(
            "status",
            "TEXT NOT NULL",
            pa.string(),
            doc=(
                "`ok`, `error`, `timeout`, `crashed`, `invalid_input`, `skipped`, `missing`; `pending` or "
                "`running` for an image not finished yet"
            ),
        ),
        _c("attempts", "INTEGER NOT NULL DEFAULT 0", pa.int32(), doc="tries made"),
        _c("error_type", "TEXT", pa.string(), doc="a failure's exception class or kind (null when ok)"),
        _c("error_message", "TEXT", pa.string(), doc="a failure's message"),
        _c("traceback", "TEXT", pa.string(), doc="a failure's traceback, where there is one"),
        _c("exit_code", "INTEGER", pa.int32(), doc="of a crashed worker (negative: signal number)"),
        _c("n_detections", "INTEGER", pa.int32(), doc="detections of the image (rows of detections.parquet)"),
        # path_text() of the mask file
        _c("mask_path", "TEXT", pa.string(), doc="the label map, relative to OUTPUT"),
        _c(
            "preview_path",
            None,
            pa.string(),
            doc=(
                "the overlay preview (`previews/<path>.jpg`, relative to OUTPUT) where one exists: filled "
                "at each export, and again when `batchseg report --previews` or the end of a run makes "
                "missing ones"
            ),
        ),  # its overlay preview, where one exists (at export)
        _c("started_at", "REAL", UTC_US, doc="when the image's processing started"),
        _c("finished_at", "REAL", UTC_US, doc="when its result was made"),
        _c("duration_s", "REAL", pa.float64(), doc="seconds the image took"),
        _c("worker_pid", "INTEGER", pa.int64(), doc="the process that processed it"),
        _c(
            "device",
            "TEXT",
            pa.string(),
            doc="where it ran, e.g. `cuda:0 NVIDIA H100 80GB HBM3 bfloat16`, `cpu float32`",
        ),
        _c("run_id", "TEXT", pa.string(), doc="the run that made the result"),
        _c(
            "crs_wkt",
            "TEXT",
            pa.string(),
            doc="the input's CRS as WKT2 (null: no georeference, or a world file without a CRS)",
        ),  # the input's CRS as WKT2, when it has one
        _c("crs_epsg", "INTEGER", pa.int32(), doc="its EPSG code, where one exists"),
        # Six numbers, JSON text in SQLite (JSON_LIST_COLUMNS). A plain list, not a fixed-size one:
        # pyarrow releases the project accepts fail to read back a null in a fixed-size list column.
        _c(
            "transform",
            "TEXT",
            pa.list_(pa.float64()),
            doc=(
                "the input's affine transform `[a, b, c, d, e, f]` (rasterio/GDAL order: x = a·col + b·row "
                "+ c, y = d·col + e·row + f, from the upper-left corner of pixel (0, 0)); null without "
                "georeference"
            ),
        ),
        _c(
            "georef_source",
            "TEXT",
            pa.string(),
            doc="`internal` (the GeoTIFF's own keys) or the name of the world file it came from",
        ),
        _c("updated_at", "REAL NOT NULL", None),
        _c("prior_status", "TEXT", None),  # the status a row had before it became missing
        _c("config_hash", None, pa.string(), doc="the configuration fingerprint of the run"),
        _c(
            "model_id",
            None,
            pa.string(),
            doc=(
                "the engine and its model as the engine names them: `--model` for SAM3, `colour-threshold` "
                "for the colour engine, else the engine's own `model_id(config)` or its `MODULE:FUNCTION`"
            ),
        ),
        _c("batchseg_version", None, pa.string(), doc="the version that wrote the manifest"),
    ),
    key=("path",),
)

DETECTIONS = Table(
    "detections",
    (
        _c("path", "TEXT NOT NULL", pa.string(), doc="the image"),
        _c("prompt", "TEXT NOT NULL", pa.string(), doc="the prompt that found it"),
        _c(
            "idx",
            "INTEGER NOT NULL",
            pa.int32(),
            "index",
            doc="its value in the label map (1-based; label 1 is the image's best detection)",
        ),
        _c(
            "score",
            "REAL NOT NULL",
            pa.float64(),
            doc="sigmoid(logit) x sigmoid(presence) for SAM3; 1.0 for the colour engine",
        ),
        _c("box_x0", "REAL NOT NULL", pa.float64(), doc="left edge of the box, pixels of the original image"),
        _c("box_y0", "REAL NOT NULL", pa.float64(), doc="top edge of the box, pixels of the original image"),
        _c(
            "box_x1", "REAL NOT NULL", pa.float64(), doc="right edge of the box, pixels of the original image"
        ),
        _c(
            "box_y1",
            "REAL NOT NULL",
            pa.float64(),
            doc="bottom edge of the box, pixels of the original image",
        ),
        _c("area_px", "INTEGER NOT NULL", pa.int64(), doc="pixels of this instance in the label map"),
        _c(
            "mask_rle",
            "TEXT NOT NULL",
            pa.string(),
            doc=(
                "COCO compressed RLE (column-major `counts` string) of `label map == index`; "
                '`pycocotools.mask.decode({"size": [h, w], "counts": rle})` gives the mask'
            ),
        ),
        _c("mask_height", "INTEGER", pa.int32(), doc="the RLE's height (the image's)"),
        _c("mask_width", "INTEGER", pa.int32(), doc="the RLE's width (the image's)"),
        _c("run_id", "TEXT", pa.string(), doc="the run that made it"),
        # Tiles of a tiled image folded into this detection (1 for an image processed whole);
        # a checkpoint or manifest written before tiling reads as 1.
        _c(
            "tiles",
            "INTEGER NOT NULL DEFAULT 1",
            pa.int32(),
            default=1,
            doc=(
                "tiles of a tiled image that had a view of this object folded into it (1 for an image "
                "processed whole; rows written before tiling read as 1)"
            ),
        ),
        # JSON text in the checkpoint (JSON_LIST_COLUMNS).
        _c(
            "folded",
            "TEXT",
            pa.list_(pa.string()),
            doc="prompts whose detection of this object was folded into it (`--suppress-iou`); null: none",
        ),
        _c("class", None, pa.string(), doc="the class of its prompt (`--class`, else the prompt)"),
    ),
    key=("path", "idx"),
    without_rowid=True,
)

#: Columns that hold epoch seconds in SQLite and UTC timestamps in the manifest.
TIME_COLUMNS = ("started_at", "finished_at")
#: Columns held as JSON text in SQLite and as a list in the manifest (the input's affine transform).
JSON_LIST_COLUMNS = ("transform", "folded")
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
