"""Georeferenced inputs through ``python -m batchseg run`` with the threshold engine: label GeoTIFFs
on the source grid, world-file sidecars, nodata, polygons.parquet at known map coordinates, a
corrupt GeoTIFF as one image's status, and the missing extra as exit 1. One run serves most tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
import tifffile
from _runs import run_args
from affine import Affine
from PIL import Image
from pyproj import CRS as ProjCRS
from pyproj.enums import WktVersion
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from batchseg.config import RunConfig
from batchseg.geo import GeoExtraMissing
from batchseg.geo.detect import check_geo_extra
from batchseg.geo.georef import world_file_text
from batchseg.geo.raster_windows import GeoSource
from batchseg.tiles import MergedDetection, SparseMask, open_source, write_label_map
from batchseg.worker.reading import read_for_engine, valid_of

ENGINE = "batchseg.engines.threshold:load"
UTM = CRS.from_epsg(32633)
#: 0.5 m pixels, upper-left corner at (500000, 4100000) in UTM 33N.
GRID = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
GREY, RED, BLUE = (128, 128, 128), (255, 0, 0), (0, 0, 255)
#: Shapes in map coordinates (xmin, ymin, xmax, ymax), metres: a red square with a square hole and
#: a blue rectangle; each lies on pixel edges of GRID.
RED_OUTER = (500015.0, 4099960.0, 500045.0, 4099990.0)
RED_HOLE = (500025.0, 4099970.0, 500035.0, 4099980.0)
BLUE_BOX = (500060.0, 4099930.0, 500090.0, 4099950.0)


def _pixels(box: tuple[float, float, float, float], grid: Affine = GRID) -> tuple[int, int, int, int]:
    """(col0, row0, col1, row1) of a map box on ``grid`` (north-up)."""
    c0, r0 = ~grid @ (box[0], box[3])
    c1, r1 = ~grid @ (box[2], box[1])
    return round(c0), round(r0), round(c1), round(r1)


def _paint(pixels: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, ...]) -> None:
    c0, r0, c1, r1 = _pixels(box)
    pixels[r0:r1, c0:c1] = colour


def same_outline(geom: shapely.Geometry, want: shapely.Geometry) -> bool:
    """Vertex for vertex, no tolerance: shapes drawn on pixel edges of GRID (0.5 m, exact floats)
    come back with the same corners, not merely within a pixel."""
    return bool(shapely.equals_exact(geom.normalize(), want.normalize(), tolerance=0))


def shapes_picture() -> np.ndarray:
    pixels = np.full((160, 200, 3), GREY, np.uint8)
    _paint(pixels, RED_OUTER, RED)
    _paint(pixels, RED_HOLE, GREY)
    _paint(pixels, BLUE_BOX, BLUE)
    return pixels


def write_geotiff(path: Path, data: np.ndarray, **extra: Any) -> None:
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name)
    with rasterio.open(path, "w", crs=UTM, transform=GRID, **profile, **extra) as dst:
        dst.write(data)


def make_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    pixels = shapes_picture()
    write_geotiff(folder / "utm.tif", pixels.transpose(2, 0, 1), photometric="RGB")
    # The same picture as a PNG and a JPEG with world files and a .prj.
    esri = ProjCRS.from_epsg(32633).to_wkt(WktVersion.WKT1_ESRI)
    for name, world in (("ortho.png", "ortho.pgw"), ("photo.jpg", "photo.jgw")):
        Image.fromarray(pixels).save(folder / name, quality=95)
        (folder / world).write_text(world_file_text(GRID))
        (folder / name).with_suffix(".prj").write_text(esri)
    # uint16, 4 bands, nodata 0 on the left half; a dark square touching the nodata edge.
    data = np.full((4, 100, 100), 30000, np.uint16)
    data[:, :, :50] = 0
    data[:, 20:60, 50:70] = 1000  # 800 px: the 2nd percentile, stretched to black
    write_geotiff(folder / "nodata16.tif", data, nodata=0)
    # A GeoTIFF whose compressed blocks are garbage (0xFF is no zlib header), its tags intact.
    write_geotiff(folder / "corrupt.tif", pixels.transpose(2, 0, 1), compress="deflate", tiled=True)
    with tifffile.TiffFile(folder / "corrupt.tif") as tif:
        blocks = list(zip(tif.pages.first.dataoffsets, tif.pages.first.databytecounts, strict=True))
    raw = bytearray((folder / "corrupt.tif").read_bytes())
    for offset, count in blocks:
        raw[offset : offset + count] = b"\xff" * count
    (folder / "corrupt.tif").write_bytes(bytes(raw))


def python_m_batchseg(*args: str | Path, block_geo: bool = False) -> subprocess.CompletedProcess[str]:
    # Blocking the import the way a Python without the extra fails it: sys.modules[name] = None.
    prefix = "import sys; sys.modules['rasterio'] = None; " if block_geo else ""
    code = prefix + "from batchseg.cli import main; main()"
    argv = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def geo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("geo_run")
    make_inputs(root / "in")
    output = root / "out"
    flags = ["--prompt", "red", "--prompt", "blue", "--prompt", "black", "--workers", "1", "--vectors"]
    result = python_m_batchseg("run", root / "in", "--engine", ENGINE, "--output", output, *flags)
    return output, result


def _images(output: Path) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}


def test_run_goes_on_past_a_corrupt_geotiff(geo_run: tuple[Path, Any]) -> None:
    output, result = geo_run
    assert result.returncode == 3, result.stdout + result.stderr  # one image failed, the rest ran
    images = _images(output)
    assert images["corrupt.tif"]["status"] == "invalid_input"
    assert "IReadBlock failed" in images["corrupt.tif"]["error_message"]  # GDAL's own words
    assert {p: r["status"] for p, r in images.items() if p != "corrupt.tif"} == dict.fromkeys(
        ("utm.tif", "ortho.png", "photo.jpg", "nodata16.tif"), "ok"
    )


def test_label_geotiff_has_the_inputs_crs_and_transform_exactly(geo_run: tuple[Path, Any]) -> None:
    output, _ = geo_run
    row = _images(output)["utm.tif"]
    assert row["mask_path"] == "masks/utm.tif.tif"
    assert (row["crs_epsg"], row["georef_source"]) == (32633, "internal")
    assert row["transform"] == list(GRID)[:6]
    field = pq.read_schema(output / "manifest" / "images.parquet").field("transform")
    assert str(field.type) == "list<element: double>"  # plain images have null there
    assert CRS.from_wkt(row["crs_wkt"]) == UTM
    with rasterio.open(output / row["mask_path"]) as src, rasterio.open(output.parent / "in/utm.tif") as inp:
        assert (src.crs, src.transform, src.shape) == (inp.crs, inp.transform, inp.shape)
        assert src.nodata == 0 and src.dtypes[0] == "uint16"
        labels = src.read(1)
    c0, r0, c1, r1 = _pixels(BLUE_BOX)
    blue = labels[r0, c0]
    assert blue > 0 and (labels == blue).sum() == (c1 - c0) * (r1 - r0)


def test_polygons_land_at_the_drawn_map_coordinates(geo_run: tuple[Path, Any]) -> None:
    output, _ = geo_run
    frame = geopandas.read_parquet(output / "manifest" / "polygons.parquet")
    assert frame.crs.to_epsg() == 32633  # every image of the run is in UTM 33N
    utm = frame[frame["path"] == "utm.tif"].set_index("prompt")
    assert sorted(utm.index) == ["blue", "red"]
    assert set(frame["crs"]) == {"EPSG:32633"}
    red, blue = utm.loc["red", "geometry"], utm.loc["blue", "geometry"]
    expected_red = shapely.box(*RED_OUTER).difference(shapely.box(*RED_HOLE))
    assert same_outline(red, expected_red) and same_outline(blue, shapely.box(*BLUE_BOX))
    assert len(red.interiors) == 1  # the hole is kept
    assert utm.loc["red", "area"] == expected_red.area == 800.0  # (60 x 60 - 20 x 20) pixels of 0.25 m2
    assert utm.loc["red", "area_unit"] == "m2"
    run_id = pq.read_schema(output / "manifest" / "images.parquet").metadata[b"batchseg.run_id"].decode()
    assert set(frame["run_id"]) == {run_id}


def test_world_file_images_keep_their_georeference(geo_run: tuple[Path, Any]) -> None:
    output, _ = geo_run
    images = _images(output)
    for name, world in (("ortho.png", "ortho.pgw"), ("photo.jpg", "photo.jgw")):
        row = images[name]
        assert row["mask_path"] == f"masks/{name}.tif" and row["georef_source"] == world
        assert row["crs_epsg"] == 32633 and row["transform"] == list(GRID)[:6]
        with rasterio.open(output / row["mask_path"]) as src:  # a GeoTIFF on the world file's grid
            assert src.crs == UTM and src.transform == GRID
            labels = src.read(1)
        assert labels.shape == (160, 200) and labels.max() >= 2
    png = geopandas.read_parquet(output / "manifest" / "polygons.parquet")
    png = png[png["path"] == "ortho.png"].set_index("prompt")
    assert png.loc["blue", "geometry"].normalize().equals_exact(shapely.box(*BLUE_BOX).normalize(), 1e-6)


def test_every_label_map_is_a_cog(geo_run: tuple[Path, Any]) -> None:
    output, _ = geo_run
    masks = sorted((output / "masks").glob("*.tif"))
    assert [m.name for m in masks] == ["nodata16.tif.tif", "ortho.png.tif", "photo.jpg.tif", "utm.tif.tif"]
    for mask in masks:
        valid, errors, warnings = cog_validate(mask, strict=True, quiet=True)
        assert valid, (mask.name, errors, warnings)


def test_nodata_never_carries_a_detection(geo_run: tuple[Path, Any]) -> None:
    output, _ = geo_run
    row = _images(output)["nodata16.tif"]
    assert row["n_detections"] == 1
    with rasterio.open(output / row["mask_path"]) as src:
        labels = src.read(1)
    assert not labels[:, :50].any()  # the nodata half, black for the model, has no label
    assert (labels == 1).sum() == 40 * 20  # the dark square alone, though it touches the nodata
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    (det,) = [d for d in detections if d["path"] == "nodata16.tif"]
    assert (det["prompt"], det["area_px"]) == ("black", 800)
    # The engine found one black patch, nodata and square together; its box is the square's.
    assert [det[k] for k in ("box_x0", "box_y0", "box_x1", "box_y1")] == [50, 20, 70, 60]


def test_missing_extra_with_a_geotiff_stops_with_exit_1(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(folder / "a.tif", shapes_picture().transpose(2, 0, 1))
    args = ("run", folder, "--engine", ENGINE, "--output", tmp_path / "out", "--prompt", "red")
    result = python_m_batchseg(*args, block_geo=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "batchseg[geo]" in result.stderr and "a.tif" in result.stderr
    assert not (tmp_path / "out" / "masks").exists()  # never a silent pixel-space run


def test_the_extra_check_looks_at_inputs_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(shapes_picture()).save(folder / "plain.png")
    write_geotiff(folder / "plain_tiff.tif", shapes_picture().transpose(2, 0, 1))
    config = RunConfig(input=folder, prompts=("red",))
    monkeypatch.setitem(sys.modules, "rasterio", None)
    check_geo_extra(config, ["plain.png"])  # no georeference: runs without the extra
    with pytest.raises(GeoExtraMissing, match=r"batchseg\[geo\]"):
        check_geo_extra(config, ["plain.png", "plain_tiff.tif"])
    (folder / "plain.pgw").write_text(world_file_text(GRID))
    with pytest.raises(GeoExtraMissing, match="plain.png"):
        check_geo_extra(config, ["plain.png"])
    with pytest.raises(GeoExtraMissing, match="--vectors"):
        check_geo_extra(RunConfig(input=folder, prompts=("red",), vectors=True), [])


def test_tiled_reading_and_label_map_keep_the_grid(tmp_path: Path) -> None:
    """The windowed path (big images): GeoSource gives the same pixels and nodata as a whole read,
    and a merged label map written with the georeference lands on the source grid."""
    data = np.full((4, 700, 600), 30000, np.uint16)
    data[:, :, :100] = 0
    data[:, 300:340, 100:160] = 1000
    write_geotiff(tmp_path / "big.tif", data, nodata=0, tiled=True)
    config = RunConfig(input=tmp_path, prompts=("black",))
    whole = read_for_engine(tmp_path / "big.tif", config)
    source = open_source(tmp_path / "big.tif", max_pixels=10**6)
    assert isinstance(source, GeoSource)
    try:
        window = (50, 250, 550, 650)
        x0, y0, x1, y1 = window
        assert np.array_equal(source.read(window), np.asarray(whole)[y0:y1, x0:x1])  # one stretch
        assert np.array_equal(source.valid(window), valid_of(whole, window))
        georef = source.georef
    finally:
        source.close()
    cols = np.arange(100, 160, dtype=np.int64)
    mask = SparseMask.from_columns(cols, np.full(60, 300), np.full(60, 340), 700)
    merged = [MergedDetection(1, "black", 1.0, (100.0, 300.0, 160.0, 340.0), 2400, 2, mask)]
    write_label_map(tmp_path / "big.tif.tif", merged, 600, 700, georef)
    with rasterio.open(tmp_path / "big.tif.tif") as src:
        assert (src.crs, src.transform, src.shape, src.nodata) == (UTM, GRID, (700, 600), 0)
        labels = src.read(1)
    assert (labels == 1).sum() == 2400 and labels[300:340, 100:160].all()


def test_vectors_turned_on_later_cover_every_image(tmp_path: Path) -> None:
    """--vectors is not fixed by the fingerprint: a second run with it gives the images done
    before their polygons (from their label maps); a plain image's are in pixels, y down."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(shapes_picture()).save(folder / "plain.png")
    write_geotiff(folder / "utm.tif", shapes_picture().transpose(2, 0, 1), photometric="RGB")
    output = tmp_path / "out"
    args = ("run", folder, "--engine", ENGINE, "--output", output, "--prompt", "blue", "--workers", "1")
    assert python_m_batchseg(*args).returncode == 0
    assert not (output / "manifest" / "polygons.parquet").exists()
    # A lost checkpoint is rebuilt from the manifest: the transform comes back from its list form.
    (output / "checkpoint.sqlite").unlink()
    again = python_m_batchseg(*args, "--vectors")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "processed 0 images" in again.stdout  # nothing redone: polygons from the label maps
    assert _images(output)["utm.tif"]["transform"] == list(GRID)[:6]
    frame = geopandas.read_parquet(output / "manifest" / "polygons.parquet").set_index("path")
    assert frame.crs is None  # one image in pixels, one in UTM: no single CRS
    assert frame.loc["plain.png", ["crs", "area_unit"]].isna().tolist() == [True, False]
    assert frame.loc["plain.png", "area_unit"] == "px"
    c0, r0, c1, r1 = _pixels(BLUE_BOX)
    assert frame.loc["plain.png", "geometry"].bounds == (c0, r0, c1, r1)
    assert frame.loc["utm.tif", "crs"] == "EPSG:32633"
    assert same_outline(frame.loc["utm.tif", "geometry"], shapely.box(*BLUE_BOX))


