"""Shared fixtures: a tiny random SAM3 checkpoint built once, and small image folders on tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised SAM3 saved with save_pretrained, loaded back like real weights.

    Built in a child process so the test process (the parent of every run) never imports torch.
    """
    folder = tmp_path_factory.mktemp("tiny-sam3")
    code = (
        "import sys, pathlib; from batchseg.engines.sam3.tiny_model import build_tiny_checkpoint as b; "
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests (large generated folders, long kill loops) run only when asked: -m slow."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
