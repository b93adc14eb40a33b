"""The output folder through the real runner (spawned workers, the fault engine of tests/): names
that are not UTF-8, a newcomer's name clash, nested runs, mask files without a record."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _storage import python

from batchseg.atomic import TEMP_SUFFIX
from batchseg.config import RunConfig
from batchseg.records import Status
from batchseg.runner import RunSummary, retry, run
from batchseg.store.checkpoint import CHECKPOINT_NAME

FACTORY = "fault_engine:load_faulty"
needs_bytes_names = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="names are bytes on Linux")


def touch(folder: Path, *names: str | bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = os.path.join(os.fsencode(folder), os.fsencode(name))
        with open(path, "wb") as fh:
            fh.write(b"not decoded by the fault engine")


def run_folder(folder: Path, output: Path) -> RunSummary:
    config = RunConfig(input=folder, prompts=("roof",), output=output, workers=1, progress_interval=60)
    return run(config, factory=FACTORY)


def rows(output: Path) -> dict[str, tuple[object, ...]]:
    with sqlite3.connect(output / CHECKPOINT_NAME) as conn:
        query = "SELECT path, status, attempts, finished_at, error_message FROM images"
        return {r[0]: r[1:] for r in conn.execute(query)}


@needs_bytes_names
def test_a_name_that_is_not_utf8_is_processed_kept_and_retried(tmp_path: Path) -> None:
    folder, output = tmp_path / "in", tmp_path / "out"
    touch(folder, b"caf\xe9.jpg", b"raise_\xe9t\xe9.jpg", "plain.jpg")
    summary = run_folder(folder, output)
    assert summary.counts["ok"] == 2 and summary.counts["error"] == 1 and summary.exit_code == 3

    images = {r["path"]: r for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}
    assert images["caf\\xe9.jpg"]["path_raw"] == b"caf\xe9.jpg"
    assert images["plain.jpg"]["path_raw"] is None
    failed = images["raise_\\xe9t\\xe9.jpg"]
    assert failed["path_raw"] == b"raise_\xe9t\xe9.jpg" and failed["status"] == "error"
    assert "bad pixels in raise_\\xe9t\\xe9.jpg" in failed["error_message"]

    tries = failed["attempts"]
    again = retry(output, factory=FACTORY)  # the checkpoint gives the name back as the OS spells it
    assert again.processed == 1 and rows(output)["raise_\\xe9t\\xe9.jpg"][1] == 2 * tries
    (output / CHECKPOINT_NAME).unlink()  # and so does the manifest, when the checkpoint is lost
    once_more = retry(output, factory=FACTORY)
    assert once_more.processed == 1 and rows(output)["raise_\\xe9t\\xe9.jpg"][:2] == ("error", 3 * tries)
    assert rows(output)["caf\\xe9.jpg"][0] == "ok"


def test_a_newcomer_never_demotes_a_result_its_name_clashes_with(tmp_path: Path) -> None:
    folder, output = tmp_path / "in", tmp_path / "out"
    touch(folder, "a.jpg", "b.jpg")
    assert run_folder(folder, output).exit_code == 0
    before = rows(output)["a.jpg"]

    touch(folder, "A.jpg")  # sorts before a.jpg: discovery alone would keep it
    summary = run_folder(folder, output)
    after = rows(output)
    assert after["a.jpg"] == before  # not redone, not demoted
    status, _attempts, _finished, message = after["A.jpg"]
    assert status == Status.INVALID_INPUT.value and "'a.jpg'" in str(message)
    assert summary.collisions == {"A.jpg": "a.jpg"} and summary.exit_code == 3
    assert run_folder(folder, output).collisions == {"A.jpg": "a.jpg"}  # and so on every later run
    assert rows(output)["a.jpg"] == before


HOLD_NESTED = """
import sys, time
from pathlib import Path
from batchseg.lock import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_cleanup_leaves_a_nested_live_run_alone_and_removes_masks_without_a_record(tmp_path: Path) -> None:
    folder, output = tmp_path / "in", tmp_path / "out"
    touch(folder, "a.jpg")
    nested = output / "masks" / "nested-run"
    nested.mkdir(parents=True)
    child = python(HOLD_NESTED.replace("sys.argv[1]", repr(str(nested))))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        theirs = nested / "masks" / f".x.jpg.png.abc{TEMP_SUFFIX}"
        theirs.parent.mkdir(parents=True)
        theirs.write_bytes(b"half a mask, being written")
        ours = output / "masks" / f".a.jpg.png.abc{TEMP_SUFFIX}"
        orphan = output / "masks" / "sub" / "never-recorded.jpg.png"
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(b"png")
        ours.write_bytes(b"left by a killed run")

        assert run_folder(folder, output).exit_code == 0
        assert theirs.is_file()  # the live nested run's temp file is untouched
        assert not ours.exists() and not orphan.exists()
        log = "".join(p.read_text(encoding="utf-8") for p in (output / "logs").glob("*.log"))
        assert "removed 1 mask file(s) whose result was never recorded" in log
    finally:
        child.kill()
        child.communicate(timeout=30)
