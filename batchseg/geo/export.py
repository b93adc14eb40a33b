"""``batchseg export``: polygons.parquet to GeoPackage, GeoJSON or Shapefile files that QGIS opens.

One file has one CRS, and nothing is reprojected unless asked. Rows fall into frames: each CRS,
``pixels`` (images without georeference, x right, y down) and ``no_crs`` (world files without a
``.prj``: map units of an unknown CRS). Rows in several frames need a choice, and without one the
error names the images of each frame: ``to_crs`` reprojects into one file, ``split_by_crs`` writes
one file per frame (``polygons.EPSG_32633.gpkg``, ...), ``skip_unreferenced`` leaves out the rows
without a CRS, which nothing can reproject.

A polygon that cannot be reprojected (a vertex outside the area where the transformation is
defined comes out infinite, as off the disk of a geostationary view) is never written, not even as
a null geometry: it is reported per image in ``ExportResult.skipped`` (``batchseg export`` exits 3).
Every geometry is written as a MultiPolygon, so a layer has one geometry type (Shapefile and QGIS
want that). GeoJSON is written in the rows' CRS (with GDAL's ``crs`` member when that is not
EPSG:4326); give ``to_crs="EPSG:4326"`` for a strict RFC 7946 file.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..errors import ConfigError
from ._extra import missing_extra

try:
    import pyogrio
    import pyproj
    import shapely
except ImportError as _exc:  # pragma: no cover
    raise missing_extra(_exc, "batchseg export") from _exc

__all__ = [
    "FORMATS",
    "NO_CRS",
    "PIXELS",
    "ExportResult",
    "Exported",
    "Skipped",
    "export_polygons",
    "polygons_path",
]

#: --format -> (GDAL driver, file suffix)
FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "shp": ("ESRI Shapefile", ".shp")}
#: The frames of rows without a CRS: an image without georeference, a world file without a CRS.
PIXELS, NO_CRS = "pixels", "no_crs"
_UNREFERENCED = (PIXELS, NO_CRS)
#: Images named per frame in an error message; the rest are counted.
NAMED = 5


@dataclass(frozen=True)
class Exported:
    """One file an export wrote."""

    path: Path
    count: int
    crs: str | None


@dataclass(frozen=True)
class Skipped:
    """Polygons of one image that are not in the files, and why."""

    path: str
    count: int
    reason: str


@dataclass(frozen=True)
class ExportResult:
    """The files written; ``skipped``: polygons that could not be written (the export is
    incomplete); ``left_out``: polygons left out as asked (``skip_unreferenced``)."""

    files: tuple[Exported, ...]
    skipped: tuple[Skipped, ...] = ()
    left_out: tuple[Skipped, ...] = ()


def polygons_path(output: Path) -> Path:
    return output / "manifest" / "polygons.parquet"


def export_polygons(
    output: Path,
    fmt: str,
    to_crs: str | None = None,
    dest: Path | None = None,
    *,
    skip_unreferenced: bool = False,
    split_by_crs: bool = False,
) -> ExportResult:
    """Write the polygons of the run in ``output`` to ``dest`` (default: beside polygons.parquet);
    with ``split_by_crs`` one file per frame, named ``<dest stem>.<frame><suffix>``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if split_by_crs and to_crs is not None:
        raise ConfigError("--split-by-crs keeps each CRS, --to-crs makes one: give one of them")
    table = _read(output)
    dest = dest or polygons_path(output).with_suffix(FORMATS[fmt][1])
    left_out: tuple[Skipped, ...] = ()
    if skip_unreferenced:
        unreferenced = np.isin(_frames(table), _UNREFERENCED)
        left_out = _per_image(table, unreferenced, "no CRS (left out: --skip-unreferenced)")
        table = table.filter(pa.array(~unreferenced))
    frames = _frames(table)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    if split_by_crs:
        written = tuple(
            _write(table, geoms, frames == frame, _crs_of(frame), fmt, _split_name(dest, frame))
            for frame in sorted(set(frames.tolist()))
        )
        return ExportResult(written, (), left_out)
    if to_crs is None:
        _require_one_frame(table, frames)
        crs = _crs_of(str(frames[0])) if len(frames) else None
        return ExportResult((_write(table, geoms, np.ones(len(frames), bool), crs, fmt, dest),), (), left_out)
    return _reprojected(table, geoms, frames, to_crs, fmt, dest, left_out)


