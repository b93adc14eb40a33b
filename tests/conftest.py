"""Shared fixtures: a tiny random SAM3 checkpoint built once, and small image folders on tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from PIL import Image, ImageDraw

#: Set for the test by ``no_process_left``; every process the test starts inherits it.
PROCESS_MARK_ENV = "BATCHSEG_TEST_PROCESS_MARK"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised SAM3 saved with save_pretrained, loaded back like real weights.

    Built in a child process so the test process (the parent of every run) never imports torch.
    """
    folder = tmp_path_factory.mktemp("tiny-sam3")
    code = (
        "import sys, pathlib; from batchseg.random_sam3 import build_tiny_checkpoint as b; "
        "b(pathlib.Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return folder


def make_image(path: Path, size: tuple[int, int] = (160, 120), seed: int = 0) -> Path:
    """A small picture with a few rectangles, saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (60 + seed * 7 % 100, 120, 70))
    draw = ImageDraw.Draw(img)
    for k in range(3):
        x = (seed * 37 + k * 41) % max(1, size[0] - 30)
        y = (seed * 53 + k * 29) % max(1, size[1] - 30)
        draw.rectangle([x, y, x + 25, y + 20], fill=(200, 200 - 30 * k, 180))
    img.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Five images in two folders, mixed formats and sizes."""
    root = tmp_path / "aerial"
    make_image(root / "a.jpg", (160, 120), 1)
    make_image(root / "b.png", (120, 160), 2)
    make_image(root / "sub" / "c.jpg", (200, 100), 3)
    make_image(root / "sub" / "d.png", (96, 96), 4)
    make_image(root / "sub" / "deeper" / "e.jpg", (130, 170), 5)
    return root


def marked_processes(mark: str) -> list[psutil.Process]:
    """Live processes started under ``mark`` (a run, its workers, their merge helpers), found by
    the environment they inherited, whoever their parent is now. The test process's own
    multiprocessing resource tracker serves every later test too: it is not the run's."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(PROCESS_MARK_ENV) != mark:
                continue
            if proc.ppid() == os.getpid() and any("resource_tracker" in part for part in proc.cmdline()):
                continue
            found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(autouse=True)
def no_process_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Fails the test if a process it started (a ``batchseg run``, CLI in this process or not, its
    workers and their merge helpers) is still alive 30 polls of 0.1 s after the test; whatever
    is left is killed so the next test starts clean. Yields the mark its processes carry. Every
    test has it: after any test of a run, no process of that run is left."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv(PROCESS_MARK_ENV, mark)
    yield mark
    for _ in range(30):
        left = marked_processes(mark)
        if not left:
            return
        time.sleep(0.1)
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            continue
    pytest.fail("processes of the test's run left behind:\n" + "\n".join(described))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests (large generated folders, long kill loops) run only when asked: -m slow."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