@pytest.mark.parametrize("tiling", [[], ["--tile", "64", "--tile-overlap", "16"]])
def test_sam3_engine_writes_a_label_geotiff_without_detections_in_nodata(
    tmp_path: Path, tiny_model: Path, tiling: list[str]
) -> None:
    """The SAM3 engine's read and write go through the same hooks: with the tiny random model and
    every detection kept, masks cover much of the image, yet none reaches the nodata half, also
    when the image runs as tiles (each tile's read brings its valid mask)."""
    folder = tmp_path / "in"
    folder.mkdir()
    data = np.random.default_rng(1).integers(1000, 40000, (4, 96, 128), dtype=np.uint16)
    data[:, :, :64] = 0
    write_geotiff(folder / "scene.tif", data, nodata=0, tiled=bool(tiling), blockxsize=16, blockysize=16)
    output = tmp_path / "out"
    flags = ["--vectors", "--mask-threshold", "0", *tiling]
    result = python_m_batchseg(*run_args(folder, output, tiny_model, *flags))
    assert result.returncode == 0, result.stdout + result.stderr
    row = _images(output)["scene.tif"]
    assert (row["mask_path"], row["crs_epsg"], row["width"]) == ("masks/scene.tif.tif", 32633, 128)
    with rasterio.open(output / row["mask_path"]) as src:
        assert (src.crs, src.transform) == (UTM, GRID)
        labels = src.read(1)
    assert labels[:, 64:].any() and not labels[:, :64].any()
    frame = geopandas.read_parquet(output / "manifest" / "polygons.parquet")
    assert len(frame) == row["n_detections"] == labels.max()
    assert frame.total_bounds[0] >= GRID.c + 64 * GRID.a  # every polygon east of the nodata half


