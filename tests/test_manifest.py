"""Manifest export: real checkpoints, real Parquet read back with pyarrow."""

from __future__ import annotations

import datetime as dt
import json
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _storage import failed_result, make_config, make_items, ok_result, python

from batchseg import __version__
from batchseg.atomic import TEMP_SUFFIX
from batchseg.errors import OutputError
from batchseg.records import FINAL_FAILURES, Status
from batchseg.store import manifest
from batchseg.store.checkpoint import CHECKPOINT_NAME, Checkpoint
from batchseg.store.manifest import (
    DETECTIONS_SCHEMA,
    IMAGES_SCHEMA,
    export_manifest,
    manifest_paths,
    read_manifest_items,
)
from batchseg.store.rebuild import open_run

TESTS = str(Path(__file__).parent)


def test_export_writes_both_files_with_the_fixed_schema(tmp_path: Path) -> None:
    a, b, c = make_items(3)
    config = make_config(prompts=("roof", "tree"))
    with Checkpoint.open(tmp_path, config) as cp:
        cp.plan([a, b, c], use_hash=False)
        cp.record(ok_result(a, tmp_path, n_det=2, duration=1.5, finished=1_700_000_000.25), a)
        cp.record(failed_result(b, Status.CRASHED, "WorkerCrashed", "exit -9"), b)
        counts = export_manifest(cp, tmp_path)
        run_id = cp.run_id
    assert (counts.images, counts.detections) == (3, 2)
    assert counts.by_status == {"ok": 1, "crashed": 1, "pending": 1}

    images_path, detections_path = manifest_paths(tmp_path)
    images = pq.read_table(images_path)
    assert images.schema.remove_metadata() == IMAGES_SCHEMA
    rows = {r["path"]: r for r in images.to_pylist()}
    ok = rows[a.path]
    assert ok["status"] == "ok" and ok["n_detections"] == 2 and ok["mask_path"] == f"masks/{a.path}.png"
    assert (ok["width"], ok["height"], ok["size_bytes"], ok["mtime_ns"]) == (64, 48, a.size_bytes, a.mtime_ns)
    assert ok["finished_at"] == dt.datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=dt.timezone.utc)
    assert ok["duration_s"] == pytest.approx(1.5)
    assert ok["run_id"] == run_id and ok["config_hash"] == config.fingerprint()
    assert ok["model_id"] == "models/sam3" and ok["batchseg_version"] == __version__
    crashed = rows[b.path]
    assert (crashed["status"], crashed["error_type"]) == ("crashed", "WorkerCrashed")
    assert crashed["exit_code"] == -9
    assert crashed["traceback"].startswith("Traceback")
    assert rows[c.path]["status"] == "pending"

    meta = images.schema.metadata
    assert json.loads(meta[b"batchseg.config"])["prompts"] == ["roof", "tree"]
    assert meta[b"batchseg.run_id"].decode() == run_id

    dets = pq.read_table(detections_path)
    assert dets.schema.remove_metadata() == DETECTIONS_SCHEMA
    assert dets.column("index").to_pylist() == [1, 2]
    first = dets.to_pylist()[0]
    assert (first["box_x0"], first["box_y0"], first["box_x1"], first["box_y1"]) == (1.0, 2.0, 4.0, 4.5)
    assert (first["mask_rle"], first["mask_height"], first["mask_width"]) == ("rle1", 48, 64)
    assert not list(images_path.parent.glob(f"*{TEMP_SUFFIX}"))


def test_an_empty_run_exports_empty_tables(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path, make_config()) as cp:
        counts = export_manifest(cp, tmp_path)
    assert (counts.images, counts.detections) == (0, 0)
    images_path, detections_path = manifest_paths(tmp_path)
    assert pq.read_table(images_path).num_rows == 0
    assert pq.read_table(detections_path).schema.remove_metadata() == DETECTIONS_SCHEMA


def test_rows_are_streamed_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "BATCH_ROWS", 4)
    items = make_items(10)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.record_many([(ok_result(item, n_det=1), item) for item in items])
        export_manifest(cp, tmp_path)
    images_path, detections_path = manifest_paths(tmp_path)
    assert pq.ParquetFile(images_path).num_row_groups == 3  # 4 + 4 + 2: one row group per batch
    assert pq.read_table(images_path).column("path").to_pylist() == sorted(i.path for i in items)
    assert pq.read_table(detections_path).num_rows == 10


WRITER = f"""
import sys
sys.path.insert(0, {TESTS!r})
from pathlib import Path
from _storage import make_config, make_items, ok_result
from batchseg.store.checkpoint import Checkpoint
cp = Checkpoint.open(Path(sys.argv[1]), make_config())
for n, item in enumerate(make_items(1_000_000)):
    cp.record(ok_result(item, n_det=n % 4), item)
    print(n, flush=True)
"""


