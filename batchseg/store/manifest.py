"""Parquet manifests derived from the checkpoint: ``manifest/images.parquet`` and
``manifest/detections.parquet``, each written to a temp file and swapped into place.

The export reads through its own read-only connection inside one transaction, so both files are one
consistent snapshot even while a run goes on writing. Rows stream in batches: a folder of 200,000
images never sits in Python lists at once. Both files carry the same ``batchseg.export_id`` in their
schema metadata: the two renames are not one step, so a reader that needs both files (the rebuild
of a lost checkpoint) checks that they match (:func:`manifest_pair_matches`).

images.parquet keeps the run in its schema metadata (``batchseg.config`` and friends), so ``batchseg
retry`` works from the manifest alone and a lost checkpoint can be rebuilt from it. Its ``status``
holds a :class:`~batchseg.records.Status` value, or ``pending``/``running`` for images a stopped (or
live) run has not finished.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import __version__
from ..atomic import atomic_path
from ..errors import OutputError
from ..geo.mosaic import label_maps, write_mosaics
from ..prompting import classes_of
from ..records import FINAL_FAILURES, Item, Status
from .checkpoint import Checkpoint, RunInfo, read_run_info
from .folder import existing_previews, preview_relpath
from .polygons import export_polygons
from .tables import DETECTIONS, IMAGES, JSON_LIST_COLUMNS, MANIFEST_DIR, TIME_COLUMNS, path_from

__all__ = [
    "DETECTIONS_SCHEMA",
    "IMAGES_SCHEMA",
    "ManifestCounts",
    "ManifestItems",
    "export_manifest",
    "manifest_pair_matches",
    "manifest_paths",
    "read_manifest_items",
    "read_manifest_run",
    "read_manifest_table",
]

IMAGES_FILE = "images.parquet"
DETECTIONS_FILE = "detections.parquet"
BATCH_ROWS = 10_000
EXPORT_ID_KEY = b"batchseg.export_id"

IMAGES_SCHEMA = IMAGES.arrow_schema()
DETECTIONS_SCHEMA = DETECTIONS.arrow_schema()

_IMAGE_SQL = IMAGES.select(tuple(c.name for c in IMAGES.exported if c.sql), order="path")
_DETECTION_SQL = DETECTIONS.select(tuple(c.name for c in DETECTIONS.exported if c.sql), order="path, idx")
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


def export_manifest(
    checkpoint: Checkpoint, output_dir: Path | None = None, *, polygons: bool = True
) -> ManifestCounts:
    """Write both manifests from ``checkpoint`` (one snapshot); safe while the run writes. With
    ``polygons`` and a run with ``--vectors``, also ``polygons.parquet`` (see ``store.polygons``);
    the periodic exports of a run leave it out, since it reads every image's part file."""
    output_dir = Path(output_dir) if output_dir is not None else checkpoint.output_dir
    images_path, detections_path = manifest_paths(output_dir)
    export_id = f"{time.time_ns()}-{secrets.token_hex(4)}"
    try:
        with checkpoint.read_connection() as conn:
            conn.execute("BEGIN")  # one snapshot for both files
            run = read_run_info(conn, checkpoint.path)
            if run is None:
                raise OutputError(f"the checkpoint {checkpoint.path} holds no run")
            # detections first: images.parquet, which a reader opens first, is the last to change
            with atomic_path(images_path) as img_tmp, atomic_path(detections_path) as det_tmp:
                by_status, n_images = _write_images(conn, img_tmp, run, export_id)
                n_detections = _write_detections(conn, det_tmp, run, export_id)
            if polygons and run.config.get("vectors"):  # polygons.parquet from the same snapshot
                export_polygons(conn, output_dir, run.run_id, run.model_id, run.config)
            write_mosaics(output_dir, label_maps(conn))  # labels.vrt: the run's maps as one layer
            conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise OutputError(f"cannot read the checkpoint {checkpoint.path} for the manifest: {exc}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot write the manifest in {images_path.parent}: {exc}") from exc
    return ManifestCounts(n_images, n_detections, dict(by_status), images_path, detections_path)


def _run_metadata(run: RunInfo, export_id: str) -> dict[str, str]:
    values = {
        "run_id": run.run_id,
        "export_id": export_id,
        "created_at": repr(run.created_at),
        "exported_at": repr(time.time()),
        "config": json.dumps(run.config, sort_keys=True),
        "fingerprint": json.dumps(run.fingerprint, sort_keys=True),
        "config_hash": run.config_hash,
        "model_id": run.model_id,
        "version": __version__,
    }
    return {_META_PREFIX + k: v for k, v in values.items()}