def test_the_runs_polygons_export_to_a_geopackage(geo_run: tuple[Path, Any]) -> None:
    output, _ = geo_run
    result = python_m_batchseg("export", output, "--format", "gpkg")
    assert result.returncode == 0, result.stdout + result.stderr
    frame = geopandas.read_file(output / "manifest" / "polygons.gpkg")
    parquet = geopandas.read_parquet(output / "manifest" / "polygons.parquet")
    assert frame.crs.to_epsg() == 32633 and len(frame) == len(parquet) > 0


def test_a_tiled_geotiff_keeps_its_grid_and_its_polygons_their_map_coordinates(tmp_path: Path) -> None:
    """--tile 64 cuts the 200x160 scene into 20 tiles: the merged label map is a GeoTIFF on the
    input's grid, the images row carries the CRS, and each shape is one polygon where it was drawn."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(folder / "utm.tif", shapes_picture().transpose(2, 0, 1), photometric="RGB", tiled=True)
    output = tmp_path / "out"
    flags = ["--prompt", "red", "--prompt", "blue", "--tile", "64", "--tile-overlap", "16", "--vectors"]
    result = python_m_batchseg("run", folder, "--engine", ENGINE, "--output", output, *flags)
    assert result.returncode == 0, result.stderr
    row = _images(output)["utm.tif"]
    assert row["crs_epsg"] == 32633 and row["mask_path"] == "masks/utm.tif.tif"
    with rasterio.open(output / row["mask_path"]) as labels:
        assert labels.crs == UTM and labels.transform == GRID
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    assert all(d["tiles"] > 1 for d in detections)  # each shape crosses seams
    frame = geopandas.read_parquet(output / "manifest" / "polygons.parquet").set_index("prompt")
    assert frame.crs.to_epsg() == 32633 and len(frame) == 2
    expected_red = shapely.box(*RED_OUTER).difference(shapely.box(*RED_HOLE))
    assert same_outline(frame.loc["red", "geometry"], expected_red)
    assert same_outline(frame.loc["blue", "geometry"], shapely.box(*BLUE_BOX))


def test_gsd_sets_the_tile_side_from_the_ground_resolution(tmp_path: Path) -> None:
    """0.5 m pixels and --gsd 0.05: a tile covers 1008 x 0.05 / 0.5 = 101 source pixels (what the
    model's 1008 would see at 5 cm), so the 200x160 scene is cut into tiles and merged back exactly;
    --gsd with --tile off is refused."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(folder / "utm.tif", shapes_picture().transpose(2, 0, 1), photometric="RGB")
    Image.fromarray(shapes_picture()).save(folder / "plain.png")  # no georeference: run whole
    output = tmp_path / "out"
    flags = ["--prompt", "red", "--prompt", "blue", "--gsd", "0.05"]
    result = python_m_batchseg("run", folder, "--engine", ENGINE, "--output", output, *flags)
    assert result.returncode == 0, result.stderr
    everything = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    plain = [d for d in everything if d["path"] == "plain.png"]
    assert sorted(d["prompt"] for d in plain) == ["blue", "red"] and {d["tiles"] for d in plain} == {1}
    detections = [d for d in everything if d["path"] == "utm.tif"]
    assert sorted(d["prompt"] for d in detections) == ["blue", "red"]
    assert max(d["tiles"] for d in detections) > 1
    with rasterio.open(output / "masks" / "utm.tif.tif") as labels:
        assert labels.crs == UTM and labels.transform == GRID
        red = labels.read(1) == next(d["index"] for d in detections if d["prompt"] == "red")
    c0, r0, c1, r1 = _pixels(RED_OUTER)
    h0, i0, h1, i1 = _pixels(RED_HOLE)
    expected = np.zeros_like(red)
    expected[r0:r1, c0:c1] = True
    expected[i0:i1, h0:h1] = False
    assert np.array_equal(red, expected)
    refused = python_m_batchseg(
        "run", folder, "--engine", ENGINE, "--output", tmp_path / "o2", *flags, "--tile", "off"
    )
    assert refused.returncode == 2 and "--gsd" in refused.stderr  # a usage error, before any write
    assert not (tmp_path / "o2").exists()


def test_a_10000_pixel_tiled_geotiff_gives_one_polygon_per_object_across_seams(tmp_path: Path) -> None:
    """A 10000x10000 tiled GeoTIFF (5 x 5 km at 0.5 m, 3 x 3 windows of the polygon tracing),
    --tile 1008 (169 tiles) spread over two workers: a ring on the corner of four tiles, a
    rectangle larger than a tile (across a tracing window's edge too), a square on a seam and one
    inside a tile each come back as one polygon at their map coordinates, holes kept."""
    side = 10000
    x0, y0 = GRID.c, GRID.f
    boxes = {  # pixel boxes (col0, row0, col1, row1): red ones outline a hole, blue ones are solid
        "red": [(858, 858, 1158, 1158, 100), (7000, 2690, 7300, 2830, 0)],  # the corner of 4 tiles; a seam
        "blue": [(5000, 8000, 6500, 9200, 0), (8296, 8296, 8346, 8346, 0)],
    }
    folder = tmp_path / "in"
    folder.mkdir()
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs=UTM, transform=GRID)
    with rasterio.open(
        folder / "big.tif", "w", **profile, tiled=True, compress="deflate", photometric="RGB"
    ) as dst:
        for top in range(0, side, 1024):
            rows = min(1024, side - top)
            strip = np.full((rows, side, 3), GREY, np.uint8)
            for prompt, colour in (("red", RED), ("blue", BLUE)):
                for c0, r0, c1, r1, hole in boxes[prompt]:
                    strip[max(r0 - top, 0) : max(r1 - top, 0), c0:c1] = colour
                    if hole:
                        h0, h1 = (r0 + r1 - hole) // 2, (r0 + r1 + hole) // 2
                        hc0, hc1 = (c0 + c1 - hole) // 2, (c0 + c1 + hole) // 2
                        strip[max(h0 - top, 0) : max(h1 - top, 0), hc0:hc1] = GREY
            dst.write(strip.transpose(2, 0, 1), window=rasterio.windows.Window(0, top, side, rows))
    output = tmp_path / "out"
    flags = ["--prompt", "red", "--prompt", "blue", "--tile", "1008", "--workers", "2", "--vectors"]
    result = python_m_batchseg("run", folder, "--engine", ENGINE, "--output", output, *flags)
    assert result.returncode == 0, result.stderr
    frame = geopandas.read_parquet(output / "manifest" / "polygons.parquet")
    assert frame.crs.to_epsg() == 32633 and sorted(frame["prompt"]) == ["blue", "blue", "red", "red"]
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    assert sorted(d["tiles"] for d in detections)[-1] >= 4 and len(detections) == 4
    for prompt in ("red", "blue"):
        for c0, r0, c1, r1, hole in boxes[prompt]:
            want = shapely.box(x0 + c0 * GRID.a, y0 + r1 * GRID.e, x0 + c1 * GRID.a, y0 + r0 * GRID.e)
            if hole:
                h0, h1 = (r0 + r1 - hole) // 2, (r0 + r1 + hole) // 2
                hc0, hc1 = (c0 + c1 - hole) // 2, (c0 + c1 + hole) // 2
                cut = shapely.box(x0 + hc0 * GRID.a, y0 + h1 * GRID.e, x0 + hc1 * GRID.a, y0 + h0 * GRID.e)
                want = want.difference(cut)
            found = [
                g
                for p, g in zip(frame["prompt"], frame.geometry, strict=True)
                if p == prompt and g.intersects(want)
            ]
            assert len(found) == 1, (prompt, c0, r0)
            assert same_outline(found[0], want), (prompt, c0, r0)  # one polygon, hole and all