def test_export_while_another_process_writes_is_one_consistent_snapshot(tmp_path: Path) -> None:
    # A real writer process: the export must neither block it nor see half of a record.
    child = python(WRITER.replace("sys.argv[1]", repr(str(tmp_path))))
    assert child.stdout is not None
    try:
        child.stdout.readline()
        sizes = []
        with Checkpoint.open_existing(tmp_path, read_only=True) as cp:
            for _ in range(4):
                counts = export_manifest(cp, tmp_path)
                images = pq.read_table(manifest_paths(tmp_path)[0])
                dets = pq.read_table(manifest_paths(tmp_path)[1])
                assert images.num_rows == counts.images
                assert sum(images.column("n_detections").to_pylist()) == dets.num_rows == counts.detections
                assert set(dets.column("path").to_pylist()) <= set(images.column("path").to_pylist())
                sizes.append(counts.images)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # the writer went on meanwhile


def test_retry_items_come_from_the_manifest_alone(tmp_path: Path) -> None:
    a, b, c, d = make_items(4)
    with Checkpoint.open(tmp_path, make_config(workers=2)) as cp:
        cp.record(ok_result(a, tmp_path), a)
        cp.record(failed_result(b), b)
        cp.record(failed_result(c, Status.TIMEOUT, None, "over 300 s"), c)
        cp.record(failed_result(d, Status.INVALID_INPUT, "InvalidImageError", "truncated"), d)
        export_manifest(cp, tmp_path)
    (tmp_path / CHECKPOINT_NAME).unlink()

    items, config = read_manifest_items(tmp_path, FINAL_FAILURES)
    assert items == [b, c, d]
    assert config["prompts"] == ["roof"] and config["workers"] == 2
    assert read_manifest_items(tmp_path, [Status.TIMEOUT]).items == [c]
    assert read_manifest_items(tmp_path, []).items == []


def test_reading_a_missing_or_damaged_manifest_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="no readable batchseg manifest"):
        read_manifest_items(tmp_path, FINAL_FAILURES)
    images_path, _ = manifest_paths(tmp_path)
    images_path.parent.mkdir()
    images_path.write_bytes(b"PAR1 not really")
    with pytest.raises(OutputError, match="no readable batchseg manifest"):
        read_manifest_items(tmp_path, FINAL_FAILURES)
    pq.write_table(pa.table({"path": ["x"]}), images_path)  # Parquet, but not ours
    with pytest.raises(OutputError):
        read_manifest_items(tmp_path, FINAL_FAILURES)


KILLED_BETWEEN_RENAMES = f"""
import os, signal, sys
sys.path.insert(0, {TESTS!r})
from pathlib import Path
from _storage import make_config, make_items, ok_result
from batchseg import atomic
from batchseg.store.checkpoint import Checkpoint
from batchseg.store.manifest import export_manifest
out = Path(sys.argv[1])
a, b = make_items(2)
with Checkpoint.open(out, make_config()) as cp:
    cp.record(ok_result(a, out, n_det=1), a)
    export_manifest(cp, out)
    cp.record(ok_result(a, out, n_det=3), a)  # redone: other detections
    cp.record(ok_result(b, out, n_det=2), b)
    replace = atomic.replace_with_retry
    def replace_then_die(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # killed between the two renames
    atomic.replace_with_retry = replace_then_die
    export_manifest(cp, out)
"""


def test_a_kill_between_the_two_renames_is_never_read_as_one_manifest(tmp_path: Path) -> None:
    child = python(KILLED_BETWEEN_RENAMES.replace("sys.argv[1]", repr(str(tmp_path))))
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    images_path, detections_path = manifest_paths(tmp_path)
    images, detections = pq.read_table(images_path), pq.read_table(detections_path)
    assert images.num_rows == 1 and detections.num_rows == 5  # the old images, the new detections
    assert not manifest.manifest_pair_matches(tmp_path)

    (tmp_path / CHECKPOINT_NAME).unlink()
    with open_run(tmp_path, make_config()) as cp:
        # Rebuilt: the ok image whose detections cannot be trusted is redone, not ok with wrong ones.
        assert cp.counts()["ok"] == 0 and cp.counts()["pending"] == 1
        with cp.read_connection() as conn:
            assert conn.execute("SELECT count(*) FROM detections").fetchone()[0] == 0
        export_manifest(cp, tmp_path)
    assert manifest.manifest_pair_matches(tmp_path)  # the next export is one pair again


def test_one_export_carries_one_id_in_both_files(tmp_path: Path) -> None:
    (a,) = make_items(1)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.record(ok_result(a, tmp_path, n_det=2), a)
        export_manifest(cp, tmp_path)
    ids = {pq.read_schema(p).metadata[manifest.EXPORT_ID_KEY] for p in manifest_paths(tmp_path)}
    assert len(ids) == 1
    (tmp_path / CHECKPOINT_NAME).unlink()
    with open_run(tmp_path, make_config()) as cp:
        assert cp.counts()["ok"] == 1
