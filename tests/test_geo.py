"""Georeference in (GeoTIFF, world files), bands and stretch, label GeoTIFFs out: real files made
with rasterio, read back with rasterio."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from pyproj import CRS as ProjCRS
from pyproj.enums import WktVersion
from rasterio.crs import CRS

from batchseg.cog import write_cog_atomically
from batchseg.errors import ConfigError
from batchseg.geo import GeoreferenceError
from batchseg.geo.bands import PERCENTILES, parse_bands, plan_bands, read_rgb
from batchseg.geo.georef import (
    ground_pixel_size,
    parse_world_file,
    read_georef,
    world_file_for,
    world_file_text,
)
from batchseg.geo.raster import label_dtype, write_label_geotiff, write_png_sidecars

__all__ = ["UTM", "UTM_GRID", "WGS84", "WGS84_GRID", "make_geotiff", "rgb"]

UTM = CRS.from_epsg(32633)
WGS84 = CRS.from_epsg(4326)
#: 0.5 m pixels, upper-left corner at (500000, 4100000) in UTM 33N.
UTM_GRID = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
#: 1e-5 degree pixels (about 1.1 m) just north of the equator.
WGS84_GRID = Affine(1e-5, 0.0, 12.0, 0.0, -1e-5, 0.01)


def make_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: CRS | None = UTM,
    transform: Affine = UTM_GRID,
    nodata: float | None = None,
    overviews: tuple[int, ...] = (),
    **extra: Any,
) -> Path:
    """A GeoTIFF of ``data`` (bands, rows, cols), optionally with internal overviews."""
    count, height, width = data.shape
    profile: dict[str, Any] = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
        crs=crs, transform=transform, nodata=nodata, **extra,
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if overviews:
            dst.build_overviews(list(overviews), rasterio.enums.Resampling.nearest)
    return path


ROTATED = UTM_GRID @ Affine.rotation(30.0)


def rgb(height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)


# ------------------------------------------------------------------------------ georef


@pytest.mark.parametrize(
    ("crs", "transform", "epsg"), [(UTM, UTM_GRID, 32633), (WGS84, WGS84_GRID, 4326), (UTM, ROTATED, 32633)]
)
def test_geotiff_georeference_is_read_exactly(
    tmp_path: Path, crs: object, transform: Affine, epsg: int
) -> None:
    path = make_geotiff(tmp_path / "a.tif", rgb(), crs=crs, transform=transform)  # type: ignore[arg-type]
    geo = read_georef(path)
    assert geo is not None
    assert geo.transform == tuple(transform)[:6]
    assert geo.epsg == epsg and geo.source == "internal"
    assert (geo.width, geo.height, geo.count, geo.dtype) == (80, 64, 3, "uint8")
    assert geo.rotated == (transform is ROTATED)
    assert geo.pixel_size == pytest.approx(
        (abs(transform.a), abs(transform.e)) if transform is not ROTATED else (0.5, 0.5)
    )
    assert pickle.loads(pickle.dumps(geo)) == geo
    assert ProjCRS.from_wkt(geo.crs_wkt).to_epsg() == epsg  # type: ignore[arg-type]


def test_ground_pixel_size_in_metres(tmp_path: Path) -> None:
    utm = read_georef(make_geotiff(tmp_path / "utm.tif", rgb()))
    rotated = read_georef(make_geotiff(tmp_path / "rot.tif", rgb(), transform=ROTATED))
    wgs = read_georef(make_geotiff(tmp_path / "wgs.tif", rgb(), crs=WGS84, transform=WGS84_GRID))
    feet = read_georef(make_geotiff(tmp_path / "ft.tif", rgb(), crs=CRS.from_epsg(2263), transform=UTM_GRID))
    assert utm is not None and rotated is not None and wgs is not None and feet is not None
    assert ground_pixel_size(utm) == pytest.approx(0.5) and ground_pixel_size(rotated) == pytest.approx(0.5)
    assert ground_pixel_size(wgs) == pytest.approx(1.11, rel=0.01)  # 1e-5 degree at the equator
    assert ground_pixel_size(feet) == pytest.approx(0.5 * 0.3048006, rel=1e-6)  # US survey feet


def test_gcp_only_tiff_is_refused(tmp_path: Path) -> None:
    from rasterio.control import GroundControlPoint

    gcps = [GroundControlPoint(r, c, 500000.0 + c, 4100000.0 - r) for r, c in ((0, 0), (0, 79), (63, 0))]
    path = make_geotiff(tmp_path / "gcp.tif", rgb(), crs=None)
    with rasterio.open(path, "r+") as dst:
        dst.gcps = (gcps, UTM)
    with pytest.raises(GeoreferenceError, match="ground control points"):
        read_georef(path)


def test_plain_images_have_no_georeference(tmp_path: Path) -> None:
    Image.fromarray(rgb().transpose(1, 2, 0)).save(tmp_path / "photo.png")
    Image.fromarray(rgb().transpose(1, 2, 0)).save(tmp_path / "photo.tif")
    assert read_georef(tmp_path / "photo.png") is None
    assert read_georef(tmp_path / "photo.tif") is None


def test_corrupt_file_and_degenerate_transform_are_per_image_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    with pytest.raises(GeoreferenceError, match="bad.tif"):
        read_georef(tmp_path / "bad.tif")
    Image.fromarray(rgb().transpose(1, 2, 0)).save(tmp_path / "flat.png")
    (tmp_path / "flat.pgw").write_text("0\n0\n0\n0\n100\n200\n")
    with pytest.raises(GeoreferenceError, match="degenerate"):
        read_georef(tmp_path / "flat.png")
    (tmp_path / "flat.pgw").write_text("1\n0\n0\n")
    with pytest.raises(GeoreferenceError, match="world file"):
        read_georef(tmp_path / "flat.png")


def test_world_file_centre_convention() -> None:
    # C, F = centre of the upper-left pixel; the affine origin is its corner, half a pixel away.
    transform = parse_world_file("0.5\n0\n0\n-0.5\n500000.25\n4099999.75\n")
    assert tuple(transform)[:6] == (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
    assert parse_world_file(world_file_text(ROTATED)).almost_equals(ROTATED, precision=1e-9)


@pytest.mark.parametrize("world", ["jgw", "jpgw", "wld", "JGW"])
def test_jpeg_with_world_file_and_prj_keeps_its_georeference(tmp_path: Path, world: str) -> None:
    jpeg = tmp_path / "ortho.jpg"
    Image.fromarray(rgb().transpose(1, 2, 0)).save(jpeg, quality=90)
    (tmp_path / f"ortho.{world}").write_text("0.5\n0.0\n0.0\n-0.5\n500000.25\n4099999.75\n")
    (tmp_path / "ortho.prj").write_text(ProjCRS.from_epsg(32633).to_wkt(WktVersion.WKT1_ESRI))
    assert world_file_for(jpeg) == tmp_path / f"ortho.{world}"
    geo = read_georef(jpeg)
    assert geo is not None
    assert geo.transform == tuple(UTM_GRID)[:6] and geo.epsg == 32633
    assert geo.source == f"ortho.{world}" and (geo.width, geo.height, geo.dtype) == (80, 64, "uint8")


def test_crs_from_aux_xml_and_world_file_without_crs(tmp_path: Path) -> None:
    png = tmp_path / "scan.png"
    Image.fromarray(rgb().transpose(1, 2, 0)).save(png)
    (tmp_path / "scan.pgw").write_text(world_file_text(WGS84_GRID))
    geo = read_georef(png)
    assert geo is not None and geo.crs_wkt is None and geo.epsg is None
    (tmp_path / "scan.png.aux.xml").write_text(f"<PAMDataset><SRS>{WGS84.to_wkt()}</SRS></PAMDataset>")
    geo = read_georef(png)
    assert geo is not None and geo.epsg == 4326
    assert geo.affine.almost_equals(WGS84_GRID, precision=1e-12)
    (tmp_path / "scan.prj").write_text("not a crs")
    with pytest.raises(GeoreferenceError, match="CRS"):
        read_georef(png)


# ------------------------------------------------------------------------------ bands


def test_parse_bands() -> None:
    assert parse_bands(None) is None and parse_bands(" ") is None
    assert parse_bands("4,3,2") == (4, 3, 2) and parse_bands("2") == (2,)
    for bad in ("1,2", "a,b,c", "0,1,2"):
        with pytest.raises(ConfigError, match="--bands"):
            parse_bands(bad)


def uint16_four_bands(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """uint16, 4 bands, nodata 0 on the left quarter; valid values 1000..4999."""
    data = np.random.default_rng(1).integers(1000, 5000, (4, 96, 128), dtype=np.uint16)
    data[:, :, :32] = 0
    return make_geotiff(tmp_path / "ms.tif", data, nodata=0), data


def test_uint16_stretch_ignores_nodata_and_is_the_same_for_every_window(tmp_path: Path) -> None:
    path, data = uint16_four_bands(tmp_path)
    plan = plan_bands(path)
    assert plan.bands == (1, 2, 3) and plan.stretch is not None
    for (low, high), band in zip(plan.stretch, data[:3], strict=True):
        expected = np.percentile(band[:, 32:], PERCENTILES)
        assert abs(low - expected[0]) < 40 and abs(high - expected[1]) < 40  # from a decimated read
        assert low > 1000  # nodata zeros did not pull the stretch down
    assert plan_bands(path, (4, 3, 2)).bands == (4, 3, 2)
    assert plan_bands(path, (4,)).bands == (4, 4, 4)
    with pytest.raises(GeoreferenceError, match="4 band"):
        plan_bands(path, (5, 1, 2))
    with rasterio.open(path) as src:
        whole, valid = read_rgb(src, plan)
        left, _ = read_rgb(src, plan, (0, 0, 70, 96))
        right, _ = read_rgb(src, plan, (70, 0, 128, 96))
    assert whole.shape == (96, 128, 3) and whole.dtype == np.uint8
    assert np.array_equal(np.concatenate([left, right], axis=1), whole)
    assert not valid[:, :32].any() and valid[:, 32:].all()
    assert (whole[:, :32] == 0).all() and whole[:, 32:].max() == 255 and whole[:, 32:].min() == 0


def _valid(path: Path, bands: tuple[int, ...] | None = None) -> np.ndarray:
    plan = plan_bands(path, bands)
    with rasterio.open(path) as src:
        whole = read_rgb(src, plan)[1]
        halves = [read_rgb(src, plan, (0, 0, 5, 4))[1], read_rgb(src, plan, (5, 0, 8, 4))[1]]
    assert np.array_equal(np.concatenate(halves, axis=1), whole)  # a window's mask is the same
    return whole


def test_valid_pixels_follow_the_datasets_mask(tmp_path: Path) -> None:
    """GDAL's rule: a per-dataset mask (internal mask, .msk, alpha) first, else the OR of the chosen
    bands' nodata masks; NaN is nodata of its band."""
    data = np.full((4, 4, 8), 120, np.uint8)
    data[:, 0, :] = 0  # row 0: every band at nodata
    data[1:, 1, :] = 0  # row 1: red only, (120, 0, 0): data
    data[:3, 2, :] = 0  # row 2: band 4 only
    nodata = make_geotiff(tmp_path / "nodata.tif", data, nodata=0, photometric="MINISBLACK")
    assert _valid(nodata)[:, 0].tolist() == [False, True, False, True]
    assert _valid(nodata, (4, 3, 2))[:, 0].tolist() == [False, False, True, True]
    assert _valid(nodata, (2,))[:, 0].tolist() == [False, False, False, True]  # a subset keeps the OR
    mask = np.full((4, 8), 255, np.uint8)
    mask[:, :3] = 0
    for internal in (True, False):  # an internal mask, then a .msk beside the file
        name = tmp_path / f"masked_{internal}.tif"
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal):
            with rasterio.open(make_geotiff(name, data, photometric="MINISBLACK"), "r+") as dst:
                dst.write_mask(mask)
        assert (tmp_path / f"{name.name}.msk").is_file() != internal
        assert np.array_equal(_valid(name), mask > 0)  # the mask wins over the values
    rgba = np.concatenate([data[:3], mask[None]])
    alpha = make_geotiff(tmp_path / "alpha.tif", rgba, nodata=0, photometric="RGB")
    with rasterio.open(alpha, "r+") as dst:
        ci = rasterio.enums.ColorInterp
        dst.colorinterp = [ci.red, ci.green, ci.blue, ci.alpha]
    assert np.array_equal(_valid(alpha), mask > 0)  # alpha, although nodata 0 shadows it for GDAL
    floats = np.ones((3, 4, 8), np.float32)
    floats[:, 0] = np.nan
    floats[0, 1] = np.nan
    for value in (None, float("nan")):  # NaN is nodata with or without a nodata value
        path = make_geotiff(tmp_path / f"float_{value}.tif", floats, nodata=value)
        assert _valid(path)[:, 0].tolist() == [False, True, True, True]
        assert _valid(path, (1,))[:, 0].tolist() == [False, False, True, True]


