"""Helpers for tests that drive ``batchseg`` as a real process (kill -9, Ctrl-C, live runs).

A real subprocess is needed wherever a test kills or interrupts the run, or needs it alive beside
the test: CliRunner runs in the test process, which cannot be SIGKILLed and resumed.

Every process a test starts carries ``BATCHSEG_TEST_TAG=<tag>`` in its environment; its workers and
multiprocessing's resource tracker inherit it, so :func:`tagged_processes` finds whatever a killed
run left behind, whoever its parent is now.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from batchseg.atomic import TEMP_SUFFIX
from batchseg.imageio import read_label_map
from batchseg.store.checkpoint import CHECKPOINT_NAME, connect_readonly

TAG_ENV = "BATCHSEG_TEST_TAG"

#: Columns of a checkpoint row that must never change once the row is ok (a redone image changes them).
ROW_COLUMNS = ("status", "attempts", "started_at", "finished_at", "worker_pid", "mask_path", "n_detections")


def run_args(folder: Path, output: Path, model: Path, *extra: str | Path) -> list[str]:
    """``batchseg run`` on the tiny model: CPU, every detection kept, a generous watchdog."""
    args: list[str | Path] = [
        "run",
        folder,
        "--model",
        model,
        "--output",
        output,
        "--device",
        "cpu",
        "--prompt",
        "roof",
        "--threshold",
        "0",
        "--max-detections",
        "4",
        "--timeout",
        "60",
        "--workers",
        "1",
        *extra,
    ]
    return [str(a) for a in args]


@dataclass
class LiveRun:
    """A ``python -m batchseg`` process started by a test, its tag and where its output goes."""

    proc: subprocess.Popen[bytes]
    tag: str
    started_ns: int
    console: Path
    killed_ns: int | None = None
    reaped_ns: int | None = None  # when kill() saw the parent gone (its exit finished)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL the parent only (its workers must notice by themselves); returns its exit status.

        ``reaped_ns`` is taken once the parent is reaped: its exit is over by then, so the kernel
        has sent its workers their parent-death signal (a parent stuck in an fsync dies only when
        the fsync returns, which can take far longer than the kill itself)."""
        self.killed_ns = time.time_ns()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        status = self.wait(30)
        self.reaped_ns = time.time_ns()
        return status

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the whole process group (the workers ignore it)."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"batchseg did not end within {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.console.read_text(encoding="utf-8", errors="replace")


def start_run(
    args: Sequence[str | Path],
    console: Path,
    *,
    cwd: Path,
    tag: str | None = None,
    env: dict[str, str] | None = None,
) -> LiveRun:
    """Start ``python -m batchseg ARGS`` in its own session (so a group SIGINT reaches only it)."""
    tag = tag or uuid.uuid4().hex
    full_env = {**os.environ, TAG_ENV: tag, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    started = time.time_ns()
    with open(console, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchseg", *[str(a) for a in args]],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
        )
    return LiveRun(proc, tag, started, console)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment carries ``tag``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def describe(procs: Sequence[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"pid {proc.pid} (gone)")
    return "\n".join(lines)


def survivors_after(tag: str, grace: float) -> list[psutil.Process]:
    """The tagged processes still alive after ``grace`` seconds (checked every 0.1 s)."""
    deadline = time.monotonic() + grace
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def worker_pids(tag: str) -> set[int]:
    """Pids of the spawned worker processes among the tagged ones (not the resource tracker)."""
    pids = set()
    for proc in tagged_processes(tag):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd:
            pids.add(proc.pid)
    return pids


def wait_until(
    condition: Callable[[], bool], timeout: float, interval: float = 0.05, while_alive: LiveRun | None = None
) -> bool:
    """Poll ``condition``; False on timeout or when ``while_alive`` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if while_alive is not None and not while_alive.alive():
            return condition()
        time.sleep(interval)
    return False


def names(folder: Path, suffix: str = ".png") -> set[str]:
    """File names in ``folder`` ending with ``suffix`` (one scandir, no stat)."""
    try:
        return {e.name for e in os.scandir(folder) if e.name.endswith(suffix)}
    except FileNotFoundError:
        return set()


def written_after(folder: Path, since_ns: int) -> list[Path]:
    """Finished files under ``folder`` modified after ``since_ns`` (epoch ns). Temp files are left
    out: a write already under way when the parent died may land a moment later (the kernel's
    parent-death signal is not instant), but it never becomes a mask, and the next run deletes it."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(TEMP_SUFFIX) and p.stat().st_mtime_ns > since_ns
    )


def temp_files(output: Path) -> list[Path]:
    return sorted(output.rglob(f"*{TEMP_SUFFIX}"))


def checkpoint_rows(output: Path) -> dict[str, dict[str, Any]]:
    """Every image row of the checkpoint, read-only (safe beside a live run, never checkpoints the log)."""
    path = output / CHECKPOINT_NAME
    if not path.exists():
        return {}
    conn = connect_readonly(path)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(f"SELECT path, {', '.join(ROW_COLUMNS)} FROM images").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise
    finally:
        conn.close()
    return {r["path"]: {c: r[c] for c in ROW_COLUMNS} for r in rows}


def ok_rows(output: Path) -> dict[str, dict[str, Any]]:
    return {p: r for p, r in checkpoint_rows(output).items() if r["status"] == "ok"}


def read_manifests(output: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    images = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    return images, detections


def check_masks(output: Path, images: list[dict[str, Any]], detections: list[dict[str, Any]]) -> None:
    """Each ok image's label map holds exactly labels 1..n; label k == the RLE of detection k.

    Failed images have no detections; a missing one keeps the mask and detections it had."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for det in detections:
        by_path.setdefault(det["path"], []).append(det)
    for row in images:
        if row["status"] == "missing" and row["mask_path"]:
            pass  # its input is gone; its mask and detections stay as they were, still consistent
        elif row["status"] != "ok":
            assert row["path"] not in by_path, f"{row['path']} is {row['status']} but has detections"
            continue
        labels = read_label_map(output / row["mask_path"])
        assert labels.shape == (row["height"], row["width"]), row["path"]
        if row["mask_path"].endswith(".tif"):
            assert_cog(output / row["mask_path"])
        dets = sorted(by_path.get(row["path"], []), key=lambda d: d["index"])
        assert [d["index"] for d in dets] == list(range(1, row["n_detections"] + 1)), row["path"]
        assert set(np.unique(labels).tolist()) <= set(range(len(dets) + 1)), row["path"]
        for det in dets:
            rle = {"size": [det["mask_height"], det["mask_width"]], "counts": det["mask_rle"].encode()}
            decoded = mask_utils.decode(rle).astype(bool)
            assert np.array_equal(decoded, labels == det["index"]), (row["path"], det["index"])
            assert det["area_px"] == int(decoded.sum()), (row["path"], det["index"])


def assert_cog(path: Path) -> None:
    """A tiled or georeferenced label map is a valid cloud-optimized GeoTIFF (rio-cogeo, strict)."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():  # a tiled map of a plain image has no georeference
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        valid, errors, warns = cog_validate(path, strict=True, quiet=True)
    assert valid, (path, errors, warns)


def log_text(output: Path) -> str:
    """All run logs of ``output``, oldest first."""
    return "".join(p.read_text(encoding="utf-8") for p in sorted((output / "logs").glob("*.log")))
