"""Which pixels are data, through ``python -m batchseg run`` with the colour engine, whole and tiled.

The valid mask is the dataset's mask as GDAL defines it: an alpha band (or internal mask, ``.msk``)
when there is one, else the OR of the bands' nodata masks, NaN counting as nodata of its band. So a
pure red roof (255, 0, 0) or a deep shadow (0, 3, 6) in an RGB with nodata 0 is data, while the collar
(0 in every band) and a nodata-only patch inside the scene never carry a detection. Every scene is
drawn on pixel edges of a 0.5 m grid: label maps, detections and polygon outlines are compared
exactly, never within a pixel.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp

ENGINE = "batchseg.engines.threshold:load"
UTM = CRS.from_epsg(32633)
#: 0.5 m pixels, upper-left corner at (500000, 4100000): every pixel corner is an exact float.
GRID = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
WIDTH, HEIGHT = 640, 512
#: Whole, and cut into 256-pixel tiles (seams at x 192..256, 384..448 and y 192..256).
TILINGS = {"whole": ["--tile", "off"], "tiled": ["--tile", "256", "--tile-overlap", "64"]}
RED, BLACK, BLUE = "#ff0000", "#000000", "#0000ff"

Box = tuple[int, int, int, int]  # col0, row0, col1, row1: pixel edges, end exclusive


@dataclass(frozen=True)
class Scene:
    """A file to write and, per prompt, the pixel boxes its detections must be exactly."""

    name: str
    write: Callable[[Path], None]
    prompts: tuple[str, ...]
    expected: dict[str, tuple[Box, ...]]


def _put(data: np.ndarray, box: Box, values: tuple[float, ...]) -> None:
    c0, r0, c1, r1 = box
    data[:, r0:r1, c0:c1] = np.asarray(values, data.dtype)[:, None, None]


def _write(path: Path, data: np.ndarray, **extra: Any) -> None:
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name)
    interp = extra.pop("colorinterp", None)
    with rasterio.open(path, "w", crs=UTM, transform=GRID, **profile, **extra) as dst:
        if interp is not None:
            dst.colorinterp = interp
        dst.write(data)


def _texture(bands: int, seed: int) -> np.ndarray:
    """Grey-ish ground, far from every prompt colour."""
    return np.random.default_rng(seed).integers(90, 160, (bands, HEIGHT, WIDTH)).astype(np.uint8)


# ------------------------------------------------------------------------------ RGB, nodata 0

RGB_COLLAR = [(0, 0, 48, HEIGHT), (0, 480, WIDTH, HEIGHT)]  # 0 in every band: the scene's collar
RGB_ISLAND = (400, 300, 424, 324)  # 0 in every band inside the scene: a nodata-only patch
RGB_SHADOW = (424, 300, 464, 340)  # (0, 3, 6), touching the island: one black component with it
RGB_REDS = ((48, 100, 78, 130), (170, 170, 200, 200), (500, 60, 530, 90), (300, 400, 330, 430))


def write_rgb(path: Path) -> None:
    data = _texture(3, 1)
    for box in RGB_REDS:  # the first touches the collar, the second crosses a tile seam
        _put(data, box, (255, 0, 0))
    _put(data, RGB_SHADOW, (0, 3, 6))
    for box in (*RGB_COLLAR, RGB_ISLAND):
        _put(data, box, (0, 0, 0))
    _write(path, data, nodata=0, photometric="RGB", tiled=True, blockxsize=128, blockysize=128)


# ------------------------------------------------------------------------------ RGBA

RGBA_HIDDEN = [(0, 0, 48, HEIGHT), (200, 200, 220, 260)]  # alpha 0 over grey and over red
RGBA_REDS = (30, 100, 70, 140), (200, 200, 260, 260)  # each partly under alpha 0
RGBA_BLACK = (350, 350, 390, 390)  # (0, 0, 0) with alpha 255: data


def write_rgba(path: Path) -> None:
    data = np.concatenate([_texture(3, 2), np.full((1, HEIGHT, WIDTH), 255, np.uint8)])
    for box in RGBA_REDS:
        _put(data, box, (255, 0, 0, 255))
    _put(data, RGBA_BLACK, (0, 0, 0, 255))
    for c0, r0, c1, r1 in RGBA_HIDDEN:  # the colour stays in the file: only alpha says nodata
        data[3, r0:r1, c0:c1] = 0
    interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    _write(path, data, photometric="RGB", colorinterp=interp, tiled=True, blockxsize=128, blockysize=128)


# ------------------------------------------------------------------------------ float32, NaN

FLOAT_COLLAR = (0, 0, 48, HEIGHT)  # NaN in every band
FLOAT_REDS = ((20, 100, 80, 160), (170, 170, 230, 230), (400, 40, 460, 100), (300, 380, 360, 440))
FLOAT_GREEN = (500, 200, 600, 300)
FLOAT_BLUE = (250, 20, 350, 120)  # NaN in the red band only over its top half: data, still blue


def write_float(path: Path) -> None:
    """0, 0.5 and 1 only, each extreme on more than 2% of the pixels of every band: the 2-98%
    stretch maps them to exactly 0, 128 and 255, so the colours are exact after it."""
    data = np.full((3, HEIGHT, WIDTH), 0.5, np.float32)
    for box in FLOAT_REDS:
        _put(data, box, (1.0, 0.0, 0.0))
    _put(data, FLOAT_GREEN, (0.0, 1.0, 0.0))
    _put(data, FLOAT_BLUE, (0.0, 0.0, 1.0))
    c0, r0, c1, r1 = FLOAT_BLUE
    data[0, r0 : (r0 + r1) // 2, c0:c1] = np.nan
    _put(data, FLOAT_COLLAR, (np.nan, np.nan, np.nan))
    _write(path, data, nodata=float("nan"), tiled=True, blockxsize=128, blockysize=128)


SCENES = {
    "rgb": Scene(
        "rgb.tif",
        write_rgb,
        (RED, BLACK),
        {RED: RGB_REDS, BLACK: (RGB_SHADOW,)},  # the collar and the island have no detection
    ),
    "rgba": Scene(
        "rgba.tif",
        write_rgba,
        (RED, BLACK),
        {RED: ((48, 100, 70, 140), (220, 200, 260, 260)), BLACK: (RGBA_BLACK,)},
    ),
    "float": Scene(
        "float.tif",
        write_float,
        (RED, BLUE, BLACK),
        {RED: ((48, 100, 80, 160), *FLOAT_REDS[1:]), BLUE: (FLOAT_BLUE,), BLACK: ()},
    ),
}


def python_m_batchseg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "batchseg", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def _map_box(box: Box) -> shapely.Polygon:
    """A pixel box's outline in map coordinates (exact: pixel corners are exact floats on GRID)."""
    c0, r0, c1, r1 = box
    (x0, y0), (x1, y1) = GRID @ (c0, r1), GRID @ (c1, r0)
    return shapely.box(x0, y0, x1, y1)