def _read(output: Path) -> pa.Table:
    source = polygons_path(output)
    if not source.is_file():
        raise ConfigError(f"{source} does not exist: run with --vectors first")
    return pq.read_table(source)


def _frames(table: pa.Table) -> npt.NDArray[np.object_]:
    """Each row's frame: its CRS, else ``pixels`` or ``no_crs`` by its area unit."""
    crs = table.column("crs").to_pylist()
    units = table.column("area_unit").to_pylist()
    keys = [
        c if c is not None else (PIXELS if u == "px" else NO_CRS) for c, u in zip(crs, units, strict=True)
    ]
    return np.array(keys, dtype=object)  # object: a WKT2 CRS is long, fixed-width strings would copy it


def _crs_of(frame: str) -> str | None:
    return None if frame in _UNREFERENCED else frame


def _reprojected(
    table: pa.Table,
    geoms: npt.NDArray[np.object_],
    frames: npt.NDArray[np.object_],
    to_crs: str,
    fmt: str,
    dest: Path,
    left_out: tuple[Skipped, ...],
) -> ExportResult:
    unreferenced = np.isin(frames, _UNREFERENCED)
    if unreferenced.any():
        names = _named(sorted(set(np.asarray(table.column("path").to_pylist())[unreferenced].tolist())))
        raise ConfigError(
            f"polygons without a CRS cannot be reprojected: {names}. Give --skip-unreferenced to "
            "export the others"
        )
    try:
        target = pyproj.CRS.from_user_input(to_crs)
    except pyproj.exceptions.CRSError as exc:
        raise ConfigError(f"--to-crs {to_crs!r} is not a CRS: {exc}") from exc
    out = geoms.copy()
    for frame in sorted(set(frames.tolist())):
        rows = frames == frame
        out[rows] = _transform(geoms[rows], pyproj.CRS.from_user_input(frame), target)
    failed = _not_reprojected(geoms, out)
    skipped = _per_image(table, failed == 1, f"cannot be reprojected to {to_crs}: outside the area it covers")
    skipped += _per_image(table, failed == 2, f"cannot be reprojected to {to_crs}: not a valid polygon there")
    return ExportResult((_write(table, out, failed == 0, to_crs, fmt, dest),), skipped, left_out)


def _transform(
    geoms: npt.NDArray[np.object_], source: pyproj.CRS, target: pyproj.CRS
) -> npt.NDArray[np.object_]:
    transformer = pyproj.Transformer.from_crs(source, target, always_xy=True)
    return np.asarray(
        shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))),
        dtype=object,
    )


def _not_reprojected(before: npt.NDArray[np.object_], after: npt.NDArray[np.object_]) -> npt.NDArray[np.int8]:
    """Per row: 0 reprojected, 1 a vertex came out infinite or NaN (PROJ's answer outside the
    area where the transformation is defined), 2 a valid polygon became invalid."""
    failed = np.zeros(len(after), np.int8)
    coords, owner = shapely.get_coordinates(after, return_index=True)
    failed[np.unique(owner[~np.isfinite(coords).all(axis=1)])] = 1
    finite = np.flatnonzero(failed == 0)
    broken = shapely.is_valid(before[finite]) & ~shapely.is_valid(after[finite])
    failed[finite[broken]] = 2
    return failed


