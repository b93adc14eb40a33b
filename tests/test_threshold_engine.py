"""The colour threshold engine: its masks are the drawn shapes, pixel for pixel, through a real run."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from _writing import written
from click.testing import CliRunner, Result
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from batchseg.cli import cli
from batchseg.config import DEFAULT_ENGINE, DEFAULT_MODEL, RunConfig
from batchseg.engines.threshold import MODEL_ID, TOLERANCE, components, load, parse_colour
from batchseg.errors import ConfigError
from batchseg.imageio import read_label_map
from batchseg.records import Item, Status
from batchseg.worker.contract import EngineSpec, recorded_model

ENGINE = "batchseg.engines.threshold:load"
SIZE = (160, 120)
GREY = (90, 90, 90)

#: Each shape: (prompt, colour, how to draw it). Drawn on the picture in its colour, and alone in
#: white on black for the expected mask: the same Pillow call makes both.
Draw = tuple[str, dict[str, Any]]
SHAPES: dict[str, tuple[str, list[Draw]]] = {
    "rectangle": ("red", [("rectangle", {"xy": [4, 6, 33, 21]})]),
    "disc": ("red", [("ellipse", {"xy": [45, 8, 78, 41]})]),
    "ring": ("blue", [("ellipse", {"xy": [90, 10, 150, 70], "outline": 1, "width": 7})]),
    # Two squares that touch only at a corner: one 8-connected instance.
    "diagonal pair": (
        "lime",
        [("rectangle", {"xy": [10, 60, 29, 79]}), ("rectangle", {"xy": [30, 80, 44, 94]})],
    ),
    "lone pixel": ("#ff00ff", [("point", {"xy": [150, 110]})]),
}
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "lime": (0, 255, 0), "#ff00ff": (255, 0, 255)}


def draw(target: ImageDraw.ImageDraw, steps: list[Draw], fill: Any) -> None:
    for method, kwargs in steps:
        kwargs = dict(kwargs)
        if "outline" in kwargs:
            kwargs["outline"] = fill
        else:
            kwargs["fill"] = fill
        getattr(target, method)(**kwargs)


def expected_mask(steps: list[Draw]) -> np.ndarray:
    alone = Image.new("L", SIZE, 0)
    draw(ImageDraw.Draw(alone), steps, 255)
    return np.asarray(alone) > 0


def make_picture(path: Path) -> None:
    picture = Image.new("RGB", SIZE, GREY)
    pen = ImageDraw.Draw(picture)
    for prompt, steps in SHAPES.values():
        draw(pen, steps, COLOURS[prompt])
    # Off by the tolerance in every channel still matches; one level more does not.
    pen.rectangle([120, 90, 129, 99], fill=(255 - TOLERANCE, TOLERANCE, TOLERANCE))
    pen.rectangle([135, 90, 144, 99], fill=(255 - TOLERANCE - 1, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_threshold(folder: Path, output: Path, *prompts: str) -> Result:
    flags = [part for prompt in prompts for part in ("--prompt", prompt)]
    return invoke("run", folder, "--engine", ENGINE, "--output", output, "--workers", "1", *flags)


def test_the_masks_are_the_drawn_shapes_pixel_for_pixel(tmp_path: Path) -> None:
    make_picture(tmp_path / "in" / "shapes.png")
    (tmp_path / "in" / "notes.png").write_text("not an image")
    output = tmp_path / "out"
    result = run_threshold(tmp_path / "in", output, "red", "blue", "lime", "#ff00ff")
    assert result.exit_code == 3, result.output  # notes.png is invalid_input
    images = {r["path"]: r for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}
    assert images["notes.png"]["status"] == "invalid_input"
    row = images["shapes.png"]
    assert (row["status"], row["width"], row["height"]) == ("ok", *SIZE)
    labels = read_label_map(output / row["mask_path"])
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()

    found: dict[str, list[np.ndarray]] = {}
    for det in sorted(detections, key=lambda d: d["index"]):
        rle = {"size": [det["mask_height"], det["mask_width"]], "counts": det["mask_rle"].encode()}
        mask = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(mask, labels == det["index"])  # the RLE and the label map agree
        assert det["score"] == 1.0 and det["area_px"] == mask.sum()
        ys, xs = np.nonzero(mask)
        box = (det["box_x0"], det["box_y0"], det["box_x1"], det["box_y1"])
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # pixel edges
        found.setdefault(det["prompt"], []).append(mask)

    for name, (prompt, steps) in SHAPES.items():
        expected = expected_mask(steps)
        matches = [m for m in found[prompt] if np.array_equal(m, expected)]
        assert len(matches) == 1, f"the {name} is not one instance equal to the drawn shape"
    ring = expected_mask(SHAPES["ring"][1])
    assert not ring[40, 120], "the ring's hole is not part of it"
    # red: rectangle, disc and the square within the tolerance; the one past it is no instance.
    tolerance_square = np.zeros(SIZE[::-1], bool)
    tolerance_square[90:100, 120:130] = True
    assert len(found["red"]) == 3 and any(np.array_equal(m, tolerance_square) for m in found["red"])
    assert (len(found["blue"]), len(found["lime"]), len(found["#ff00ff"])) == (1, 1, 1)
    assert labels[95, 140] == 0


def test_a_window_gives_boxes_in_the_image_frame_and_no_label_map(tmp_path: Path) -> None:
    make_picture(tmp_path / "in" / "shapes.png")
    config = RunConfig(input=tmp_path / "in", prompts=("red",), output=tmp_path / "out")
    engine = load(EngineSpec(config, ENGINE), 0)
    window = (40, 0, 100, 50)  # holds the whole disc and none of the rectangle
    beats: list[tuple[Any, Any]] = []
    stat = (tmp_path / "in" / "shapes.png").stat()
    item = Item("shapes.png", stat.st_size, stat.st_mtime_ns, window=window)
    (result,) = written(engine, [item], lambda finished=(), reached=None: beats.append((finished, reached)))
    assert result.status is Status.OK and result.mask_path is None
    assert not (tmp_path / "out").exists(), "a window writes no label map"
    (det,) = result.detections
    disc = expected_mask(SHAPES["disc"][1])
    mask = mask_utils.decode({"size": [50, 60], "counts": det.mask_rle.encode()}).astype(bool)
    assert np.array_equal(mask, disc[0:50, 40:100])
    ys, xs = np.nonzero(disc)
    assert det.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert [reached for _finished, reached in beats] == [1, None]  # before and after the image
    bad = Item("shapes.png", stat.st_size, stat.st_mtime_ns, window=(0, 0, 500, 10))
    (outside,) = written(engine, [bad])
    assert outside.status is Status.ERROR and "not inside the 160x120 image" in (outside.error_message or "")


def test_a_prompt_that_is_not_a_colour_ends_the_run_before_any_image(tmp_path: Path) -> None:
    make_picture(tmp_path / "in" / "shapes.png")
    result = run_threshold(tmp_path / "in", tmp_path / "out", "red", "roof")
    assert result.exit_code == 1
    assert '"roof" is not one: use #rrggbb or a CSS colour name' in result.output


@pytest.mark.parametrize(
    ("prompt", "rgb"),
    [("#ff0000", (255, 0, 0)), ("#0f0", (0, 255, 0)), ("red", (255, 0, 0)), ("Orange", (255, 165, 0))],
)
def test_colours(prompt: str, rgb: tuple[int, int, int]) -> None:
    assert parse_colour(prompt) == rgb


def test_not_a_colour() -> None:
    with pytest.raises(ConfigError, match='"#ff00f" is not one'):
        parse_colour("#ff00f")


def flood_fill(mask: np.ndarray) -> np.ndarray:
    """The plain definition: breadth-first over the 8 neighbours, components numbered in scan order."""
    labels = np.zeros(mask.shape, np.int32)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny in range(max(0, cy - 1), min(mask.shape[0], cy + 2)):
                for nx in range(max(0, cx - 1), min(mask.shape[1], cx + 2)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels


@pytest.mark.parametrize("density", [0.05, 0.3, 0.45, 0.6, 0.9])
def test_components_equal_a_flood_fill(density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    for shape in [(1, 1), (1, 40), (40, 1), (37, 53)]:
        mask = rng.random(shape) < density
        labelled, boxes = components(mask)
        assert np.array_equal(labelled, flood_fill(mask)), (density, shape)
        for k, (x0, y0, x1, y1) in enumerate(boxes, start=1):
            ys, xs = np.nonzero(labelled == k)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_a_serpentine_is_one_component() -> None:
    # One long path folded into rows: the merges must be followed from end to end.
    mask = np.zeros((61, 50), bool)
    mask[::2] = True
    for row in range(1, 61, 2):
        mask[row, -1 if row % 4 == 1 else 0] = True
    labelled, boxes = components(mask)
    assert len(boxes) == 1 and np.array_equal(labelled, mask.astype(np.int32))


def test_no_detection_result_is_ok(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (30, 20), GREY).save(folder / "plain.png")
    assert run_threshold(folder, tmp_path / "out", "red").exit_code == 0
    labels = read_label_map(tmp_path / "out" / "masks" / "plain.png.png")
    assert labels.shape == (20, 30) and not labels.any()


def test_a_run_records_the_engine_as_its_model_not_the_default_model(tmp_path: Path) -> None:
    """The colour engine has no model: images.parquet, ``status`` and the report name the engine
    ("colour-threshold"), never the --model default facebook/sam3 it does not read."""
    make_picture(tmp_path / "in" / "shapes.png")
    output = tmp_path / "out"
    result = invoke(
        "run", tmp_path / "in", "--engine", ENGINE, "--output", output, "--prompt", "red", "--report"
    )
    assert result.exit_code == 0, result.output
    images = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    assert [row["model_id"] for row in images] == [MODEL_ID] == ["colour-threshold"]
    status = invoke("status", output, "--json")
    assert json.loads(status.output)["model_id"] == MODEL_ID
    page = (output / "report.html").read_text(encoding="utf-8")
    assert MODEL_ID in page and DEFAULT_MODEL not in page


def test_the_recorded_model_of_each_kind_of_engine(tmp_path: Path) -> None:
    config = RunConfig(input=tmp_path, prompts=("red",))
    own = "fault_engine:load"  # an engine of the tests, without a model_id hook
    assert recorded_model(ENGINE, config) == MODEL_ID
    assert recorded_model(DEFAULT_ENGINE, config) == DEFAULT_MODEL
    assert recorded_model(DEFAULT_ENGINE, config.with_changes(model="models/sam3")) == "models/sam3"
    assert recorded_model(own, config) == own
    assert recorded_model(own, config.with_changes(model="models/x")) == f"{own} (models/x)"
