"""A run written through the library resumes through the CLI, and one of the CLI through the library.

``--tile`` not given is resolved against the output folder's run by one rule
(``store.db.resolve_tile``) wherever a run is opened: ``auto`` for a new folder, the stored value
for an existing one, ``off`` for a folder whose run has no ``tile`` at all (0.1.0), ``auto`` for a
run that stored None (written through the library before the rule). ``benchmarks/scale.py`` builds
its folder this way.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _runs import checkpoint_rows
from _storage import make_config, ok_result
from conftest import make_image

from batchseg.config import RunConfig
from batchseg.discover import discover
from batchseg.errors import ConfigMismatchError
from batchseg.imageio import mask_relpath
from batchseg.records import Item, ItemResult, Status
from batchseg.store.checkpoint import CHECKPOINT_NAME, Checkpoint

TESTS = Path(__file__).parent


def _library_checkpoint(images: Path, output: Path, model: Path) -> str:
    """A checkpoint written through ``Checkpoint.open`` with every option but the required ones at
    its default, one image recorded ok (with its mask file); returns that image's path."""
    config = RunConfig(input=images, prompts=("roof",), model=str(model), output=output)
    items = discover(images).items
    done = items[0]
    with Checkpoint.open(output, config) as cp:
        cp.plan(items, use_hash=False)
        mask = output / mask_relpath(done.path)
        mask.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / done.path, mask)  # any PNG: the row is what the resume reads
        now = time.time()
        result = ItemResult(
            done.path,
            Status.OK,
            width=1,
            height=1,
            mask_path=mask_relpath(done.path),
            started_at=now,
            finished_at=now,
        )
        cp.record_many([(result, done)])
    return done.path


def _cli_run(images: Path, output: Path, model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "batchseg", "run", str(images), "--prompt", "roof"]
    command += ["--model", str(model), "--output", str(output), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_a_checkpoint_the_library_wrote_with_every_default_resumes_through_the_cli(
    tiny_model: Path, tmp_path: Path
) -> None:
    images = tmp_path / "aerial"
    for seed, name in enumerate(("a", "b", "c")):
        make_image(images / f"{name}.png", (64, 48), seed)
    output = tmp_path / "out"
    done = _library_checkpoint(images, output, tiny_model)
    with Checkpoint.open_existing(output, read_only=True) as cp:
        assert cp.stored_config()["tile"] == "auto"  # resolved as the CLI resolves it for a new folder
    before = checkpoint_rows(output)[done]

    resumed = _cli_run(images, output, tiny_model)  # no --new-run, no --tile

    assert resumed.returncode == 0, resumed.stderr
    rows = checkpoint_rows(output)
    assert {row["status"] for row in rows.values()} == {"ok"} and len(rows) == 3
    assert rows[done]["started_at"] == before["started_at"]  # recorded by the library: not run again
    # And the folder the CLI resumed opens through the library again, tile still not given.
    config = RunConfig(input=images, prompts=("roof",), model=str(tiny_model), output=output)
    with Checkpoint.open(output, config) as cp:
        assert cp.counts()["ok"] == 3


def test_a_stored_none_is_auto_and_an_absent_tile_is_off(tmp_path: Path) -> None:
    """A run that stored ``tile: null`` (opened through the library before the rule) resumes as
    ``auto`` through the library; a 0.1.0 run (no ``tile`` key) resumes as ``off`` through the
    library too, as the CLI resumes it."""
    stored_none = tmp_path / "none"
    with Checkpoint.open(stored_none, make_config(tile="auto")):
        pass
    with sqlite3.connect(stored_none / CHECKPOINT_NAME) as db:  # as the library stored it before
        fingerprint, config = db.execute("SELECT fingerprint, config FROM run").fetchone()
        fingerprint, config = json.loads(fingerprint), json.loads(config)
        fingerprint["tile"] = config["tile"] = None
        db.execute("UPDATE run SET fingerprint=?, config=?", (json.dumps(fingerprint), json.dumps(config)))
    with Checkpoint.open(stored_none, make_config(tile=None)) as cp:
        assert cp.stored_config()["tile"] == "auto"
    with pytest.raises(ConfigMismatchError, match="tile"):
        Checkpoint.open(stored_none, make_config(tile="off"))

    old = tmp_path / "old"
    shutil.copytree(TESTS / "data" / "run-made-by-0.1.0", old)
    with Checkpoint.open(old, make_config(tile=None)) as cp:
        assert cp.stored_config()["tile"] == "off" and cp.counts()["ok"] == 1
    with pytest.raises(ConfigMismatchError, match="tile"):
        Checkpoint.open(old, make_config(tile="auto"))


def test_the_merged_plan_finds_every_mask_and_orphan_whatever_the_order_of_names(tmp_path: Path) -> None:
    """``plan`` merges the rows with the items and the mask paths with a walk of masks/, each in
    code point order: names that sort differently as paths than as folder entries ("a-b" < "a/"
    < "a0"; "." < "/"), a mask gone, an orphan in a nested folder. Items in discovery's order and
    shuffled (the rows then looked up by path) plan the same."""
    names = ["a-b.jpg", "a.jpg", "a/x.jpg", "a/y/z.jpg", "a0.jpg", "b.jpg", "zz/q.jpg", "é.jpg"]
    items = [Item(name, 100, 1_700_000_000_000_000_000) for name in names]
    assert items == sorted(items, key=lambda i: i.path)
    for order in ("sorted", "shuffled"):
        folder = tmp_path / order
        with Checkpoint.open(folder, make_config()) as cp:
            cp.record_many([(ok_result(item, folder), item) for item in items if item.path != "zz/q.jpg"])
        (folder / mask_relpath("a/x.jpg")).unlink()  # its image is done again
        orphan = folder / mask_relpath("a/y/never-recorded.jpg")
        orphan.write_bytes(b"\x89PNG")
        other = folder / "masks" / "a" / "notes.txt"  # not a mask name: left alone
        other.write_text("someone's file")
        given = items if order == "sorted" else items[::-1]
        with Checkpoint.open(folder, make_config()) as cp:
            plan = cp.plan(given, use_hash=False)
        assert sorted(i.path for i in plan.pending) == ["a/x.jpg", "zz/q.jpg"], order
        assert plan.counts["mask_missing"] == 1 and plan.counts["new"] == 1, order
        assert plan.counts["done"] == 6 and plan.counts["orphan_masks"] == 1, order
        assert not orphan.exists() and other.exists()
        assert all((folder / mask_relpath(n)).is_file() for n in names if n not in ("a/x.jpg", "zz/q.jpg"))
