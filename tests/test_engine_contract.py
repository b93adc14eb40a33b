"""The public engine contract: engines from outside the package run through ``python -m batchseg``.

``stripe_engine`` (tests/) and the documentation's example engine (docs/engines.md) are loaded with
``--engine``; the first in a real ``python -m batchseg run`` subprocess, as a user would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stripe_engine
from _runs import check_masks, checkpoint_rows, read_manifests
from click.testing import CliRunner, Result
from conftest import make_image
from PIL import Image, ImageDraw

from batchseg.cli import cli
from batchseg.imageio import read_label_map
from batchseg.records import FailureCategory, Item, Status, failure_result
from batchseg.worker.contract import Capabilities

TESTS_DIR = Path(stripe_engine.__file__).resolve().parent
ENGINES_PAGE = TESTS_DIR.parent / "docs" / "engines.md"


def python_m_batchseg(*args: str | Path, path: Path = TESTS_DIR) -> subprocess.CompletedProcess[str]:
    """``python -m batchseg ARGS`` with ``path`` on PYTHONPATH, where the engine's module lives."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "batchseg", *(str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_an_engine_from_outside_the_package_runs_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for k, size in enumerate([(40, 30), (25, 61), (33, 33), (50, 20)]):
        make_image(folder / f"img{k}.png", size, k)
    (folder / "broken.png").write_text("not an image")
    output = tmp_path / "out"
    args = ("run", folder, "--engine", "stripe_engine:load", "--output", output, "--workers", "1")
    done = python_m_batchseg(*args, "--prompt", "top", "--prompt", "middle", "--prompt", "bottom")
    assert done.returncode == 3, done.stdout + done.stderr  # broken.png is invalid_input
    images, detections = read_manifests(output)
    check_masks(output, images, detections)
    status = {row["path"]: row["status"] for row in images}
    assert status == {**{f"img{k}.png": "ok" for k in range(4)}, "broken.png": "invalid_input"}
    for row in images:
        if row["status"] == "ok":
            labels = read_label_map(output / row["mask_path"])
            assert np.array_equal(labels, stripe_engine.bands(row["height"], row["width"], 3))
            assert row["device"] == "cpu stripes" and row["worker_pid"] and row["duration_s"] >= 0
    assert sorted({d["prompt"] for d in detections}) == ["bottom", "middle", "top"]
    # The same command again: everything is done, nothing runs.
    again = python_m_batchseg(*args, "--prompt", "top", "--prompt", "middle", "--prompt", "bottom")
    assert again.returncode == 3 and "processed 0 images" in again.stdout, again.stdout + again.stderr


def test_an_output_failure_ends_the_run_with_exit_1_and_leaves_the_image_to_do(tmp_path: Path) -> None:
    """The worker's writer, not the engine, finds the output folder failing: a folder where the
    label map of unwritable.png goes cannot be replaced by a file (an OSError)."""
    folder = tmp_path / "in"
    for name in ("a.png", "b.png", "unwritable.png"):
        make_image(folder / name, (20, 20))
    output = tmp_path / "out"
    (output / "masks" / "unwritable.png.png").mkdir(parents=True)
    args = ("run", folder, "--engine", "stripe_engine:load", "--output", output, "--prompt", "p")
    result = invoke(*args, "--workers", "1")
    assert result.exit_code == 1, result.output
    assert f"cannot write {output / 'masks' / 'unwritable.png.png'}" in result.output
    rows = checkpoint_rows(output)
    assert rows["unwritable.png"]["status"] not in {"ok", "error"}, "an output failure is never the image's"
    assert rows["unwritable.png"]["attempts"] in (0, None), "and it is not retried"


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ("no_such_module:load", "there is no module no_such_module"),
        ("stripe_engine:nothing", "stripe_engine has no function nothing"),
    ],
)
def test_an_engine_that_cannot_be_found_is_a_clear_exit_1(tmp_path: Path, engine: str, message: str) -> None:
    make_image(tmp_path / "in" / "a.png", (20, 20))
    result = invoke("run", tmp_path / "in", "--engine", engine, "--output", tmp_path / "out", "--prompt", "p")
    assert result.exit_code == 1 and message in result.output, result.output


