"""``batchseg export``: polygons.parquet to one GeoPackage, GeoJSON or Shapefile that QGIS opens.

One file has one CRS: rows in several CRSs need ``to_crs`` (nothing is reprojected unless asked),
and rows without georeference (pixel coordinates) cannot be reprojected at all. Every geometry is
written as a MultiPolygon, so the layer has one geometry type (Shapefile and QGIS want that).
GeoJSON is written in the rows' CRS (with GDAL's ``crs`` member when that is not EPSG:4326); give
``to_crs="EPSG:4326"`` for a strict RFC 7946 file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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

__all__ = ["FORMATS", "Exported", "export_polygons", "polygons_path"]

#: --format -> (GDAL driver, file suffix)
FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson"), "shp": ("ESRI Shapefile", ".shp")}


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    path: Path
    count: int
    crs: str | None


def polygons_path(output: Path) -> Path:
    return output / "manifest" / "polygons.parquet"


def export_polygons(output: Path, fmt: str, to_crs: str | None = None, dest: Path | None = None) -> Exported:
    """Write the polygons of the run in ``output`` to ``dest`` (default: beside polygons.parquet)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    source = polygons_path(output)
    if not source.is_file():
        raise ConfigError(f"{source} does not exist: run with --vectors first")
    table = pq.read_table(source)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    crs_values = table.column("crs").to_pylist()
    geoms, crs = _one_crs(geoms, crs_values, to_crs)
    driver, suffix = FORMATS[fmt]
    dest = dest or source.with_suffix(suffix)
    multi = np.array(
        [shapely.multipolygons([g]) if g.geom_type == "Polygon" else g for g in geoms], dtype=object
    )
    fields = table.drop_columns([c for c in ("geometry", "bbox", "crs") if c in table.column_names])
    fields = fields.append_column("geometry", pa.array(shapely.to_wkb(multi), pa.binary()))
    with atomic_path(dest) as tmp:
        tmp.unlink()
        target = tmp.with_suffix(suffix)  # GDAL picks sidecar names (.shx, .dbf, .prj) from the suffix
        pyogrio.write_arrow(
            fields, target, layer="polygons", driver=driver, geometry_name="geometry",
            geometry_type="MultiPolygon", crs=crs,
        )  # fmt: skip
        _move_sidecars(target, dest)
        target.replace(tmp)
    return Exported(dest, fields.num_rows, crs)


def _one_crs(
    geoms: np.ndarray, crs_values: list[str | None], to_crs: str | None
) -> tuple[np.ndarray, str | None]:
    distinct = sorted({c for c in crs_values if c is not None})
    if to_crs is None:
        if len(distinct) > 1 or (distinct and None in crs_values):
            kinds = ", ".join(_short(c) for c in distinct) + (
                ", no georeference" if None in crs_values else ""
            )
            raise ConfigError(
                f"the polygons are in several CRSs ({kinds}): give --to-crs EPSG:XXXX for one file"
            )
        return geoms, distinct[0] if distinct else None
    if None in crs_values:
        raise ConfigError(
            "some polygons are in pixel coordinates (images without georeference): they cannot be reprojected"
        )
    try:
        target = pyproj.CRS.from_user_input(to_crs)
    except pyproj.exceptions.CRSError as exc:
        raise ConfigError(f"--to-crs {to_crs!r} is not a CRS: {exc}") from exc
    out = geoms.copy()
    values = np.array(crs_values, dtype=object)
    for source in distinct:
        rows = values == source
        transformer = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(source), target, always_xy=True)
        out[rows] = shapely.transform(
            geoms[rows], lambda xy, t=transformer: np.column_stack(t.transform(xy[:, 0], xy[:, 1]))
        )
    return out, to_crs


def _short(crs: str) -> str:
    return crs if crs.startswith("EPSG:") else crs.split('"')[1] if '"' in crs else crs[:40]


def _move_sidecars(target: Path, dest: Path) -> None:
    """A Shapefile is several files: move every one but the main file next to ``dest`` under its name."""
    for part in target.parent.glob(target.stem + ".*"):
        if part != target:
            part.replace(dest.with_suffix(part.suffix))
