"""Polygons from label maps at known map coordinates, polygons.parquet read back by geopandas and by
DuckDB's spatial extension, the export to GeoPackage/GeoJSON/Shapefile, and the missing-extra path."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine
from click.testing import CliRunner
from rasterio.crs import CRS
from rasterio.features import rasterize
from shapely.geometry import Point
from test_geo import UTM, UTM_GRID, WGS84, WGS84_GRID, make_geotiff

from batchseg.cli import cli
from batchseg.errors import ConfigError
from batchseg.geo import vectors
from batchseg.geo.export import export_polygons
from batchseg.geo.georef import Georef, read_georef
from batchseg.geo.raster import write_label_geotiff
from batchseg.geo.vectors import (
    DetectionInfo,
    PolygonRow,
    combine_polygon_files,
    image_polygons,
    label_shapes,
    write_polygons,
)

ROTATED = UTM_GRID @ Affine.rotation(30.0)
SIZE = 200  # pixels per side of the test grids
DETECTIONS = [
    DetectionInfo(1, "roof", 0.9),
    DetectionInfo(2, "field", 0.8, tiles=4),
    DetectionInfo(3, "car", 0.7),
]


def drawn_shapes(t: Affine) -> dict[int, shapely.Geometry]:
    """Shapes at fixed fractions of the grid, in map coordinates: a ring (a hole), a rectangle larger
    than a trace window, two separate squares (one instance, two parts)."""

    def at(u: float, v: float) -> tuple[float, float]:
        x, y = u * SIZE, v * SIZE
        return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f

    radius = 40 * float(np.hypot(t.a, t.d))  # 40 pixels
    ring = Point(at(0.25, 0.25)).buffer(radius, 64)
    hole = Point(at(0.25, 0.25)).buffer(0.4 * radius, 64)
    field = shapely.Polygon([at(0.55, 0.05), at(0.95, 0.05), at(0.95, 0.9), at(0.55, 0.9)])
    cars = shapely.MultiPolygon(
        [
            shapely.Polygon([at(u, 0.9), at(u + 0.05, 0.9), at(u + 0.05, 0.95), at(u, 0.95)])
            for u in (0.05, 0.25)
        ]
    )
    return {1: ring.difference(hole), 2: field, 3: cars}


def label_map(tmp_path: Path, crs: CRS, t: Affine) -> tuple[Path, Georef, dict[int, shapely.Geometry]]:
    image = make_geotiff(tmp_path / "scene.tif", np.zeros((3, SIZE, SIZE), np.uint8), crs=crs, transform=t)
    georef = read_georef(image)
    assert georef is not None
    shapes = drawn_shapes(t)
    labels = rasterize(
        [(g, v) for v, g in shapes.items()], out_shape=(SIZE, SIZE), transform=t, dtype="uint16"
    )
    write_label_geotiff(tmp_path / "labels.tif", georef, labels)
    return tmp_path / "labels.tif", georef, shapes


def pixel_outline(mask: np.ndarray) -> shapely.Geometry:
    """The outline of the True pixels of ``mask`` made of their squares (x right, y down)."""
    rows, cols = np.nonzero(mask)
    return shapely.union_all(shapely.box(cols, rows, cols + 1, rows + 1)).simplify(0)


def assert_pixel_outline(geom: shapely.Geometry, t: Affine, mask: np.ndarray) -> None:
    """``geom`` (map coordinates) is, vertex for vertex, the outline of ``mask``'s pixels through
    ``t``: taken back to pixels, its vertices are corners (integers up to float rounding, far below
    a pixel) and the outline is exactly that of the pixel squares."""
    inverse = ~t

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack(
            [inverse.a * x + inverse.b * y + inverse.c, inverse.d * x + inverse.e * y + inverse.f]
        )

    back = shapely.transform(geom, to_pixels)
    corners = shapely.transform(back, np.round)
    assert np.abs(shapely.get_coordinates(back) - shapely.get_coordinates(corners)).max() < 1e-6
    assert shapely.equals_exact(corners.normalize(), pixel_outline(mask).normalize(), tolerance=0)


@pytest.mark.parametrize(
    ("crs", "t"), [(UTM, UTM_GRID), (WGS84, WGS84_GRID), (UTM, ROTATED)], ids=["utm", "wgs84", "rotated"]
)
def test_polygons_come_back_at_their_map_coordinates(tmp_path: Path, crs: CRS, t: Affine) -> None:
    labels, georef, drawn = label_map(tmp_path, crs, t)
    rows = image_polygons("scene.tif", labels, georef, DETECTIONS, run_id="r1", model="m", window=64)
    assert [(r.index, r.prompt, r.tiles) for r in rows] == [(1, "roof", 1), (2, "field", 4), (3, "car", 1)]
    with rasterio.open(labels) as src:
        array = src.read(1)
    geod = crs.to_epsg() == 4326
    for row in rows:
        geom, want = shapely.from_wkb(row.geometry), drawn[row.index]
        assert_pixel_outline(geom, t, array == row.index)
        assert geom.area == pytest.approx(want.area, rel=0.01)  # the drawing, rasterized
        assert row.bbox == pytest.approx(geom.bounds)
        assert row.crs == f"EPSG:{crs.to_epsg()}" and row.area_unit == "m2"
        if geod:  # square metres on the ellipsoid, about 1.1 m pixels
            expected = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(want)[0])
            assert row.area == pytest.approx(expected, rel=0.01) and 100 < row.area
        else:
            assert row.area == pytest.approx(want.area, rel=0.01)
    ring, field, cars = (shapely.from_wkb(r.geometry) for r in rows)
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1  # the hole is kept
    assert field.geom_type == "Polygon"  # one piece although it crossed 64-pixel trace windows
    assert cars.geom_type == "MultiPolygon" and len(cars.geoms) == 2
    whole = image_polygons("scene.tif", labels, georef, DETECTIONS, run_id="r1", model="m", window=4096)
    for a, b in zip(rows, whole, strict=True):  # seams dissolve exactly: same outline as one window
        assert shapely.from_wkb(a.geometry).symmetric_difference(shapely.from_wkb(b.geometry)).area == 0


def test_tracing_inside_boxes_gives_the_same_polygons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Boxes pay off on large sparse scenes only; here every box is traced whatever it costs.
    monkeypatch.setattr(vectors, "BOX_COST_PIXELS", 0)
    labels, georef, _ = label_map(tmp_path, UTM, UTM_GRID)
    with rasterio.open(labels) as src:
        array = src.read(1)
    boxed = []
    for det in DETECTIONS:
        ys, xs = np.nonzero(array == det.index)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        boxed.append(dataclasses.replace(det, box=box, area_px=int(xs.size)))
    boxed[1] = dataclasses.replace(boxed[1], box=(120.0, 20.0, 150.0, 60.0))  # too small: cut the field
    boxed[2] = dataclasses.replace(boxed[2], box=(0.0, 0.0, 0.0, 0.0))  # empty: traced over the map
    plain = image_polygons("s", labels, georef, DETECTIONS, run_id="r", model="m")
    fast = image_polygons("s", labels, georef, boxed, run_id="r", model="m", window=64)
    for a, b in zip(plain, fast, strict=True):
        assert shapely.from_wkb(a.geometry).symmetric_difference(shapely.from_wkb(b.geometry)).area == 0
    gone = [dataclasses.replace(boxed[0], index=9, area_px=0)]  # lost every pixel to higher scores
    assert image_polygons("s", labels, georef, gone, run_id="r", model="m") == []


def test_pixel_space_polygons_and_simplification() -> None:
    labels = np.zeros((100, 120), np.uint16)
    yy, xx = np.mgrid[:100, :120]
    labels[(yy - 50) ** 2 + (xx - 60) ** 2 < 40**2] = 1
    rows = image_polygons("photo.jpg", labels, None, DETECTIONS[:1], run_id="r", model="m")
    assert rows[0].crs is None and rows[0].area_unit == "px" and rows[0].area == (labels == 1).sum()
    assert rows[0].bbox == (21.0, 11.0, 100.0, 90.0)  # x right, y down, pixel corners
    rough = shapely.from_wkb(rows[0].geometry)
    smooth = label_shapes(labels, simplify=1.0)[1]
    assert len(smooth.exterior.coords) < len(rough.exterior.coords) / 3
    assert smooth.area == pytest.approx(rough.area, rel=0.01)
    assert image_polygons("x", np.zeros((5, 5), np.uint16), None, DETECTIONS, run_id="r", model="m") == []


def utm_and_wgs84_rows(tmp_path: Path) -> tuple[list[PolygonRow], list[PolygonRow]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    utm = image_polygons(
        "a.tif", *label_map(tmp_path / "a", UTM, UTM_GRID)[:2], DETECTIONS, run_id="r", model="m"
    )
    wgs = image_polygons(
        "b.tif", *label_map(tmp_path / "b", WGS84, WGS84_GRID)[:2], DETECTIONS, run_id="r", model="m"
    )
    return utm, wgs


def spatial_extension() -> Path:
    try:
        import duckdb_extension_spatial
    except ImportError:
        pytest.skip(
            "DuckDB's spatial extension is not installed (the duckdb-extension-spatial wheel is Linux "
            "x86_64 only; INSTALL spatial would need the internet)"
        )
    return next(
        pathlib.Path(duckdb_extension_spatial.__file__).parent.glob("extensions/*/spatial.duckdb_extension")
    )


def test_geoparquet_read_by_geopandas_and_duckdb(tmp_path: Path) -> None:
    import duckdb
    import geopandas

    utm, _ = utm_and_wgs84_rows(tmp_path)
    out = tmp_path / "manifest" / "polygons.parquet"
    assert write_polygons(out, utm) == 3
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and column["encoding"] == "WKB"
    assert column["geometry_types"] == ["MultiPolygon", "Polygon"]
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    frame = geopandas.read_parquet(out)
    assert frame.crs.to_epsg() == 32633 and len(frame) == 3
    assert frame.area.tolist() == pytest.approx([r.area for r in utm])
    assert {"path", "prompt", "index", "score", "area", "tiles", "run_id", "model"} <= set(frame.columns)
    con = duckdb.connect()
    con.execute(f"LOAD '{spatial_extension()}'")
    found = con.execute(
        f"SELECT ST_CRS(geometry), ST_Area(geometry), area, prompt FROM '{out}' ORDER BY index"
    ).fetchall()
    assert [(c, p) for c, _, _, p in found] == [
        ("EPSG:32633", "roof"),
        ("EPSG:32633", "field"),
        ("EPSG:32633", "car"),
    ]
    assert all(a == pytest.approx(b) for _, a, b, _ in found)


def test_mixed_crs_rows_keep_their_own_crs(tmp_path: Path) -> None:
    import geopandas

    utm, wgs = utm_and_wgs84_rows(tmp_path)
    out = tmp_path / "polygons.parquet"
    write_polygons(out, utm + wgs)
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert geo["columns"]["geometry"]["crs"] is None  # unknown, never a wrong single CRS
    assert pq.read_table(out).column("crs").to_pylist() == ["EPSG:32633"] * 3 + ["EPSG:4326"] * 3
    assert geopandas.read_parquet(out).crs is None
    write_polygons(out, [])  # an empty run still writes a readable file
    assert pq.read_table(out).num_rows == 0
    # Per-image files combined into the manifest get metadata true for all their rows.
    write_polygons(tmp_path / "a.parquet", utm)
    write_polygons(tmp_path / "b.parquet", wgs[:1])
    assert json.loads(pq.read_schema(tmp_path / "a.parquet").metadata[b"geo"])["columns"]["geometry"]["crs"]
    assert combine_polygon_files([tmp_path / "a.parquet", tmp_path / "b.parquet"], out) == 4
    column = json.loads(pq.read_schema(out).metadata[b"geo"])["columns"]["geometry"]
    assert column["crs"] is None and column["geometry_types"] == ["MultiPolygon", "Polygon"]
    assert combine_polygon_files([tmp_path / "a.parquet"], out) == 3
    assert geopandas.read_parquet(out).crs.to_epsg() == 32633
    assert json.loads(pq.read_schema(out).metadata[b"geo"])["columns"]["geometry"]["bbox"] == pytest.approx(
        [
            min(r.bbox[0] for r in utm),
            min(r.bbox[1] for r in utm),
            max(r.bbox[2] for r in utm),
            max(r.bbox[3] for r in utm),
        ]
    )
    assert combine_polygon_files([], out) == 0


def run_folder(tmp_path: Path, rows: list[PolygonRow]) -> Path:
    write_polygons(tmp_path / "out" / "manifest" / "polygons.parquet", rows)
    return tmp_path / "out"


@pytest.mark.parametrize(("fmt", "suffix"), [("gpkg", ".gpkg"), ("geojson", ".geojson"), ("shp", ".shp")])
def test_export_is_read_back_by_pyogrio(tmp_path: Path, fmt: str, suffix: str) -> None:
    utm, _ = utm_and_wgs84_rows(tmp_path)
    (done,) = export_polygons(run_folder(tmp_path, utm), fmt).files
    assert done.path == tmp_path / "out" / "manifest" / f"polygons{suffix}" and done.count == 3
    info = pyogrio.read_info(done.path)
    assert info["features"] == 3 and info["geometry_type"] == ("Polygon" if fmt == "shp" else "MultiPolygon")
    assert CRS.from_user_input(info["crs"]).to_epsg() == 32633
    frame = pyogrio.read_dataframe(done.path)
    assert frame["prompt"].tolist() == ["roof", "field", "car"] and frame["score"].iloc[0] == pytest.approx(
        0.9
    )
    for row, geom in zip(utm, frame.geometry, strict=True):
        assert geom.area == pytest.approx(shapely.from_wkb(row.geometry).area)
    assert not list(done.path.parent.glob("*batchseg-tmp*")) and not list(done.path.parent.glob(".*"))


def test_export_of_mixed_crs_needs_to_crs(tmp_path: Path) -> None:
    utm, wgs = utm_and_wgs84_rows(tmp_path)
    output = run_folder(tmp_path, utm + wgs)
    with pytest.raises(ConfigError, match=r"2 CRSs \(EPSG:32633: a.tif; EPSG:4326: b.tif\).*--to-crs"):
        export_polygons(output, "gpkg")
    result = export_polygons(output, "gpkg", to_crs="EPSG:4326")
    ((done,), skipped) = result.files, result.skipped
    assert skipped == ()
    frame = pyogrio.read_dataframe(done.path)
    assert frame.crs.to_epsg() == 4326 and len(frame) == 6
    field = shapely.from_wkb(utm[1].geometry)
    lon, lat = pyproj.Transformer.from_crs(32633, 4326, always_xy=True).transform(*field.exterior.coords[0])
    assert frame.geometry.iloc[1].geoms[0].exterior.coords[0] == pytest.approx((lon, lat))
    with pytest.raises(ConfigError, match="not a CRS"):
        export_polygons(output, "gpkg", to_crs="EPSG:0")


def test_export_command(tmp_path: Path) -> None:
    utm, wgs = utm_and_wgs84_rows(tmp_path)
    output = run_folder(tmp_path, utm + wgs)
    result = CliRunner().invoke(cli, ["export", str(output), "--format", "shp"])
    assert result.exit_code == 1 and "--to-crs" in result.output
    result = CliRunner().invoke(
        cli, ["export", str(output), "--to-crs", "EPSG:3857", "--dest", str(tmp_path / "x.gpkg")]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 6 polygon(s)" in result.output and "EPSG:3857" in result.output
    assert pyogrio.read_info(tmp_path / "x.gpkg")["features"] == 6
    result = CliRunner().invoke(cli, ["export", str(tmp_path)])
    assert result.exit_code == 1 and "run with --vectors first" in result.output
    help_text = CliRunner().invoke(cli, ["export", "--help"]).output
    assert "Example" in help_text and "batchseg export" in help_text


#: A geostationary view (as satellite scenes come): points off the Earth's disk have no longitude.
GEOS = CRS.from_proj4("+proj=geos +h=35785831 +lon_0=0 +sweep=y +ellps=WGS84 +units=m +no_defs")
#: 3 km pixels from x = 5,250 km: the disk's edge at the equator is near column 60.
GEOS_GRID = Affine(3000.0, 0.0, 5_250_000.0, 0.0, -3000.0, 300_000.0)


def geostationary_rows(tmp_path: Path) -> list[PolygonRow]:
    """Three squares: on the disk (columns 5-20), off it (70-90) and across its edge (50-70)."""
    image = make_geotiff(
        tmp_path / "geos.tif", np.zeros((1, 60, 100), np.uint8), crs=GEOS, transform=GEOS_GRID
    )
    georef = read_georef(image)
    assert georef is not None and georef.epsg is None
    labels = np.zeros((60, 100), np.uint16)
    for value, (c0, c1) in enumerate(((5, 20), (70, 90), (50, 70)), start=1):
        labels[20:40, c0:c1] = value
    return image_polygons("geos.tif", labels, georef, DETECTIONS, run_id="r", model="m")


def test_polygons_that_cannot_be_reprojected_are_named_and_never_written_as_null(tmp_path: Path) -> None:
    rows = geostationary_rows(tmp_path)
    utm, _ = utm_and_wgs84_rows(tmp_path)
    output = run_folder(tmp_path, rows + utm)
    done = export_polygons(output, "gpkg", to_crs="EPSG:4326")
    assert [(s.path, s.count) for s in done.skipped] == [("geos.tif", 2)]  # off the disk, across it
    assert "cannot be reprojected to EPSG:4326" in done.skipped[0].reason
    frame = pyogrio.read_dataframe(done.files[0].path)
    assert frame["path"].tolist() == ["geos.tif", "a.tif", "a.tif", "a.tif"] and done.files[0].count == 4
    assert frame.geometry.notna().all() and frame.geometry.is_valid.all()
    assert 60 < frame.geometry.iloc[0].bounds[0] < frame.geometry.iloc[0].bounds[2] < 70  # on the disk
    result = CliRunner().invoke(cli, ["export", str(output), "--to-crs", "EPSG:4326", "--format", "geojson"])
    assert result.exit_code == 3, result.output
    assert "not written: geos.tif: 2 polygon(s) cannot be reprojected to EPSG:4326" in result.stderr
    assert "wrote 4 polygon(s)" in result.stdout
    features = json.loads((output / "manifest" / "polygons.geojson").read_text())["features"]
    assert len(features) == 4 and all(f["geometry"] is not None for f in features)
    assert CliRunner().invoke(cli, ["export", str(output), "--split-by-crs"]).exit_code == 0  # as they are


def mixed_frames(tmp_path: Path) -> Path:
    """A run with images in two CRSs, a photo without georeference and a world file without a CRS."""
    utm, wgs = utm_and_wgs84_rows(tmp_path)
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 10:30] = 1
    photo = image_polygons("photo.jpg", labels, None, DETECTIONS[:1], run_id="r", model="m")
    world = Georef(tuple(UTM_GRID)[:6], None, None, 50, 40, 3, "uint8", None, "scan.pgw")
    scan = image_polygons("scan.png", labels, world, DETECTIONS[:1], run_id="r", model="m")
    return run_folder(tmp_path, utm + photo + wgs + scan)


def test_export_of_several_crss_names_the_images_and_splits_or_skips(tmp_path: Path) -> None:
    output = mixed_frames(tmp_path)
    refused = CliRunner().invoke(cli, ["export", str(output)])
    assert refused.exit_code == 1
    message = " ".join(refused.stderr.split())
    for part in (
        "4 CRSs",
        "EPSG:32633: a.tif",
        "EPSG:4326: b.tif",
        "no georeference (pixel coordinates): photo.jpg",
        "world file without a CRS: scan.png",
        "--to-crs",
        "--split-by-crs",
        "--skip-unreferenced",
    ):
        assert part in message, part
    refused = CliRunner().invoke(cli, ["export", str(output), "--to-crs", "EPSG:4326"])
    assert refused.exit_code == 1 and "photo.jpg, scan.png" in refused.stderr
    both = CliRunner().invoke(cli, ["export", str(output), "--to-crs", "EPSG:4326", "--split-by-crs"])
    assert both.exit_code == 2
    bad = CliRunner().invoke(cli, ["export", str(output), "--to-crs", "EPSG:0"])
    assert bad.exit_code == 2 and "'EPSG:0' is not a CRS" in bad.stderr
    done = CliRunner().invoke(cli, ["export", str(output), "--to-crs", "EPSG:4326", "--skip-unreferenced"])
    assert done.exit_code == 0, done.output
    assert "left out 2 polygon(s) of 2 image(s) without a CRS: photo.jpg, scan.png" in done.stdout
    assert (
        pyogrio.read_dataframe(output / "manifest" / "polygons.gpkg")["path"].tolist()
        == ["a.tif"] * 3 + ["b.tif"] * 3
    )


@pytest.mark.parametrize("fmt", ["gpkg", "shp"])
def test_split_by_crs_writes_one_file_per_crs(tmp_path: Path, fmt: str) -> None:
    output = mixed_frames(tmp_path)
    manifest = output / "manifest"
    done = export_polygons(output, fmt, split_by_crs=True)
    expected = {
        f"polygons.EPSG_32633.{fmt}": (32633, ["a.tif"] * 3),
        f"polygons.EPSG_4326.{fmt}": (4326, ["b.tif"] * 3),
        f"polygons.no_crs.{fmt}": (None, ["scan.png"]),
        f"polygons.pixels.{fmt}": (None, ["photo.jpg"]),
    }
    assert sorted(f.path.name for f in done.files) == sorted(expected)
    for name, (epsg, paths) in expected.items():
        frame = pyogrio.read_dataframe(manifest / name)
        assert frame["path"].tolist() == paths and (frame.crs.to_epsg() if frame.crs else None) == epsg
    utm = pyogrio.read_dataframe(manifest / f"polygons.EPSG_32633.{fmt}")
    parquet = pq.read_table(manifest / "polygons.parquet").to_pylist()
    for geom, row in zip(utm.geometry, [r for r in parquet if r["path"] == "a.tif"], strict=True):
        parts = [shapely.get_parts(g).tolist() for g in (geom, shapely.from_wkb(row["geometry"]))]
        a, b = (shapely.MultiPolygon(p).normalize() for p in parts)  # a Shapefile turns rings round
        assert shapely.equals_exact(a, b, 0)
    skipped = export_polygons(
        output, fmt, split_by_crs=True, skip_unreferenced=True, dest=tmp_path / f"x.{fmt}"
    )
    assert sorted(f.path.name for f in skipped.files) == [f"x.EPSG_32633.{fmt}", f"x.EPSG_4326.{fmt}"]
    assert [(s.path, s.count) for s in skipped.left_out] == [("photo.jpg", 1), ("scan.png", 1)]
    assert not list(manifest.glob("*batchseg-tmp*")) and not list(tmp_path.glob(".*"))


def test_doctor_reports_gdal() -> None:
    from batchseg.doctor import OK, _geo

    (check,) = _geo()
    assert check.level == OK and "GDAL 3." in check.detail and "rasterio" in check.detail


def test_missing_extra_names_it(tmp_path: Path) -> None:
    # A child process, because the extra must look uninstalled: rasterio is blocked from importing.
    code = (
        "import sys; sys.modules.update(dict.fromkeys(['rasterio', 'shapely', 'pyproj', 'pyogrio']))\n"
        "from batchseg.doctor import _geo\n"
        "print(_geo()[0].level, _geo()[0].detail)\n"
        "from batchseg.geo import GeoExtraMissing\n"
        "for name in ('georef', 'bands', 'raster', 'vectors', 'export'):\n"
        "    try:\n"
        "        __import__('batchseg.geo.' + name)\n"
        "    except GeoExtraMissing as exc:\n"
        "        print(name, exc)\n"
        "from click.testing import CliRunner\n"
        "from batchseg.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['export', {str(tmp_path)!r}])\n"
        "print('exit', r.exit_code, r.output)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("warning not installed") and "pip install 'batchseg[geo]'" in lines[0]
    assert [line.split()[0] for line in lines[1:6]] == ["georef", "bands", "raster", "vectors", "export"]
    assert all("pip install 'batchseg[geo]'" in line for line in lines[1:7])
    assert lines[6].startswith("exit 1 error: batchseg export needs the geo extra")


def test_a_run_needs_no_pyogrio_but_the_export_does() -> None:
    # pyogrio serves the export only: without it a georeferenced run still passes the parent's check.
    code = (
        "import sys; sys.modules['pyogrio'] = None\n"
        "from batchseg.geo.detect import extra_installed\n"
        "from batchseg.geo import GeoExtraMissing, require_geo\n"
        "require_geo(); print('run', extra_installed())\n"
        "try:\n"
        "    import batchseg.geo.export\n"
        "except GeoExtraMissing as exc:\n"
        "    print('export', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "run True"
    assert done.stdout.splitlines()[1].startswith("export batchseg export needs the geo extra (")
