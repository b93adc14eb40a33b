"""Label maps are cloud-optimized GeoTIFFs: rio-cogeo's validator (GDAL's layout rules) passes on
tiled, georeferenced, BigTIFF and small maps; overviews hold labels only (nearest neighbour); GDAL
reads the layout as COG; memory stays flat in the map's area."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _tile_shapes import Shape, tile_detections
from affine import Affine
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from batchseg import cog
from batchseg.geo.georef import Georef
from batchseg.geo.raster import write_label_geotiff
from batchseg.tiles.grid import plan_tiles
from batchseg.tiles.labelmap import read_label_window, write_label_map
from batchseg.tiles.merge import MergedDetection, merge_tiles
from batchseg.tiles.sparse import SparseMask

# A label map of an image without georeference is a plain TIFF for GDAL, which says so.
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

UTM = CRS.from_epsg(32633)
GRID = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
ROTATED = Affine(0.4, 0.3, 500000.0, 0.3, -0.4, 4100000.0)


def _georef(width: int, height: int, transform: Affine = GRID, crs: CRS | None = UTM) -> Georef:
    wkt = None if crs is None else crs.to_wkt()
    six = tuple(transform)[:6]
    return Georef(six, wkt, 32633 if crs else None, width, height, 3, "uint8", None, "internal")  # type: ignore[arg-type]


def _merged(width: int, height: int) -> list[MergedDetection]:
    plan = plan_tiles(width, height, 1008, 252)
    shapes = [
        Shape("ring", 1000.0, 1000.0, 700.0, 500.0, inner=0.5),
        Shape("disc", 2500.0, 760.0, 150.0, 150.0),
        Shape("rect", 0.0, 3000.0, 400.0, 300.0),
    ]
    results = {t.id: tile_detections(shapes, t, width, height) for t in plan.tiles}
    return merge_tiles(plan, results)


def assert_cog(path: Path) -> None:
    """Valid for rio-cogeo with warnings as errors, and GDAL itself reads the layout as COG."""
    valid, errors, warnings = cog_validate(path, strict=True, quiet=True)
    assert valid, (errors, warnings)
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["blockxsize"] == 512 and src.compression.name.lower() == "deflate"


def _overviews_are_samples(path: Path, whole: np.ndarray) -> list[int]:
    """Each overview equals the map sampled at its pixels' centres: labels, never blends."""
    with rasterio.open(path) as src:
        factors = src.overviews(1)
    for level, factor in enumerate(factors):
        with rasterio.open(path, overview_level=level) as ov:
            data = ov.read(1)
        rows = np.minimum(np.arange(data.shape[0]) * factor + factor // 2, whole.shape[0] - 1)
        cols = np.minimum(np.arange(data.shape[1]) * factor + factor // 2, whole.shape[1] - 1)
        assert np.array_equal(data, whole[np.ix_(rows, cols)]), factor
    return list(factors)


@pytest.mark.parametrize("georeferenced", [False, True])
def test_tiled_label_map_is_a_cog(tmp_path: Path, georeferenced: bool) -> None:
    width, height = 3100, 3500
    merged = _merged(width, height)
    georef = _georef(width, height) if georeferenced else None
    path = tmp_path / "a.jpg.tif"
    write_label_map(path, merged, width, height, georef=georef)
    assert_cog(path)
    whole = read_label_window(path, (0, 0, width, height))  # tifffile: the first IFD is the map
    with rasterio.open(path) as src:
        assert np.array_equal(src.read(1), whole) and set(np.unique(whole)) == {0, 1, 2, 3}
        if georeferenced:
            assert (src.crs, src.transform, src.nodata) == (UTM, GRID, 0)
    assert _overviews_are_samples(path, whole) == [2, 4, 8]


def test_rotated_grid_and_no_crs_keep_their_georeference(tmp_path: Path) -> None:
    labels = np.zeros((700, 900), np.uint16)
    labels[100:500, 200:800] = 5
    for name, georef in (("rot.tif", _georef(900, 700, ROTATED)), ("nocrs.tif", _georef(900, 700, crs=None))):
        write_label_geotiff(tmp_path / name, georef, labels)
        assert_cog(tmp_path / name)
        with rasterio.open(tmp_path / name) as src:
            assert src.transform == georef.affine and src.crs == georef.crs
            assert np.array_equal(src.read(1), labels)
        _overviews_are_samples(tmp_path / name, labels)


def test_small_and_uint32_maps(tmp_path: Path) -> None:
    labels = np.zeros((300, 400), np.uint32)
    labels[10:20, 10:300] = 70000
    write_label_geotiff(tmp_path / "small.tif", _georef(400, 300), labels)
    assert_cog(tmp_path / "small.tif")
    with rasterio.open(tmp_path / "small.tif") as src:
        assert src.overviews(1) == [] and src.dtypes[0] == "uint32"
        assert np.array_equal(src.read(1), labels)


def test_bigtiff_cog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cog, "_BIGTIFF_FROM", 1000)
    merged = _merged(3100, 3500)
    write_label_map(tmp_path / "big.tif", merged, 3100, 3500, georef=_georef(3100, 3500))
    assert (tmp_path / "big.tif").read_bytes()[2:4] == b"\x2b\x00"  # 43: BigTIFF
    assert_cog(tmp_path / "big.tif")


def test_memory_stays_flat_in_the_area(tmp_path: Path) -> None:
    """A 20000 x 20000 map (800 MB as one uint16 array) with one long stripe per column block is
    written with a few blocks in memory."""
    width = height = 20000
    columns = np.arange(0, width, 64, dtype=np.int64)
    starts = columns * height + 1000
    merged = [
        MergedDetection(1, "p", 1.0, (0.0, 0.0, 1.0, 1.0), 1, 1, SparseMask(starts, starts + 5000, height))
    ]
    tracemalloc.start()
    try:
        write_label_map(tmp_path / "huge.tif", merged, width, height)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, peak
    assert_cog(tmp_path / "huge.tif")
    window = read_label_window(tmp_path / "huge.tif", (0, 0, 130, 7000))
    assert window[1000:6000, [0, 64, 128]].all() and not window[:1000].any() and not window[:, 1:64].any()
