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
import math
from collections.abc import Sequence
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
    "combine_polygon_files",
    "with_geo_metadata",
    "write_polygons",
]

GEOPARQUET_VERSION = "1.1.0"
WINDOW = 4096  # pixels per side of a traced window: bounds memory at ~16 M labels at a time

#: Fixed cost of one polygonize call, in pixels of tracing (see _boxes_pay).
BOX_COST_PIXELS = 25_000

Labels = str | Path | npt.NDArray[np.integer[Any]]


@dataclass(frozen=True)
class DetectionInfo:
    """What the manifest says about one label value of an image.

    With ``box`` (pixels, x0 y0 x1 y1) and ``area_px`` (its pixel count in the label map) only that
    box is traced; the traced area must equal ``area_px`` (an outline on pixel corners has exactly
    the pixel count as area), otherwise the label is traced over the whole map: a box that is too
    small costs time, never a clipped polygon.
    """

    index: int
    prompt: str
    score: float
    tiles: int = 1  # tiles the instance was seen in (1 for an untiled image)
    box: tuple[float, float, float, float] | None = None
    area_px: int | None = None


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
    with _LabelReader(labels) as reader:
        for y0 in range(0, reader.height, window):
            for x0 in range(0, reader.width, window):
                block = reader.read(x0, y0, x0 + window, y0 + window)
                for geojson, value in shapes(block, mask=block > 0, transform=Affine.translation(x0, y0)):
                    parts.setdefault(int(value), []).append(shape(geojson))
    return {value: _finish(pieces, simplify) for value, pieces in parts.items()}


def _finish(pieces: list[shapely.Geometry], simplify: float) -> shapely.Geometry:
    # union_all leaves the vertices where a seam crossed an edge; simplify(0) drops exactly those
    # (collinear on integer coordinates), so a traced window size never shows in the output.
    geom = pieces[0] if len(pieces) == 1 else shapely.union_all(pieces).simplify(0.0)
    return geom.simplify(simplify, preserve_topology=True) if simplify > 0 else geom


def _boxed_shapes(
    labels: Labels, detections: Sequence[DetectionInfo], window: int, simplify: float
) -> dict[int, shapely.Geometry]:
    """Trace each detection inside its box (GDAL's polygonize costs per pixel: boxes are usually a
    small part of the image); labels whose box did not hold them all are traced over the whole map."""
    found: dict[int, shapely.Geometry] = {}
    retrace = False
    with rasterio.Env(), _LabelReader(labels) as reader:
        if not _boxes_pay(reader, detections):
            return label_shapes(labels, window, simplify)
        for det in detections:
            geom = _trace_box(reader, det, window)
            if geom is not None:
                found[det.index] = geom.simplify(simplify, preserve_topology=True) if simplify > 0 else geom
            elif det.area_px != 0:  # a label with no pixels left has no polygon: nothing to retrace
                retrace = True
    if retrace:
        everything = label_shapes(labels, window, simplify)
        found.update({i: g for i, g in everything.items() if i not in found})
    return found


def _boxes_pay(reader: _LabelReader, detections: Sequence[DetectionInfo]) -> bool:
    """Whether tracing box by box beats one pass over the map: each call of rasterio's polygonize
    has a fixed cost of about ``BOX_COST_PIXELS`` pixels' worth of tracing (measured on a 2-core
    machine: ~1.5 ms per call against ~60 ns per pixel), so boxes win for sparse scenes only."""
    if not detections or any(d.box is None or d.area_px is None for d in detections):
        return False
    boxes = [d.box for d in detections if d.box is not None]
    boxed = sum((x1 - x0 + 2) * (y1 - y0 + 2) for x0, y0, x1, y1 in boxes)
    return bool(len(detections) * BOX_COST_PIXELS + boxed < 0.8 * reader.width * reader.height)


def _trace_box(reader: _LabelReader, det: DetectionInfo, window: int) -> shapely.Geometry | None:
    """The label's outline from inside its box, or None when the box is missing, too large or
    did not hold every pixel of the label."""
    if det.box is None or det.area_px is None:
        return None
    bx0, by0, bx1, by1 = det.box
    x0, y0 = max(0, math.floor(bx0) - 1), max(0, math.floor(by0) - 1)
    x1, y1 = min(reader.width, math.ceil(bx1) + 1), min(reader.height, math.ceil(by1) + 1)
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) > window * window:
        return None
    inside = (reader.read(x0, y0, x1, y1) == det.index).astype(np.uint8)
    traced = shapes(inside, mask=inside > 0, transform=Affine.translation(x0, y0))
    pieces = [shape(g) for g, _ in traced]
    geom = _finish(pieces, 0.0) if pieces else None
    return geom if geom is not None and geom.area == det.area_px else None


