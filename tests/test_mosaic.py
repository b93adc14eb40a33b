"""``OUTPUT/labels.vrt``: a run's georeferenced label maps as one GDAL dataset, every map in place,
rewritten with the manifest; one mosaic per CRS when the maps have several."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from batchseg.geo.georef import Georef
from batchseg.geo.mosaic import LabelMap, write_mosaics
from batchseg.geo.raster import write_label_geotiff

ENGINE = "batchseg.engines.threshold:load"
UTM = CRS.from_epsg(32633)
RED, GREY = (255, 0, 0), (128, 128, 128)


def _grid(col: int, row: int, size: float = 0.5) -> Affine:
    """The grid of ortho tile (col, row): 200 x 160 pixels of ``size`` m, tiles edge to edge."""
    return Affine(size, 0.0, 500000.0 + col * 100.0, 0.0, -size, 4100000.0 - row * 80.0)


def _write_ortho(path: Path, grid: Affine, square: tuple[int, int]) -> None:
    """A grey GeoTIFF with a 20 x 20 red square at pixel (x, y)."""
    pixels = np.full((160, 200, 3), GREY, np.uint8)
    x, y = square
    pixels[y : y + 20, x : x + 20] = RED
    profile = dict(driver="GTiff", width=200, height=160, count=3, dtype="uint8", photometric="RGB")
    with rasterio.open(path, "w", crs=UTM, transform=grid, **profile) as dst:
        dst.write(pixels.transpose(2, 0, 1))


def test_a_run_is_one_layer(tmp_path: Path) -> None:
    """Three ortho tiles (two in a row, one below the first) run; labels.vrt opens as one raster
    and each tile's label map sits at its place in it; a later export drops a map that is gone."""
    folder = tmp_path / "in"
    folder.mkdir()
    tiles = {"a.tif": (0, 0, (10, 10)), "b.tif": (1, 0, (150, 100)), "sub/c.tif": (0, 1, (0, 140))}
    for name, (col, row, square) in tiles.items():
        (folder / name).parent.mkdir(exist_ok=True)
        _write_ortho(folder / name, _grid(col, row), square)
    output = tmp_path / "out"
    argv = [sys.executable, "-m", "batchseg", "run", folder, "--engine", ENGINE, "--output", output]
    argv += ["--prompt", "red", "--workers", "1"]
    result = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["path"]: r for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}
    with rasterio.open(output / "labels.vrt") as mosaic:
        assert (mosaic.crs, mosaic.width, mosaic.height, mosaic.count) == (UTM, 400, 320, 1)
        assert mosaic.transform == _grid(0, 0) and mosaic.nodata == 0
        whole = mosaic.read(1)
    for name, (col, row, (x, y)) in tiles.items():
        mask = output / rows[name]["mask_path"]
        assert cog_validate(mask, strict=True, quiet=True)[0]
        with rasterio.open(mask) as src:
            labels = src.read(1)
        assert labels[y : y + 20, x : x + 20].all() and np.count_nonzero(labels) == 400
        assert np.array_equal(whole[row * 160 : (row + 1) * 160, col * 200 : (col + 1) * 200], labels)
    assert np.count_nonzero(whole) == 3 * 400  # the fourth quarter is empty: no tile there


def _map(tmp_path: Path, name: str, grid: Affine, crs: CRS | None, value: int, size: int = 100) -> LabelMap:
    labels = np.full((size, size), value, np.uint16)
    wkt, epsg = (crs.to_wkt(), crs.to_epsg()) if crs else (None, None)
    georef = Georef(tuple(grid)[:6], wkt, epsg, size, size, 1, "uint8", None, "internal")  # type: ignore[arg-type]
    write_label_geotiff(tmp_path / "masks" / name, georef, labels)
    return LabelMap(f"masks/{name}", size, size, georef.crs_wkt, georef.epsg, georef.transform, 1)


def test_several_crss_get_a_mosaic_each_and_finer_maps_keep_their_pixels(tmp_path: Path) -> None:
    wgs84 = CRS.from_epsg(4326)
    coarse = _map(tmp_path, "coarse.tif", Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 4100000.0), UTM, 1)
    fine = _map(tmp_path, "fine.tif", Affine(0.5, 0.0, 500100.0, 0.0, -0.5, 4100000.0), UTM, 2)
    geographic = _map(tmp_path, "geo.tif", Affine(1e-5, 0.0, 12.0, 0.0, -1e-5, 0.01), wgs84, 3)
    no_crs = _map(tmp_path, "plain.tif", Affine(2.0, 0.0, 0.0, 0.0, -2.0, 0.0), None, 4)
    (tmp_path / "labels.vrt").write_text("stale")
    (tmp_path / "labels_mine.vrt").write_text("a file of the user's")
    written = write_mosaics(tmp_path, [coarse, fine, geographic, no_crs])
    assert sorted(p.name for p in written) == [
        "labels.EPSG_32633.vrt",
        "labels.EPSG_4326.vrt",
        "labels.no_crs.vrt",
    ]
    assert not (tmp_path / "labels.vrt").exists()  # one mosaic holds one CRS
    with rasterio.open(tmp_path / "labels.EPSG_32633.vrt") as src:
        assert src.res == (0.5, 0.5) and (src.width, src.height) == (300, 200)  # the finest pixels
        data = src.read(1)
    assert (data[:, :200] == 1).all() and (data[:100, 200:] == 2).all() and not data[100:, 200:].any()
    with rasterio.open(tmp_path / "labels.no_crs.vrt") as src:
        assert src.crs is None and (src.read(1) == 4).all()
    assert [p.name for p in write_mosaics(tmp_path, [fine])] == ["labels.vrt"]
    assert sorted(p.name for p in tmp_path.glob("*.vrt")) == ["labels.vrt", "labels_mine.vrt"]