def documented_engine() -> str:
    """The code block of the "Bring your own engine" section of the documentation (docs/engines.md)."""
    section = (
        ENGINES_PAGE.read_text(encoding="utf-8").split("## Bring your own engine", 1)[1].split("\n## ", 1)[0]
    )
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section shows one complete engine"
    return str(blocks[0])


def test_the_documented_engine_runs_as_shown(tmp_path: Path) -> None:
    code = documented_engine()
    assert len(code.strip().splitlines()) <= 40, "the model call and little else: the worker writes"
    (tmp_path / "bright.py").write_text(code, encoding="utf-8")
    folder = tmp_path / "in"
    for k in range(3):
        make_image(folder / f"{k}.png", (60, 40), k)
    output = tmp_path / "out"
    args = (
        "run",
        folder,
        "--engine",
        "bright:load",
        "--output",
        output,
        "--prompt",
        "190",
        "--prompt",
        "100",
    )
    done = python_m_batchseg(*args, path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    images, detections = read_manifests(output)
    check_masks(output, images, detections)
    assert {d["prompt"] for d in detections} == {"190", "100"}
    refused = python_m_batchseg(
        "run",
        folder,
        "--engine",
        "bright:load",
        "--output",
        tmp_path / "o2",
        "--prompt",
        "roof",
        path=tmp_path,
    )
    assert refused.returncode == 1 and "roof" in refused.stdout + refused.stderr
    # Pixels in: the same engine tiles, and a file that is not an image is the reader's failure.
    (folder / "broken.png").write_bytes(b"not a png")
    make_image(folder / "big.png", (150, 100), 7)
    tiled = python_m_batchseg(*args[:5], tmp_path / "tiled", *args[6:], "--tile", "64", path=tmp_path)
    assert tiled.returncode == 3, tiled.stdout + tiled.stderr
    images, detections = read_manifests(tmp_path / "tiled")
    check_masks(tmp_path / "tiled", images, detections)
    by_path = {row["path"]: row for row in images}
    assert by_path["broken.png"]["status"] == "invalid_input"
    assert (by_path["big.png"]["status"], by_path["big.png"]["mask_path"]) == ("ok", "masks/big.png.tif")


FORGER = """
from batchseg.records import ItemResult, Status
from batchseg.worker.contract import Capabilities


class Forger:
    capabilities = Capabilities(device="cpu forger")

    def process(self, items, heartbeat):
        return [ItemResult(item.path, Status.OK, width=60, height=40) for item in items]

    def close(self):
        pass


def load(spec, slot):
    return Forger()
"""


def test_an_engine_that_reports_ok_itself_fails_the_image(tmp_path: Path) -> None:
    """An ok row needs the writer's files: an engine's own ok ItemResult (no label map behind it)
    fails its image with EngineContractError instead of recording an ok the folder contradicts."""
    (tmp_path / "forger.py").write_text(FORGER, encoding="utf-8")
    folder, output = tmp_path / "in", tmp_path / "out"
    make_image(folder / "a.png", (60, 40))
    args = ("run", folder, "--engine", "forger:load", "--prompt", "roof", "--output", output)
    done = python_m_batchseg(*args, path=tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    (row,) = read_manifests(output)[0]
    assert (row["status"], row["error_type"]) == ("error", "EngineContractError")
    assert "a Segmentation, which the worker writes" in row["error_message"]
    assert not (output / "masks").exists() or not any((output / "masks").iterdir())


def draw_patches(path: Path, size: tuple[int, int]) -> None:
    """Patches of three exact colours on black, some across the seams of 64-pixel tiles, two of one
    colour touching only at a corner (one 8-connected patch)."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 80, 40), fill=(255, 0, 0))
    draw.ellipse((50, 50, 130, 120), fill=(0, 0, 255))
    draw.rectangle((140, 5, 150, 140), fill=(0, 255, 0))
    draw.rectangle((151, 141, 170, 148), fill=(0, 255, 0))  # meets the strip above at a corner
    draw.rectangle((2, 100, 30, 140), fill=(255, 0, 0))
    image.save(path)


def test_an_engine_of_instances_runs_whole_and_tiled_as_exact_as_the_colour_engine(tmp_path: Path) -> None:
    """tests/patch_engine.py (pixels in, instances out, no file written) through ``python -m
    batchseg run``: a small image whole, a large one in 64-pixel tiles; its rows and label maps
    equal the colour engine's, byte for byte."""
    folder = tmp_path / "in"
    folder.mkdir()
    draw_patches(folder / "large.png", (180, 150))
    draw_patches(folder / "small.png", (60, 45))
    runs = {}
    for engine in ("patch_engine:load", "batchseg.engines.threshold:load"):
        output = tmp_path / engine.partition(":")[0]
        prompts = ("--prompt", "red", "--prompt", "blue", "--prompt", "lime")
        done = python_m_batchseg(
            "run", folder, "--engine", engine, "--output", output, "--tile", "64", *prompts
        )
        assert done.returncode == 0, done.stdout + done.stderr
        images, detections = read_manifests(output)
        check_masks(output, images, detections)
        runs[engine] = output, images, detections
    (patch, images, detections), (colour, colour_images, colour_detections) = runs.values()
    image_keys = ("path", "status", "width", "height", "mask_path", "n_detections")
    assert [{k: row[k] for k in image_keys} for row in images] == [
        {k: row[k] for k in image_keys} for row in colour_images
    ]
    masks = {row["path"]: row["mask_path"] for row in images}
    assert masks == {"large.png": "masks/large.png.tif", "small.png": "masks/small.png.png"}  # tiled, whole
    for mask in masks.values():
        assert (patch / mask).read_bytes() == (colour / mask).read_bytes()
    kept = ("path", "prompt", "index", "score", "box_x0", "box_y0", "box_x1", "box_y1", "area_px", "mask_rle")
    assert {k for k in kept} <= set(detections[0])
    assert [{k: d[k] for k in kept} for d in detections] == [
        {k: d[k] for k in kept} for d in colour_detections
    ]
    assert {(d["path"], d["prompt"]) for d in detections} >= {("large.png", "lime"), ("small.png", "red")}
    assert len([d for d in detections if d["path"] == "large.png" and d["prompt"] == "lime"]) == 1


def test_capabilities_are_checked_when_made() -> None:
    assert Capabilities("cpu").task_size == 1
    for bad in ({"device": ""}, {"device": "cpu", "task_size": 0}, {"device": "cpu", "heartbeat_every": -1}):
        with pytest.raises(TypeError):
            Capabilities(**bad)  # type: ignore[arg-type]


def test_failure_result_from_an_exception() -> None:
    item = Item("a.png", 1, 1)
    try:
        raise ValueError("bad pixels")
    except ValueError as exc:
        result = failure_result(item, Status.ERROR, exc=exc, started_at=5.0)
    assert (result.error_type, result.error_message, result.category) == ("ValueError", "bad pixels", "image")
    assert result.traceback and "bad pixels" in result.traceback and result.worker_pid == os.getpid()
    assert result.started_at == 5.0 and (result.finished_at or 0) > 5.0
    crashed = failure_result(
        item, Status.CRASHED, message="gone", exit_code=-9, category=FailureCategory.OUTPUT
    )
    assert (crashed.traceback, crashed.exit_code, crashed.category) == (None, -9, FailureCategory.OUTPUT)


def test_boxes_of_an_engine_that_gave_none_are_the_pixel_edges_of_each_label() -> None:
    """The writer's boxes for instances without one, found in one pass, equal each label's own."""
    from batchseg.worker.writer import _boxes

    rng = np.random.default_rng(3)
    labels = np.zeros((37, 53), np.uint16)
    for k in range(1, 9):
        x, y = rng.integers(0, 45), rng.integers(0, 30)
        labels[y : y + rng.integers(1, 8), x : x + rng.integers(1, 9)] = k
    found = _boxes(labels, 8)
    for k in np.unique(labels[labels > 0]).tolist():
        ys, xs = np.nonzero(labels == k)
        assert found[k] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), k