def test_float32_with_nan_nodata(tmp_path: Path) -> None:
    data = np.random.default_rng(2).uniform(-1.0, 1.0, (1, 64, 64)).astype(np.float32)
    data[0, 40:, :] = np.nan
    path = make_geotiff(tmp_path / "ndvi.tif", data, nodata=float("nan"))
    plan = plan_bands(path)
    assert plan.bands == (1, 1, 1) and plan.stretch is not None
    assert -1.0 < plan.stretch[0][0] < -0.8 and 0.8 < plan.stretch[0][1] < 1.0
    with rasterio.open(path) as src:
        image, valid = read_rgb(src, plan, (0, 30, 64, 64))
    assert valid[:10].all() and not valid[10:].any()
    assert (image[10:] == 0).all() and image.shape == (34, 64, 3)


def test_rgb_colour_interpretation_picks_the_bands(tmp_path: Path) -> None:
    data = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30, 40)])
    path = make_geotiff(tmp_path / "bgrn.tif", data)
    with rasterio.open(path, "r+") as dst:
        ci = rasterio.enums.ColorInterp
        dst.colorinterp = [ci.blue, ci.green, ci.red, ci.undefined]
    plan = plan_bands(path)
    assert plan.bands == (3, 2, 1) and plan.stretch is None  # 8-bit: used as it is
    with rasterio.open(path) as src:
        assert read_rgb(src, plan)[0][0, 0].tolist() == [30, 20, 10]