def _expected_labels(scene: Scene) -> np.ndarray:
    covered = np.zeros((HEIGHT, WIDTH), bool)
    for boxes in scene.expected.values():
        for c0, r0, c1, r1 in boxes:
            covered[r0:r1, c0:c1] = True
    return covered


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("kind", list(SCENES))
def test_data_is_what_the_datasets_mask_says(tmp_path: Path, kind: str, tiling: str) -> None:
    scene = SCENES[kind]
    folder = tmp_path / "in"
    folder.mkdir()
    scene.write(folder / scene.name)
    output = tmp_path / "out"
    prompts = [arg for p in scene.prompts for arg in ("--prompt", p)]
    flags = [*prompts, *TILINGS[tiling], "--workers", "1", "--vectors"]
    result = python_m_batchseg("run", folder, "--engine", ENGINE, "--output", output, *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    assert row["status"] == "ok" and row["n_detections"] == sum(map(len, scene.expected.values()))
    with rasterio.open(output / row["mask_path"]) as src:
        assert (src.crs, src.transform) == (UTM, GRID)
        labels = src.read(1)
    assert np.array_equal(labels > 0, _expected_labels(scene))  # nothing in nodata, nothing missed
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    polygons = geopandas.read_parquet(output / "manifest" / "polygons.parquet")
    outline = {int(i): g for i, g in zip(polygons["index"], polygons.geometry, strict=True)}
    by_index = {d["index"]: d for d in detections}
    for prompt, boxes in scene.expected.items():
        assert sum(d["prompt"] == prompt for d in detections) == len(boxes), prompt
        for c0, r0, c1, r1 in boxes:
            det = by_index[int(labels[r0, c0])]
            assert det["prompt"] == prompt and det["area_px"] == (c1 - c0) * (r1 - r0)
            assert (labels[r0:r1, c0:c1] == det["index"]).all()
            want = _map_box((c0, r0, c1, r1))
            assert shapely.equals_exact(outline[det["index"]].normalize(), want.normalize(), tolerance=0)
    if tiling == "tiled":
        assert max(d["tiles"] for d in detections) > 1  # some object crossed a seam
