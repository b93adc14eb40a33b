"""``batchseg demo`` as a newcomer runs it: the proof of an install, end to end in real processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def test_the_demo_runs_the_whole_pipeline_and_says_what_it_made(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "batchseg", "demo", "--output", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    console = done.stdout + done.stderr
    assert "random weights" in console and "ok=6" in console
    assert "Writing model shards" not in console  # no library progress bar in the middle of ours
    images = pq.read_table(tmp_path / "demo" / "manifest" / "images.parquet").to_pylist()
    assert len(images) == 6 and {row["status"] for row in images} == {"ok"}
    for row in images:
        assert (tmp_path / "demo" / row["mask_path"]).is_file()
    assert sum(row["n_detections"] for row in images) > 0  # threshold 0: the random model finds some
    assert list((tmp_path / "demo" / "logs").glob("*.log"))


def test_the_worker_builds_the_demo_model_once(tmp_path: Path) -> None:
    """The demo's worker builds the tiny model where it is missing (one import of torch instead of
    a build process and then a worker) and a later demo keeps it."""
    command = [sys.executable, "-m", "batchseg", "demo", "--output", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    weights = tmp_path / "demo-model" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    log = next((tmp_path / "demo" / "logs").glob("*.log")).read_text(encoding="utf-8")
    assert "batchseg.engines.demo:load_engine" not in log.split("config engine = ")[1].splitlines()[0]
    shutil.rmtree(tmp_path / "demo")  # a fresh run, the model kept
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ok=6" in again.stdout + again.stderr
    assert weights.stat().st_mtime_ns == built