def _write_images(
    conn: sqlite3.Connection, dst: Path, run: RunInfo, export_id: str
) -> tuple[Counter[str], int]:
    schema = IMAGES_SCHEMA.with_metadata(_run_metadata(run, export_id))
    per_run = {"config_hash": run.config_hash, "model_id": run.model_id, "batchseg_version": __version__}
    previews = existing_previews(dst.parent.parent)  # dst is OUTPUT/manifest/<temp name>
    stored = [c.name for c in IMAGES.exported if c.sql]
    by_status: Counter[str] = Counter()
    total = 0
    with pq.ParquetWriter(dst, schema) as writer:
        for rows in _batches(conn, _IMAGE_SQL):
            columns = dict(zip(stored, zip(*rows, strict=True), strict=True))
            for name in TIME_COLUMNS:
                columns[name] = tuple(None if t is None else round(t * 1_000_000) for t in columns[name])
            for name in JSON_LIST_COLUMNS:
                if name in columns:
                    columns[name] = tuple(None if v is None else json.loads(v) for v in columns[name])
            for name, value in per_run.items():
                columns[name] = (value,) * len(rows)
            named = (preview_relpath(p) for p in columns["path"])
            columns["preview_path"] = tuple(p if p in previews else None for p in named)
            by_status.update(columns["status"])
            total += len(rows)
            writer.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema))
    _fsync(dst)
    return by_status, total


def _write_detections(conn: sqlite3.Connection, dst: Path, run: RunInfo, export_id: str) -> int:
    schema = DETECTIONS_SCHEMA.with_metadata(
        {_META_PREFIX + "run_id": run.run_id, _META_PREFIX + "export_id": export_id}
    )
    total = 0
    stored = [c.manifest_name for c in DETECTIONS.exported if c.sql]
    classes = classes_of(run.config)
    with pq.ParquetWriter(dst, schema) as writer:
        for rows in _batches(conn, _DETECTION_SQL):
            columns = dict(zip(stored, zip(*rows, strict=True), strict=True))
            for name in JSON_LIST_COLUMNS:
                if name in columns:
                    columns[name] = tuple(None if v is None else json.loads(v) for v in columns[name])
            columns["class"] = tuple(classes.get(p, p) for p in columns["prompt"])
            arrays = [pa.array(columns[f.name], f.type) for f in schema]
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
    values = _metadata(images_path)
    if values is None or "run_id" not in values or "config" not in values:
        return None
    return RunInfo(
        run_id=values["run_id"],
        created_at=float(values.get("created_at", "0")),
        updated_at=float(values.get("exported_at", "0")),
        fingerprint=json.loads(values.get("fingerprint", "{}")),
        config_hash=values.get("config_hash", ""),
        config=json.loads(values["config"]),
        batchseg_version=values.get("version", ""),
        model_id=values.get("model_id", ""),
    )


def _metadata(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    return {
        k.decode()[len(_META_PREFIX) :]: v.decode()
        for k, v in meta.items()
        if k.decode().startswith(_META_PREFIX)
    }


def manifest_pair_matches(output_dir: Path) -> bool:
    """Whether images.parquet and detections.parquet come from one export (same ``export_id``; a
    manifest written before export ids counts as one pair)."""
    images_path, detections_path = manifest_paths(output_dir)
    images, detections = _metadata(images_path) or {}, _metadata(detections_path) or {}
    return images.get("export_id") == detections.get("export_id")


def read_manifest_table(output_dir: Path, columns: Sequence[str]) -> pa.Table:
    """These columns of images.parquet (a column an older manifest lacks comes back null)."""
    images_path, _ = manifest_paths(output_dir)
    try:
        names = set(pq.read_schema(images_path).names)
        table = pq.read_table(images_path, columns=[c for c in columns if c in names])
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read the manifest {images_path}: {exc}") from exc
    for name in columns:
        if name not in names:
            field_type = IMAGES_SCHEMA.field(name).type
            table = table.append_column(name, pa.nulls(table.num_rows, field_type))
    return table.select(list(columns))


def read_manifest_items(output_dir: Path, statuses: Sequence[Status | str] = FINAL_FAILURES) -> ManifestItems:
    """Items with one of ``statuses`` in images.parquet, and the stored run config (for retry
    when the checkpoint is gone)."""
    images_path, _ = manifest_paths(output_dir)
    run = read_manifest_run(output_dir)
    if run is None:
        raise OutputError(f"no readable batchseg manifest at {images_path}")
    wanted = [str(s) for s in statuses]
    if not wanted:
        return ManifestItems([], run.config)
    table = read_manifest_table(
        output_dir, ["path", "path_raw", "size_bytes", "mtime_ns", "content_hash", "status"]
    )
    table = table.filter(pc.is_in(table["status"], pa.array(wanted))).sort_by("path")
    cols = table.to_pydict()
    items = [
        Item(path_from(text, raw), size, mtime, digest)
        for text, raw, size, mtime, digest in zip(
            cols["path"],
            cols["path_raw"],
            cols["size_bytes"],
            cols["mtime_ns"],
            cols["content_hash"],
            strict=True,
        )
    ]
    return ManifestItems(items, run.config)


def refresh_preview_paths(output_dir: Path) -> int:
    """Name in images.parquet the previews made after its export (``batchseg report --previews``,
    the end of a run): the file is rewritten atomically with the same metadata (export id
    included, so it still pairs with detections.parquet). Returns the previews named."""
    images_path, _ = manifest_paths(output_dir)
    table = pq.read_table(images_path)
    previews = existing_previews(output_dir)
    named = [p if (p := preview_relpath(path)) in previews else None for path in table["path"].to_pylist()]
    column = table.schema.get_field_index("preview_path")
    table = table.set_column(column, table.schema.field(column), pa.array(named, pa.string()))
    with atomic_path(images_path) as tmp:
        pq.write_table(table, tmp)
    return sum(p is not None for p in named)
