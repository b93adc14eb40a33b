"""The store's summary is one computation: a checkpoint and the manifest exported from it give
``batchseg status`` the same figures, failure groups of equal size in the same order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from _storage import failed_result, make_config, make_items, ok_result

from batchseg.records import Status
from batchseg.status import collect_status
from batchseg.store.checkpoint import CHECKPOINT_NAME, Checkpoint
from batchseg.store.manifest import export_manifest

T0 = 1_700_000_000.0
#: (status, error_type) of the failed images, in path order: three groups of two and one of one,
#: so the order among equal groups is the first path's (the type with the later name comes first).
FAILED = [
    (Status.ERROR, "ValueError"),
    (Status.ERROR, "OSError"),
    (Status.ERROR, "ValueError"),
    (Status.ERROR, "OSError"),
    (Status.CRASHED, None),
    (Status.INVALID_INPUT, "InvalidImageError"),
    (Status.INVALID_INPUT, "InvalidImageError"),
]


def test_the_checkpoint_and_its_manifest_summarize_alike(tmp_path: Path) -> None:
    items = make_items(16)
    with Checkpoint.open(tmp_path, make_config()) as cp:
        cp.plan(items, use_hash=False)
        for k, item in enumerate(items[:8]):
            cp.record(ok_result(item, tmp_path, duration=0.5 + k, finished=T0 + 3 * k), item)
        for k, (item, (status, error_type)) in enumerate(zip(items[8:], FAILED, strict=False)):
            failed = failed_result(item, status, error_type, f"{error_type} on {item.path}")
            # Whole microseconds, as the manifest keeps them: only then are the figures equal.
            timed = dataclasses.replace(failed, started_at=T0 + 30 + k, finished_at=T0 + 30.5 + k)
            cp.record(timed, item)
        export_manifest(cp, tmp_path)
    from_checkpoint = dataclasses.asdict(collect_status(tmp_path))
    (tmp_path / CHECKPOINT_NAME).unlink()
    from_manifest = dataclasses.asdict(collect_status(tmp_path))

    groups = [(g["status"], g["error_type"], g["count"]) for g in from_checkpoint["top_errors"]]
    assert groups == [
        ("error", "ValueError", 2),
        ("error", "OSError", 2),
        ("invalid_input", "InvalidImageError", 2),
        ("crashed", None, 1),
    ]
    assert from_checkpoint["top_errors"][1]["example_path"] == items[9].path
    assert (from_checkpoint["source"], from_manifest["source"]) == ("checkpoint", "manifest")
    ignored = {"source", "updated_at"}  # the checkpoint's last write; the manifest's export time
    assert {k: v for k, v in from_manifest.items() if k not in ignored} == {
        k: v for k, v in from_checkpoint.items() if k not in ignored
    }
    assert from_manifest["images_per_s"] and from_manifest["duration_p50_s"] == 3.5
