"""Parquet manifests derived from the checkpoint: ``manifest/images.parquet`` and
``manifest/detections.parquet``, each written to a temp file and swapped into place.

The export reads through its own read-only connection inside one transaction, so both files are one
consistent snapshot even while a run goes on writing. Rows stream in batches: a folder of 200,000
images never sits in Python lists at once.

images.parquet keeps the run in its schema metadata (``batchseg.config`` and friends), so ``batchseg
retry`` works from the manifest alone and a lost checkpoint can be rebuilt from it. Its ``status``
holds a :class:`~batchseg.records.Status` value, or ``pending``/``running`` for images a stopped (or
live) run has not finished.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..atomic import atomic_path
from ..errors import OutputError
from ..records import FINAL_FAILURES, Item, Status
from .checkpoint import PENDING, RUNNING, Checkpoint, RunInfo, read_run_info

__all__ = [
    "DETECTIONS_SCHEMA",
    "IMAGES_SCHEMA",
    "ManifestCounts",
    "ManifestItems",
    "export_manifest",
    "manifest_paths",
    "read_manifest_items",
    "read_manifest_run",
]

MANIFEST_DIR = "manifest"
IMAGES_FILE = "images.parquet"
DETECTIONS_FILE = "detections.parquet"
BATCH_ROWS = 10_000

_UTC_US = pa.timestamp("us", tz="UTC")

IMAGES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("attempts", pa.int32()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("traceback", pa.string()),
        ("exit_code", pa.int32()),
        ("n_detections", pa.int32()),
        ("mask_path", pa.string()),
        ("started_at", _UTC_US),
        ("finished_at", _UTC_US),
        ("duration_s", pa.float64()),
        ("worker_pid", pa.int64()),
        ("device", pa.string()),
        ("run_id", pa.string()),
        ("config_hash", pa.string()),
        ("model_id", pa.string()),
        ("batchseg_version", pa.string()),
    ]
)

DETECTIONS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("prompt", pa.string()),
        ("index", pa.int32()),
        ("score", pa.float64()),
        ("box_x0", pa.float64()),
        ("box_y0", pa.float64()),
        ("box_x1", pa.float64()),
        ("box_y1", pa.float64()),
        ("area_px", pa.int64()),
        ("mask_rle", pa.string()),
        ("mask_height", pa.int32()),
        ("mask_width", pa.int32()),
        ("run_id", pa.string()),
    ]
)

# Columns read from SQLite, in schema order; the last three images columns are per run.
_IMAGE_SQL = (
    "SELECT path, size_bytes, mtime_ns, content_hash, width, height, status, attempts, error_type,"
    " error_message, traceback, exit_code, n_detections, mask_path, started_at, finished_at, duration_s,"
    " worker_pid, device, run_id FROM images ORDER BY path"
)
_DETECTION_SQL = (
    "SELECT path, prompt, idx, score, box_x0, box_y0, box_x1, box_y1, area_px, mask_rle, mask_height,"
    " mask_width, run_id FROM detections ORDER BY path, idx"
)
_ROW_COLUMNS = tuple(IMAGES_SCHEMA.names[: IMAGES_SCHEMA.get_field_index("run_id") + 1])
_TIME_COLUMNS = ("started_at", "finished_at")
_META_PREFIX = "batchseg."


@dataclass
class ManifestCounts:
    """What one export wrote."""

    images: int
    detections: int
    by_status: dict[str, int] = field(default_factory=dict)
    images_path: Path | None = None
    detections_path: Path | None = None


class ManifestItems(NamedTuple):
    """What ``read_manifest_items`` returns; unpacks as ``items, config = ...``."""

    items: list[Item]
    config: dict[str, Any]


def manifest_paths(output_dir: Path) -> tuple[Path, Path]:
    """(images.parquet, detections.parquet) of an output folder."""
    folder = Path(output_dir) / MANIFEST_DIR
    return folder / IMAGES_FILE, folder / DETECTIONS_FILE


def export_manifest(checkpoint: Checkpoint, output_dir: Path | None = None) -> ManifestCounts:
    """Write both manifests from ``checkpoint`` (one snapshot); safe while the run writes."""
    output_dir = Path(output_dir) if output_dir is not None else checkpoint.output_dir
    images_path, detections_path = manifest_paths(output_dir)
    try:
        with checkpoint.read_connection() as conn:
            conn.execute("BEGIN")  # one snapshot for both files
            run = read_run_info(conn, checkpoint.path)
            if run is None:
                raise OutputError(f"the checkpoint {checkpoint.path} holds no run")
            with atomic_path(detections_path) as det_tmp, atomic_path(images_path) as img_tmp:
                by_status, n_images = _write_images(conn, img_tmp, run)
                n_detections = _write_detections(conn, det_tmp, run)
            conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise OutputError(f"cannot read the checkpoint {checkpoint.path} for the manifest: {exc}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot write the manifest in {images_path.parent}: {exc}") from exc
    return ManifestCounts(n_images, n_detections, dict(by_status), images_path, detections_path)


def _run_metadata(run: RunInfo) -> dict[str, str]:
    values = {
        "run_id": run.run_id,
        "created_at": repr(run.created_at),
        "exported_at": repr(time.time()),
        "config": json.dumps(run.config, sort_keys=True),
        "fingerprint": json.dumps(run.fingerprint, sort_keys=True),
        "config_hash": run.config_hash,
        "model_id": run.model_id,
        "version": __version__,
    }
    return {_META_PREFIX + k: v for k, v in values.items()}


def _write_images(conn: sqlite3.Connection, dst: Path, run: RunInfo) -> tuple[Counter[str], int]:
    schema = IMAGES_SCHEMA.with_metadata(_run_metadata(run))
    per_run = {"config_hash": run.config_hash, "model_id": run.model_id, "batchseg_version": __version__}
    by_status: Counter[str] = Counter()
    total = 0
    with pq.ParquetWriter(dst, schema) as writer:
        for rows in _batches(conn, _IMAGE_SQL):
            columns = dict(zip(_ROW_COLUMNS, zip(*rows, strict=True), strict=True))
            for name in _TIME_COLUMNS:
                columns[name] = tuple(None if t is None else round(t * 1_000_000) for t in columns[name])
            for name, value in per_run.items():
                columns[name] = (value,) * len(rows)
            by_status.update(columns["status"])
            total += len(rows)
            writer.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema))
    _fsync(dst)
    return by_status, total


def _write_detections(conn: sqlite3.Connection, dst: Path, run: RunInfo) -> int:
    schema = DETECTIONS_SCHEMA.with_metadata({_META_PREFIX + "run_id": run.run_id})
    total = 0
    with pq.ParquetWriter(dst, schema) as writer:
        for rows in _batches(conn, _DETECTION_SQL):
            columns = zip(*rows, strict=True)
            arrays = [pa.array(column, f.type) for column, f in zip(columns, schema, strict=True)]
            writer.write_batch(pa.record_batch(arrays, schema))
            total += len(rows)
    _fsync(dst)
    return total


def _batches(conn: sqlite3.Connection, sql: str) -> Iterator[list[tuple[Any, ...]]]:
    cursor = conn.execute(sql)
    while rows := cursor.fetchmany(BATCH_ROWS):
        yield rows


def _fsync(path: Path) -> None:
    # The rename that follows must not reach the disk before the data it names.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading back ---------------------------------------------------------------------------------


def read_manifest_run(output_dir: Path) -> RunInfo | None:
    """The run stored in images.parquet's metadata, or None when there is no readable manifest."""
    images_path, _ = manifest_paths(output_dir)
    if not images_path.is_file():
        return None
    try:
        meta = pq.read_schema(images_path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    values = {
        k.decode()[len(_META_PREFIX) :]: v.decode()
        for k, v in meta.items()
        if k.decode().startswith(_META_PREFIX)
    }
    if "run_id" not in values or "config" not in values:
        return None
    created = float(values.get("created_at", "0"))
    exported = float(values.get("exported_at", "0"))
    return RunInfo(
        run_id=values["run_id"],
        created_at=created,
        updated_at=exported,
        fingerprint=json.loads(values.get("fingerprint", "{}")),
        config_hash=values.get("config_hash", ""),
        config=json.loads(values["config"]),
        batchseg_version=values.get("version", ""),
        model_id=values.get("model_id", ""),
    )


def read_manifest_items(output_dir: Path, statuses: Sequence[Status | str] = FINAL_FAILURES) -> ManifestItems:
    """Items with one of ``statuses`` in images.parquet, and the stored run config (for retry
    when the checkpoint is gone)."""
    images_path, _ = manifest_paths(output_dir)
    run = read_manifest_run(output_dir)
    if run is None:
        raise OutputError(f"no readable batchseg manifest at {images_path}")
    wanted = [str(s) for s in statuses]
    try:
        table = pq.read_table(
            images_path,
            columns=["path", "size_bytes", "mtime_ns", "content_hash", "status"],
            filters=[("status", "in", wanted)] if wanted else None,
        )
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read the manifest {images_path}: {exc}") from exc
    if not wanted:
        return ManifestItems([], run.config)
    cols = table.sort_by("path").to_pydict()
    fields = (cols["path"], cols["size_bytes"], cols["mtime_ns"], cols["content_hash"])
    items = [Item(*row) for row in zip(*fields, strict=True)]
    return ManifestItems(items, run.config)


# ---- rebuilding a lost checkpoint -----------------------------------------------------------------


@dataclass
class _ManifestSeed:
    """Rows of a manifest to load into a fresh checkpoint (its file was lost or moved away)."""

    source: Path
    run_id: str
    created_at: float
    fingerprint: dict[str, Any]

    def load(self, conn: sqlite3.Connection) -> None:
        try:
            self._load(conn)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise OutputError(
                f"cannot rebuild the checkpoint from the manifest {self.source}: {exc}. Move manifest/"
                " away to start over, or pass --new-run."
            ) from exc

    def _load(self, conn: sqlite3.Connection) -> None:
        images_path, detections_path = manifest_paths(self.source.parent.parent)
        now = time.time()
        for batch in pq.ParquetFile(images_path).iter_batches(BATCH_ROWS, columns=_SEED_IMAGE_COLUMNS):
            cols = _columns_as_epoch(batch)
            rows = list(zip(*(cols[c] for c in _SEED_IMAGE_COLUMNS), strict=True))
            conn.executemany(
                f"INSERT INTO images ({', '.join(_SEED_IMAGE_COLUMNS)}, updated_at)"
                f" VALUES ({', '.join('?' * len(_SEED_IMAGE_COLUMNS))}, {now!r})",
                [_unfinished_to_pending(row) for row in rows],
            )
        if not detections_path.is_file():
            return
        for batch in pq.ParquetFile(detections_path).iter_batches(BATCH_ROWS):
            cols = batch.to_pydict()
            conn.executemany(
                "INSERT OR REPLACE INTO detections (path, prompt, idx, score, box_x0, box_y0, box_x1,"
                " box_y1, area_px, mask_rle, mask_height, mask_width, run_id)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                zip(*(cols[f.name] for f in DETECTIONS_SCHEMA), strict=True),
            )


_SEED_IMAGE_COLUMNS = list(_ROW_COLUMNS)
_STATUS_POS = _SEED_IMAGE_COLUMNS.index("status")


def _unfinished_to_pending(row: tuple[Any, ...]) -> tuple[Any, ...]:
    if row[_STATUS_POS] == RUNNING:
        return row[:_STATUS_POS] + (PENDING,) + row[_STATUS_POS + 1 :]
    return row


def _columns_as_epoch(batch: pa.RecordBatch) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = batch.to_pydict()
    for name in _TIME_COLUMNS:
        micros = batch.column(name).cast(pa.int64()).to_pylist()
        cols[name] = [None if m is None else m / 1_000_000 for m in micros]
    return cols


def manifest_seed(output_dir: Path) -> _ManifestSeed | None:
    """A seed for Checkpoint.open when the checkpoint file is missing but a manifest is there."""
    run = read_manifest_run(output_dir)
    if run is None:
        return None
    images_path, _ = manifest_paths(output_dir)
    return _ManifestSeed(images_path, run.run_id, run.created_at, run.fingerprint)