@pytest.mark.parametrize("workers", ["1", "2"])
def test_nodata_never_carries_a_detection_in_a_tiled_image(tmp_path: Path, workers: str) -> None:
    """The nodata16 picture scaled up and cut into 64-pixel tiles: the nodata half (black for the
    model) gets no label in any tile, and the dark square, across seams, is one detection."""
    data = np.full((4, 200, 200), 30000, np.uint16)
    data[:, :, :100] = 0
    data[:, 40:120, 100:140] = 1000  # 3,200 px touching the nodata edge, across tile seams
    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(folder / "nodata16.tif", data, nodata=0, tiled=True, blockxsize=64, blockysize=64)
    output = tmp_path / "out"
    flags = ["--prompt", "black", "--tile", "64", "--tile-overlap", "16", "--workers", workers]
    result = python_m_batchseg("run", folder, "--engine", ENGINE, "--output", output, *flags)
    assert result.returncode == 0, result.stderr
    row = _images(output)["nodata16.tif"]
    assert row["n_detections"] == 1 and row["mask_path"] == "masks/nodata16.tif.tif"
    with rasterio.open(output / row["mask_path"]) as src:
        labels = src.read(1)
    assert not labels[:, :100].any() and (labels == 1).sum() == 80 * 40
    (det,) = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    assert (det["prompt"], det["area_px"]) == ("black", 3200) and det["tiles"] > 1
