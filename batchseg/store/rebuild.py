"""Opening the store for a run: move an earlier run aside (``--new-run``), and rebuild a lost
checkpoint from the manifest, whose rows are read here and handed to the checkpoint.

A manifest pair from two exports (a kill between the two renames) is repaired, not trusted: its
``ok`` rows load as ``pending`` without detections, so those images are redone rather than left ok
without the detections that belong to them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import RunConfig
from ..errors import OutputError
from ..records import Status
from .checkpoint import Checkpoint, Seed
from .folder import archive_previous_run
from .manifest import BATCH_ROWS, manifest_pair_matches, manifest_paths, read_manifest_run
from .tables import DETECTIONS, JSON_LIST_COLUMNS, PENDING, RESULT_COLUMNS, TIME_COLUMNS

__all__ = ["manifest_seed", "open_run"]


def open_run(output_dir: Path, config: RunConfig, *, new_run: bool = False) -> Checkpoint:
    """The checkpoint of ``output_dir`` for a run of ``config``; take the RunLock first.

    With ``new_run`` the earlier run's checkpoint, manifest/ and masks/ move to
    ``previous-runs/<old run id>/`` first. When the checkpoint file is gone but manifest/ is there,
    the checkpoint is rebuilt from the manifest (read only when the checkpoint holds no run).
    """
    output_dir = Path(output_dir)
    if new_run:
        archive_previous_run(output_dir, _manifest_run_id)
    return Checkpoint.open(output_dir, config, seed=lambda: manifest_seed(output_dir))


def _manifest_run_id(output_dir: Path) -> str | None:
    run = read_manifest_run(output_dir)
    return run.run_id if run is not None else None


def manifest_seed(output_dir: Path) -> Seed | None:
    """The rows of the manifest of ``output_dir`` for a fresh checkpoint, or None without one."""
    run = read_manifest_run(output_dir)
    if run is None:
        return None
    images_path, detections_path = manifest_paths(output_dir)
    whole = manifest_pair_matches(output_dir)

    def images() -> Iterator[list[tuple[Any, ...]]]:
        with _reading(images_path):
            source = pq.ParquetFile(images_path)
            have = set(source.schema_arrow.names)
            for batch in source.iter_batches(BATCH_ROWS, columns=[c for c in RESULT_COLUMNS if c in have]):
                cols = _columns_as_epoch(batch)
                n = batch.num_rows
                rows = list(zip(*(cols.get(c, [None] * n) for c in RESULT_COLUMNS), strict=True))
                yield rows if whole else [_without_result(row) for row in rows]

    def detections() -> Iterator[list[tuple[Any, ...]]]:
        if not whole or not detections_path.is_file():
            return
        with _reading(detections_path):
            source = pq.ParquetFile(detections_path)
            have = set(source.schema_arrow.names)
            columns = DETECTIONS.stored
            names = [c.manifest_name for c in columns if c.manifest_name in have]
            for batch in source.iter_batches(BATCH_ROWS, columns=names):
                cols = _columns_as_epoch(batch)
                n = batch.num_rows
                # A column added after the manifest was written: its default for every row.
                full = [cols.get(c.manifest_name, [c.default] * n) for c in columns]
                yield list(zip(*full, strict=True))

    return Seed(run, images_path, images, detections)


_STATUS_AT = RESULT_COLUMNS.index("status")


def _without_result(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """An ``ok`` row whose detections cannot be trusted: pending, so the image is redone."""
    if row[_STATUS_AT] != Status.OK.value:
        return row
    return row[:_STATUS_AT] + (PENDING,) + row[_STATUS_AT + 1 :]


class _reading:
    """Turns a failure to read a manifest file into an OutputError that says what to do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, (OSError, pa.ArrowException, KeyError)):
            raise OutputError(
                f"cannot rebuild the checkpoint from the manifest {self.path}: {exc}. Move manifest/"
                " away to start over, or pass --new-run."
            ) from exc


def _columns_as_epoch(batch: pa.RecordBatch) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = batch.to_pydict()
    for name in TIME_COLUMNS:
        if name in cols:
            micros = batch.column(name).cast(pa.int64()).to_pylist()
            cols[name] = [None if m is None else m / 1_000_000 for m in micros]
    for name in JSON_LIST_COLUMNS:  # a list in the manifest, JSON text in the checkpoint
        if name in cols:
            cols[name] = [None if v is None else json.dumps(v) for v in cols[name]]
    return cols