class _LabelReader:
    """Windows of a label map held in memory or in a raster file (GeoTIFF or PNG)."""

    def __init__(self, labels: Labels) -> None:
        self._array = labels if isinstance(labels, np.ndarray) else None
        self._path = None if isinstance(labels, np.ndarray) else labels
        self._src: Any = None
        self.height, self.width = labels.shape if isinstance(labels, np.ndarray) else (0, 0)

    def __enter__(self) -> _LabelReader:
        if self._path is not None:
            self._src = rasterio.open(self._path)
            self.height, self.width = self._src.height, self._src.width
        return self

    def __exit__(self, *exc: object) -> None:
        if self._src is not None:
            self._src.close()

    def read(self, x0: int, y0: int, x1: int, y1: int) -> npt.NDArray[Any]:
        x1, y1 = min(x1, self.width), min(y1, self.height)
        if self._array is not None:
            return _shapes_dtype(self._array[y0:y1, x0:x1])
        return _shapes_dtype(self._src.read(1, window=Window(x0, y0, x1 - x0, y1 - y0)))


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
    outlines = _boxed_shapes(labels, detections, window, simplify)
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


_TYPE_NAMES = {3: "Polygon", 6: "MultiPolygon"}  # shapely type ids of what outlines can be
_FIELDS = ("path", "prompt", "index", "score", "area", "area_unit", "tiles", "crs", "run_id", "model")


def polygons_table(rows: Sequence[PolygonRow]) -> pa.Table:
    """The rows as an Arrow table carrying GeoParquet 1.1 ``geo`` metadata."""
    columns: dict[str, list[Any]] = {name: [getattr(row, name) for row in rows] for name in _FIELDS}
    columns["geometry"] = [row.geometry for row in rows]
    columns["bbox"] = [dict(zip(("xmin", "ymin", "xmax", "ymax"), row.bbox, strict=True)) for row in rows]
    return with_geo_metadata(pa.table(columns, schema=_SCHEMA))


def with_geo_metadata(table: pa.Table) -> pa.Table:
    """``table`` (the polygons schema) with its ``geo`` metadata computed from its own columns, so
    per-image tables concatenated for the manifest get metadata true for all their rows. The
    manifest's table also has ``class`` (``--class``, set at export), last."""
    schema = _SCHEMA.append(pa.field("class", pa.string())) if "class" in table.column_names else _SCHEMA
    table = table.select(schema.names).cast(schema)
    crss = set(table.column("crs").to_pylist())
    one = len(crss) == 1 and None not in crss
    crs_json = pyproj.CRS.from_user_input(crss.pop()).to_json_dict() if one else None
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted({_TYPE_NAMES[int(i)] for i in np.unique(shapely.get_type_id(geoms))}),
        "crs": crs_json,  # explicit null = unknown; leaving it out would mean OGC:CRS84
        "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if table.num_rows and crs_json is not None:
        bbox = table.column("bbox").combine_chunks()
        low = [min(bbox.field(k).to_pylist()) for k in ("xmin", "ymin")]
        high = [max(bbox.field(k).to_pylist()) for k in ("xmax", "ymax")]
        column["bbox"] = [*low, *high]
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}
    return table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})


def write_polygons(path: str | Path, rows: Sequence[PolygonRow] | pa.Table) -> int:
    """Write ``polygons.parquet`` atomically from rows or from a polygons table (for example the
    concatenation of per-image tables); returns the number of rows."""
    table = with_geo_metadata(rows) if isinstance(rows, pa.Table) else polygons_table(rows)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
    return int(table.num_rows)


def combine_polygon_files(parts: Sequence[str | Path], path: str | Path) -> int:
    """One ``polygons.parquet`` from per-image files written by ``write_polygons``."""
    tables = [pq.read_table(part) for part in parts]
    table = pa.concat_tables(tables) if tables else polygons_table([])
    return write_polygons(path, table)