def test_stretch_comes_from_the_overview_when_there_is_one(tmp_path: Path) -> None:
    # The overview is built from values 100..199, then the full resolution is overwritten with
    # 5000..5999: a stretch in the 100s proves it was computed from the overview.
    low = np.random.default_rng(3).integers(100, 200, (1, 2560, 2560), dtype=np.uint16)
    with_ov = make_geotiff(tmp_path / "ov.tif", low, overviews=(2, 4, 8), tiled=True)
    without = make_geotiff(tmp_path / "plain.tif", low + 4900)
    with rasterio.open(with_ov, "r+") as dst:
        dst.write(low + 4900)
    assert plan_bands(with_ov).stretch[0][1] < 200  # type: ignore[index]
    assert plan_bands(without).stretch[0][0] > 5000  # type: ignore[index]


def test_all_nodata_image_is_a_per_image_error(tmp_path: Path) -> None:
    path = make_geotiff(tmp_path / "empty.tif", np.zeros((3, 16, 16), np.uint8), nodata=0)
    with pytest.raises(GeoreferenceError, match="every pixel is nodata"):
        plan_bands(path)


# ------------------------------------------------------------------------------ label maps


@pytest.mark.parametrize(("crs", "transform"), [(UTM, UTM_GRID), (WGS84, WGS84_GRID), (UTM, ROTATED)])
def test_label_geotiff_has_the_input_grid_exactly(tmp_path: Path, crs: object, transform: Affine) -> None:
    source = make_geotiff(tmp_path / "in.tif", rgb(600, 700), crs=crs, transform=transform)  # type: ignore[arg-type]
    geo = read_georef(source)
    assert geo is not None
    labels = np.zeros((600, 700), np.uint16)
    labels[100:300, 50:650] = 7
    write_label_geotiff(tmp_path / "labels.tif", geo, labels)
    with rasterio.open(source) as src, rasterio.open(tmp_path / "labels.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert (out.width, out.height, out.count, out.dtypes[0], out.nodata) == (700, 600, 1, "uint16", 0)
        assert out.block_shapes[0] == (512, 512)
        assert out.compression is not None and out.compression.name.lower() == "deflate"
        assert out.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        assert np.array_equal(out.read(1), labels)
    assert not list(tmp_path.glob("*.batchseg-tmp"))


def test_label_geotiff_uint32(tmp_path: Path) -> None:
    geo = read_georef(make_geotiff(tmp_path / "in.tif", rgb(40, 50)))
    assert geo is not None and label_dtype(65535) == "uint16" and label_dtype(65536) == "uint32"
    labels = np.full((40, 50), 3, np.uint32)
    labels[:, :25] = 70000
    write_label_geotiff(tmp_path / "big.tif", geo, labels)
    with rasterio.open(tmp_path / "big.tif") as out:
        assert out.dtypes[0] == "uint32" and out.read(1)[0, :].tolist() == [70000] * 25 + [3] * 25


def test_a_failed_write_leaves_no_label_map(tmp_path: Path) -> None:
    geo = read_georef(make_geotiff(tmp_path / "in.tif", rgb(40, 50)))
    assert geo is not None
    with pytest.raises(ValueError, match="do not match"):
        write_label_geotiff(tmp_path / "out.tif", geo, np.zeros((41, 50), np.uint16))

    def fail(out: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> bool:
        raise RuntimeError("engine failed half way")

    with pytest.raises(RuntimeError):  # a failure half way through the blocks: no file either
        write_cog_atomically(tmp_path / "out.tif", 2000, 2000, np.uint16, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


@pytest.mark.parametrize("transform", [UTM_GRID, ROTATED])
def test_png_mask_sidecars_give_gdal_the_grid(tmp_path: Path, transform: Affine) -> None:
    jpeg = tmp_path / "ortho.jpg"
    Image.fromarray(rgb().transpose(1, 2, 0)).save(jpeg)
    (tmp_path / "ortho.jgw").write_text(world_file_text(transform))
    (tmp_path / "ortho.prj").write_text(ProjCRS.from_epsg(32633).to_wkt(WktVersion.WKT1_ESRI))
    geo = read_georef(jpeg)
    assert geo is not None
    mask = tmp_path / "masks" / "ortho.jpg.png"
    mask.parent.mkdir()
    Image.fromarray(np.zeros((64, 80), np.uint16)).save(mask)
    written = write_png_sidecars(mask, geo)
    assert [p.name for p in written] == ["ortho.jpg.pgw", "ortho.jpg.prj", "ortho.jpg.png.aux.xml"]
    with rasterio.open(mask) as out:
        assert out.crs == UTM
        assert out.transform.almost_equals(transform, precision=1e-9)
    back = read_georef(mask)
    assert back is not None and back.epsg == 32633
    assert back.affine.almost_equals(transform, precision=1e-9)