def _write(
    table: pa.Table,
    geoms: npt.NDArray[np.object_],
    rows: npt.NDArray[np.bool_],
    crs: str | None,
    fmt: str,
    dest: Path,
) -> Exported:
    """The rows ``rows`` of ``table`` with ``geoms`` as their geometry, written to ``dest``."""
    driver, suffix = FORMATS[fmt]
    multi = np.array(
        [shapely.multipolygons([g]) if g.geom_type == "Polygon" else g for g in geoms[rows]], dtype=object
    )
    fields = table.filter(pa.array(rows))
    fields = fields.drop_columns([c for c in ("geometry", "bbox", "crs") if c in fields.column_names])
    fields = fields.append_column("geometry", pa.array(shapely.to_wkb(multi), pa.binary()))
    with atomic_path(dest) as tmp:
        tmp.unlink()
        target = tmp.with_suffix(suffix)  # GDAL picks sidecar names (.shx, .dbf, .prj) from the suffix
        with warnings.catch_warnings():  # rows without a CRS are written without one on purpose
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
            pyogrio.write_arrow(
                fields, target, layer="polygons", driver=driver, geometry_name="geometry",
                geometry_type="MultiPolygon", crs=crs,
            )  # fmt: skip
        _move_sidecars(target, dest)
        target.replace(tmp)
    return Exported(dest, fields.num_rows, crs)


def _require_one_frame(table: pa.Table, frames: npt.NDArray[np.object_]) -> None:
    distinct = sorted(set(frames.tolist()))
    if len(distinct) <= 1:
        return
    paths = np.asarray(table.column("path").to_pylist())
    groups = "; ".join(
        f"{_describe(f)}: {_named(sorted(set(paths[frames == f].tolist())))}" for f in distinct
    )
    hint = ""
    if set(distinct) & set(_UNREFERENCED):
        hint = " or --skip-unreferenced to leave out the images without a CRS"
    raise ConfigError(
        f"the polygons are in {len(distinct)} CRSs ({groups}). One file holds one CRS: give "
        f"--to-crs EPSG:XXXX to reproject, --split-by-crs for one file per CRS{hint}"
    )


def _describe(frame: str) -> str:
    if frame == PIXELS:
        return "no georeference (pixel coordinates)"
    if frame == NO_CRS:
        return "world file without a CRS"
    return frame if frame.startswith("EPSG:") else str(pyproj.CRS.from_user_input(frame).name)


def _named(paths: list[str]) -> str:
    """``a.tif, b.tif`` or ``12 images: a.tif, ... and 7 more``."""
    shown = ", ".join(paths[:NAMED])
    if len(paths) <= NAMED:
        return shown
    return f"{len(paths)} images: {shown} and {len(paths) - NAMED} more"


def _per_image(table: pa.Table, rows: npt.NDArray[np.bool_], reason: str) -> tuple[Skipped, ...]:
    """One ``Skipped`` per image with rows among ``rows``, in the order of the table."""
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)[rows]
    counts: dict[str, int] = {}
    for path in paths.tolist():
        counts[path] = counts.get(path, 0) + 1
    return tuple(Skipped(path, count, reason) for path, count in counts.items())


def _split_name(dest: Path, frame: str) -> Path:
    """``polygons.gpkg`` -> ``polygons.EPSG_32633.gpkg``; a CRS without an EPSG code gets its name
    and a hash of its WKT, so two CRSs of one name never share a file."""
    if frame in _UNREFERENCED or frame.startswith("EPSG:"):
        tag = frame.replace(":", "_")
    else:
        name = re.sub(r"[^A-Za-z0-9]+", "_", _describe(frame)).strip("_")[:40] or "crs"
        tag = f"{name}_{hashlib.sha1(frame.encode()).hexdigest()[:8]}"
    return dest.with_name(f"{dest.stem}.{tag}{dest.suffix}")


def _move_sidecars(target: Path, dest: Path) -> None:
    """A Shapefile is several files: move every one but the main file next to ``dest`` under its name."""
    for part in target.parent.glob(target.stem + ".*"):
        if part != target:
            part.replace(dest.with_suffix(part.suffix))
