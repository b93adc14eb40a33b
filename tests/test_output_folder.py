"""The output folder through the real runner (spawned workers, the fault engine of tests/): names
that are not UTF-8, a newcomer's name clash, nested runs, mask files without a record, and a run
refused for its configuration, which leaves the folder as it found it."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _storage import python
from conftest import make_image
from PIL import Image

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


# ---- a configuration error writes nothing ------------------------------------------------------------

THRESHOLD = "batchseg.engines.threshold:load"
#: Runs the CLI in a child and says on stderr, at exit, whether it imported torch: the parent of a
#: run never does, not even to check a configuration.
CLI_SAYING_TORCH = """
import atexit, sys
atexit.register(lambda: sys.stderr.write(f"\\ntorch imported: {'torch' in sys.modules}\\n"))
from batchseg.cli import main
sys.argv = ["batchseg", *sys.argv[1:]]
main()
"""
#: (extra options, exit code, words of the message): each refused before anything is written.
CONFIG_ERRORS = {
    "gsd-without-tiles": (["--tile", "off", "--gsd", "0.3"], 2, "--gsd resamples tiles"),
    "overlap-past-half-a-tile": (["--tile", "256", "--tile-overlap", "200"], 2, "--tile-overlap must be"),
    "tile-match-0": (["--tile-match", "0"], 2, "--tile-match must be more than 0"),
    "a-bad-value": (["--timeout", "soon"], 2, "expected seconds > 0"),
    "the-engine-refuses-a-prompt": (["--prompt", "no-such-colour"], 1, "is not one"),
    "the-input-folder-is-gone": (["--input-gone"], 1, "does not exist"),
}


def batchseg_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI_SAYING_TORCH, *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=300,
    )


def colour_run(folder: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    if "--input-gone" in extra:
        folder, extra = folder.parent / "not-mounted", tuple(e for e in extra if e != "--input-gone")
    prompt = [] if "--prompt" in extra else ["--prompt", "red"]
    return batchseg_cli("run", folder, "--engine", THRESHOLD, *prompt, "--output", output, *extra)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (folders as None) with its bytes: what 'as it found it' means."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")
    } | {".": None}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A colour folder and the output folder of its finished run."""
    root = tmp_path_factory.mktemp("finished")
    folder = root / "in"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (40, 30), colour).save(folder / name)
    done = colour_run(folder, root / "out")
    assert done.returncode == 0, done.stderr
    return folder, root / "out"


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_a_configuration_error_leaves_the_output_folder_as_it_found_it(
    finished_run: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    extra, code, words = CONFIG_ERRORS[case]
    folder, finished = finished_run
    # A folder that is not there stays away, so the corrected command just runs.
    fresh = tmp_path / "fresh"
    refused = colour_run(folder, fresh, *extra)
    assert (refused.returncode, words in refused.stderr) == (code, True), refused.stderr
    assert "torch imported: False" in refused.stderr
    assert not fresh.exists()
    corrected = colour_run(folder, fresh)
    assert corrected.returncode == 0, corrected.stderr
    assert "torch imported: False" in corrected.stderr

    # The folder of a finished run stays byte for byte (no log, lock or checkpoint file added).
    kept = tmp_path / "kept"
    shutil.copytree(finished, kept)
    before = snapshot(kept)
    refused = colour_run(folder, kept, *extra)
    assert (refused.returncode, words in refused.stderr) == (code, True), refused.stderr
    assert snapshot(kept) == before


def test_another_runs_settings_are_refused_without_touching_its_folder(
    finished_run: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, finished = finished_run
    kept = tmp_path / "kept"
    shutil.copytree(finished, kept)
    before = snapshot(kept)
    refused = colour_run(folder, kept, "--tile", "512")
    assert refused.returncode == 1 and 'holds a run made with other settings:\n  --tile: "auto" -> "512"' in (
        refused.stderr
    ), refused.stderr
    assert snapshot(kept) == before


def test_an_overlap_only_the_loaded_engine_refuses_leaves_a_new_folder_as_it_was(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Under --tile auto the tile is the model's input (112 px for the tiny SAM3): only a worker
    knows, after the run began writing. A folder that held no run is left as it was found."""
    folder = tmp_path / "in"
    make_image(folder / "a.png", (64, 48))
    args = ["run", folder, "--model", tiny_model, "--prompt", "roof", "--device", "cpu", "--workers", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (tmp_path / "absent", empty):
        refused = batchseg_cli(*args, "--output", output, "--tile-overlap", "60")
        assert refused.returncode == 1 and "--tile-overlap must be from 2 to half the tile side (56)" in (
            refused.stderr
        ), refused.stderr
        assert "torch imported: False" in refused.stderr
    assert not (tmp_path / "absent").exists() and list(empty.iterdir()) == []
    assert batchseg_cli(*args, "--output", empty, "--tile-overlap", "20").returncode == 0
