"""Tiled images through ``python -m batchseg run`` with what a model and the world send: tiles that
miss an object their neighbours report cut, and a strip too thin to tile. Each run is a real
process (its workers and merge helpers too), and none of them may be left when it ends
(``no_process_left``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from batchseg.tiles.progress import PROGRESS_DIR
from batchseg.tiles.sparse import SparseMask

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("no_process_left")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m batchseg ARGS`` with tests/ on the path (for ``--engine tile_engines:...``)."""
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "batchseg", *(str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def _manifests(output: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    images = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    return {row["path"]: row for row in images}, detections


def _red(width: int, height: int, boxes: list[tuple[int, int, int, int]]) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    for x0, y0, x1, y1 in boxes:
        pixels[y0:y1, x0:x1] = (255, 0, 0)
    return Image.fromarray(pixels)


def test_an_object_the_lower_tiles_miss_and_the_upper_tiles_cut_is_one_detection(tmp_path: Path) -> None:
    """1000 x 1000 in tiles of 400 with overlap 100 (cuts between rows and columns at 350): a
    30 x 50 object at x 360-390, y 370-420 lies in the cores of the lower tiles, which miss it;
    the two upper tiles report it cut at their bottom edge (y 400). The image is ok with one
    detection: what the upper tiles saw."""
    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    _red(1000, 1000, [(360, 370, 390, 420)]).save(folder / "seam.png")
    done = _run(
        "run", folder, "--engine", "tile_engines:misses_below", "--prompt", "red",
        "--tile", "400", "--tile-overlap", "100", "--workers", "1", "--output", output,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    images, detections = _manifests(output)
    assert images["seam.png"]["status"] == "ok" and images["seam.png"]["n_detections"] == 1
    (det,) = detections
    assert (det["index"], det["area_px"], det["tiles"]) == (1, 30 * 30, 2)
    assert (det["box_x0"], det["box_y0"], det["box_x1"], det["box_y1"]) == (360, 370, 390, 400)
    labels = tifffile.imread(output / images["seam.png"]["mask_path"])
    mask = SparseMask.from_rle(det["mask_rle"], (0, 0, 1000, 1000), 1000)
    assert int((labels == 1).sum()) == mask.area == 900 and labels.max() == 1
    assert (labels[370:400, 360:390] == 1).all()


def test_a_strip_too_thin_to_tile_is_invalid_input_at_once_and_the_run_goes_on(tmp_path: Path) -> None:
    """A 20000 x 40 strip at --tile 512 would be 999 tiles of 40 px: it is refused from its header,
    before any tile runs, with a message saying why and what to do; the other images run."""
    folder, output = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    _red(20000, 40, [(100, 5, 130, 30)]).save(folder / "strip.png")
    _red(1500, 900, [(500, 300, 560, 380)]).save(folder / "wide.png")  # tiled: 4 x 2 tiles of 512
    _red(300, 200, [(10, 10, 40, 50)]).save(folder / "small.png")  # whole
    done = _run(
        "run", folder, "--engine", "batchseg.engines.threshold:load", "--prompt", "red",
        "--tile", "512", "--workers", "1", "--output", output,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    images, detections = _manifests(output)
    strip = images["strip.png"]
    assert (strip["status"], strip["error_type"]) == ("invalid_input", "InvalidImageError")
    assert strip["attempts"] == 1
    message = strip["error_message"]
    for part in ("20000 x 40", "999 tiles of 40 x 40 px", "at least 128 px", "--tile off"):
        assert part in message, message
    (log,) = (output / "logs").glob("*.log")
    assert f"invalid_input strip.png: InvalidImageError: {message}" in log.read_text(encoding="utf-8")
    assert not (output / PROGRESS_DIR / "strip.png").exists()  # no tile of it ever finished
    assert images["wide.png"]["status"] == images["small.png"]["status"] == "ok"
    areas = sorted((d["path"], d["area_px"]) for d in detections)
    assert areas == [("small.png", 30 * 40), ("wide.png", 60 * 80)]
