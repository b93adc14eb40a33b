"""Polygons per detection from a label map, and ``manifest/polygons.parquet`` as GeoParquet 1.1.

Shapes are traced window by window in PIXEL coordinates (``rasterio.features.shapes``, holes kept),
where the corners of neighbouring windows are the same integers, so ``shapely.union_all`` per label
dissolves the seams exactly; only then is the image's affine applied. An instance with separate parts
is a MultiPolygon. ``simplify`` is a Douglas-Peucker tolerance in pixels (the same meaning for every
CRS), applied before the transform, topology preserved.

Several CRSs in one run: every row has a ``crs`` column ("EPSG:n", or WKT2 for a CRS without an EPSG
code; null for an image without georeference, whose polygons are in pixels, y down). The ``geo``
metadata's ``crs`` is that CRS as PROJJSON when all rows share one, and null ("unknown" in the
GeoParquet spec) when they do not, so no reader mistakes mixed rows for one CRS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ._extra import missing_extra
from .georef import Georef

try:
    import pyproj
    import rasterio
    import shapely
    from affine import Affine
    from rasterio.features import shapes
    from rasterio.windows import Window
    from shapely.geometry import shape
except ImportError as _exc:  # pragma: no cover
    raise missing_extra(_exc, "--vectors") from _exc

__all__ = [
    "DetectionInfo",
    "GEOPARQUET_VERSION",
    "PolygonRow",
    "image_polygons",
    "label_shapes",
    "polygons_table",
    "write_polygons",
]

GEOPARQUET_VERSION = "1.1.0"
WINDOW = 4096  # pixels per side of a traced window: bounds memory at ~16 M labels at a time

Labels = str | Path | npt.NDArray[np.integer[Any]]


@dataclass(frozen=True)
class DetectionInfo:
    """What the manifest says about one label value of an image."""

    index: int
    prompt: str
    score: float
    tiles: int = 1  # tiles the instance was seen in (1 for an untiled image)


@dataclass(frozen=True)
class PolygonRow:
    """One row of polygons.parquet: a detection's outline in its image's CRS."""

    path: str
    prompt: str
    index: int
    score: float
    geometry: bytes  # WKB
    geometry_type: str  # Polygon | MultiPolygon
    bbox: tuple[float, float, float, float]
    area: float
    area_unit: str  # m2 | crs_unit2 (a world file without CRS) | px (no georeference)
    tiles: int
    crs: str | None
    run_id: str
    model: str


def label_shapes(labels: Labels, window: int = WINDOW, simplify: float = 0.0) -> dict[int, shapely.Geometry]:
    """Label value -> its outline in pixel coordinates (x right, y down, corners on integers)."""
    parts: dict[int, list[shapely.Geometry]] = {}
    for x0, y0, block in _windows(labels, window):
        for geojson, value in shapes(block, mask=block > 0, transform=Affine.translation(x0, y0)):
            parts.setdefault(int(value), []).append(shape(geojson))
    merged = {}
    for value, pieces in parts.items():
        # union_all leaves the vertices where a seam crossed an edge; simplify(0) drops exactly those
        # (collinear on integer coordinates), so a traced window size never shows in the output.
        geom = pieces[0] if len(pieces) == 1 else shapely.union_all(pieces).simplify(0.0)
        merged[value] = geom.simplify(simplify, preserve_topology=True) if simplify > 0 else geom
    return merged


def _windows(labels: Labels, size: int) -> Iterator[tuple[int, int, npt.NDArray[Any]]]:
    if isinstance(labels, np.ndarray):
        height, width = labels.shape
        for y0 in range(0, height, size):
            for x0 in range(0, width, size):
                yield x0, y0, _shapes_dtype(labels[y0 : y0 + size, x0 : x0 + size])
        return
    with rasterio.open(labels) as src:
        for y0 in range(0, src.height, size):
            for x0 in range(0, src.width, size):
                win = Window(x0, y0, min(size, src.width - x0), min(size, src.height - y0))
                yield x0, y0, _shapes_dtype(src.read(1, window=win))


def _shapes_dtype(block: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """rasterio.features.shapes takes int16/int32/uint8/uint16/float32: uint32 labels go as int32."""
    return block.astype(np.int32) if block.dtype in (np.uint32, np.int64, np.uint64) else block


def image_polygons(
    path: str,
    labels: Labels,
    georef: Georef | None,
    detections: Sequence[DetectionInfo],
    *,
    run_id: str,
    model: str,
    simplify: float = 0.0,
    window: int = WINDOW,
) -> list[PolygonRow]:
    """The rows of one image, in the order of ``detections``; a label absent from the map has none."""
    outlines = label_shapes(labels, window, simplify)
    crs = _crs_text(georef)
    area_of = _area_function(georef)
    rows = []
    for det in detections:
        pixel_geom = outlines.get(det.index)
        if pixel_geom is None or pixel_geom.is_empty:
            continue
        geom = pixel_geom if georef is None else _to_map(pixel_geom, georef.affine)
        area, unit = area_of(pixel_geom, geom)
        bounds = tuple(float(v) for v in geom.bounds)
        rows.append(
            PolygonRow(
                path, det.prompt, det.index, det.score, shapely.to_wkb(geom), geom.geom_type,
                bounds, area, unit, det.tiles, crs, run_id, model,  # type: ignore[arg-type]
            )
        )  # fmt: skip
    return rows


def _to_map(geom: shapely.Geometry, t: Affine) -> shapely.Geometry:
    def apply(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    return shapely.transform(geom, apply)


def _crs_text(georef: Georef | None) -> str | None:
    if georef is None or georef.crs_wkt is None:
        return None
    return f"EPSG:{georef.epsg}" if georef.epsg is not None else georef.crs_wkt


def _area_function(georef: Georef | None) -> Any:
    """(pixel geometry, map geometry) -> (area, unit): square metres whenever the CRS says how."""
    if georef is None:
        return lambda pix, geom: (float(pix.area), "px")
    if georef.crs_wkt is None:
        return lambda pix, geom: (float(geom.area), "crs_unit2")
    crs = pyproj.CRS.from_wkt(georef.crs_wkt)
    if crs.is_geographic:
        geod = crs.get_geod() or pyproj.Geod(ellps="WGS84")
        # Geodesic area on the CRS's own ellipsoid; shapely's ring orientation gives the sign.
        return lambda pix, geom: (abs(float(geod.geometry_area_perimeter(geom)[0])), "m2")
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return lambda pix, geom: (float(geom.area) * factor * factor, "m2")


# ------------------------------------------------------------------------------ GeoParquet

_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("prompt", pa.string()),
        ("index", pa.int32()),
        ("score", pa.float32()),
        ("area", pa.float64()),
        ("area_unit", pa.string()),
        ("tiles", pa.int32()),
        ("crs", pa.string()),
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("geometry", pa.binary()),
        (
            "bbox",
            pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")]),
        ),
    ]
)


def polygons_table(rows: Sequence[PolygonRow]) -> pa.Table:
    """The rows as an Arrow table carrying GeoParquet 1.1 ``geo`` metadata."""
    columns: dict[str, list[Any]] = {name: [] for name in _SCHEMA.names}
    for row in rows:
        for name in (
            "path",
            "prompt",
            "index",
            "score",
            "area",
            "area_unit",
            "tiles",
            "crs",
            "run_id",
            "model",
        ):
            columns[name].append(getattr(row, name))
        columns["geometry"].append(row.geometry)
        columns["bbox"].append(dict(zip(("xmin", "ymin", "xmax", "ymax"), row.bbox, strict=True)))
    table = pa.table(columns, schema=_SCHEMA)
    return table.replace_schema_metadata({b"geo": json.dumps(_geo_metadata(rows)).encode()})


def _geo_metadata(rows: Sequence[PolygonRow]) -> dict[str, Any]:
    crss = {row.crs for row in rows}
    crs_json = (
        pyproj.CRS.from_user_input(crss.pop()).to_json_dict() if len(crss) == 1 and None not in crss else None
    )
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted({row.geometry_type for row in rows}),
        "crs": crs_json,  # explicit null = unknown; leaving it out would mean OGC:CRS84
        "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if rows and crs_json is not None:
        boxes = np.array([row.bbox for row in rows])
        column["bbox"] = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def write_polygons(path: str | Path, rows: Sequence[PolygonRow]) -> int:
    """Write ``polygons.parquet`` atomically; returns the number of rows."""
    table = polygons_table(rows)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
    return int(table.num_rows)
