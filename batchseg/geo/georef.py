"""Read an input's georeference into a small picklable :class:`Georef`.

Sources, in GDAL's order of trust: the file's own georeference (GeoTIFF keys), else a world file
beside it (``.jgw .pgw .tfw .wld`` or the ``...w`` form: six lines A, D, B, E, C, F where C, F are
the map coordinates of the CENTRE of the upper-left pixel, so the affine origin is half a pixel
up-left of them) with the CRS from a ``.prj`` (ESRI or OGC WKT) or ``.aux.xml``. A rotated or sheared
transform is kept as it is: every output uses the full affine, so it stays exact. A degenerate
transform (zero determinant) or an unreadable CRS is refused with :class:`GeoreferenceError`.
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ._extra import GeoreferenceError, missing_extra
from .detect import world_file_for

try:
    import pyproj
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess without the extra
    raise missing_extra(_exc) from _exc

__all__ = [
    "Georef",
    "ground_pixel_size",
    "parse_world_file",
    "read_georef",
    "world_file_for",
    "world_file_text",
]

Transform = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Georef:
    """Where an image's pixels lie on the ground; picklable, a few hundred bytes plus the WKT.

    ``transform`` is the affine (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f,
    from the upper-left CORNER of pixel (0, 0). ``crs_wkt`` is WKT2 (None: a world file without a CRS).
    """

    transform: Transform
    crs_wkt: str | None
    epsg: int | None
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    source: str  # "internal" (the file's own keys) or the world file's name
    colorinterp: tuple[str, ...] = ()

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def crs(self) -> CRS | None:
        return None if self.crs_wkt is None else CRS.from_wkt(self.crs_wkt)

    @property
    def rotated(self) -> bool:
        """True when the grid is not north-up (rotation or shear terms)."""
        return self.transform[1] != 0.0 or self.transform[3] != 0.0

    @property
    def pixel_size(self) -> tuple[float, float]:
        """Ground size of a pixel along columns and rows, in CRS units (exact for rotated grids too)."""
        a, b, _, d, e, _ = self.transform
        return math.hypot(a, d), math.hypot(b, e)


def ground_pixel_size(georef: Georef) -> float | None:
    """Metres on the ground per pixel (geometric mean of both grid axes), for ``--gsd``; at the
    image centre for a geographic CRS; None without a CRS."""
    if georef.crs_wkt is None:
        return None
    crs = pyproj.CRS.from_wkt(georef.crs_wkt)
    t = georef.affine
    if crs.is_geographic:
        geod = crs.get_geod() or pyproj.Geod(ellps="WGS84")
        cx, cy = georef.width / 2, georef.height / 2
        x0, y0 = t.a * cx + t.b * cy + t.c, t.d * cx + t.e * cy + t.f
        along_col = geod.line_length([x0, x0 + t.a], [y0, y0 + t.d])
        along_row = geod.line_length([x0, x0 + t.b], [y0, y0 + t.e])
        return math.sqrt(along_col * along_row)
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    col, row = georef.pixel_size
    return math.sqrt(col * row) * factor


def read_georef(path: str | os.PathLike[str]) -> Georef | None:
    """The georeference of ``path``, or None when it has none (a plain photo).

    Raises :class:`GeoreferenceError` for a file GDAL cannot open or a georeference that cannot be used.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                internal = _internal(src)
                info = (src.width, src.height, src.count, src.dtypes[0], src.nodata)
                interp = tuple(ci.name for ci in src.colorinterp)
    except RasterioIOError as exc:
        raise GeoreferenceError(f"cannot read {path.name} as a raster: {exc}") from exc
    if internal is not None:
        transform, crs, source = internal[0], internal[1], "internal"
    else:
        world = world_file_for(path)
        if world is None:
            return None
        transform, crs, source = (
            parse_world_file(world.read_text(encoding="utf-8")),
            _sidecar_crs(path),
            world.name,
        )
    return _record(path, transform, crs, source, info, interp)


def _internal(src: rasterio.DatasetReader) -> tuple[Affine, CRS | None] | None:
    """The file's own georeference; GDAL also reports world files it found, which we read ourselves."""
    files = [Path(f).suffix.lower() for f in (src.files or [])[1:]]
    from_world = any(s.endswith("w") or s == ".wld" for s in files)
    if src.driver != "GTiff" or from_world:
        return None
    if src.crs is None and src.transform == Affine.identity():
        if src.gcps[0]:
            # Ground control points locate the image only after a warp: tracing pixels onto them
            # would need a model of the terrain we do not have.
            raise GeoreferenceError(
                f"{Path(src.name).name} is georeferenced by ground control points only: "
                "warp it to a grid first (gdalwarp) or use it without georeference"
            )
        return None
    return src.transform, src.crs


def _record(
    path: Path,
    transform: Affine,
    crs: CRS | None,
    source: str,
    info: tuple[int, int, int, str, float | None],
    interp: tuple[str, ...],
) -> Georef:
    if abs(transform.determinant) < 1e-300 or not all(math.isfinite(v) for v in tuple(transform)[:6]):
        raise GeoreferenceError(f"{path.name}: the transform {tuple(transform)[:6]} is degenerate")
    wkt, epsg = _crs_fields(path, crs)
    width, height, count, dtype, nodata = info
    six = tuple(float(v) for v in tuple(transform)[:6])
    return Georef(six, wkt, epsg, width, height, count, dtype, nodata, source, interp)  # type: ignore[arg-type]


def _crs_fields(path: Path, crs: CRS | None) -> tuple[str | None, int | None]:
    if crs is None:
        return None, None
    try:
        wkt = crs.to_wkt(version="WKT2_2019")
        epsg = pyproj.CRS.from_wkt(wkt).to_epsg()
    except Exception as exc:  # CRSError and PROJ errors: this image's CRS is unusable
        raise GeoreferenceError(f"{path.name}: unsupported CRS ({exc})") from exc
    return str(wkt), epsg


# ------------------------------------------------------------------------------ world files


def parse_world_file(text: str) -> Affine:
    """The affine transform (upper-left corner origin) from a world file's six lines."""
    try:
        a, d, b, e, c, f = (float(line) for line in text.split()[:6])
        if len(text.split()) < 6:
            raise ValueError("fewer than six numbers")
    except ValueError as exc:
        raise GeoreferenceError(f"not a world file (six numbers, one a line): {exc}") from exc
    # C, F locate the centre of pixel (0, 0): move half a pixel back along both grid axes.
    return Affine(a, b, c - 0.5 * a - 0.5 * b, d, e, f - 0.5 * d - 0.5 * e)


def world_file_text(transform: Affine | Transform) -> str:
    """Six lines for ``transform`` (corner origin), with C, F at the centre of the upper-left pixel."""
    a, b, c, d, e, f = tuple(transform)[:6]
    values = (a, d, b, e, c + 0.5 * a + 0.5 * b, f + 0.5 * d + 0.5 * e)
    return "".join(f"{v!r}\n" for v in values)


def _sidecar_crs(path: Path) -> CRS | None:
    """The CRS from ``x.prj`` (ESRI or OGC WKT) or ``x.jpg.aux.xml`` (GDAL's PAM ``<SRS>``)."""
    prj = path.with_suffix(".prj")
    aux = path.with_name(path.name + ".aux.xml")
    try:
        if prj.is_file():
            return _to_rasterio(pyproj.CRS.from_user_input(prj.read_text(encoding="utf-8").strip()))
        if aux.is_file():
            srs = ET.parse(aux).getroot().find("SRS")
            if srs is not None and srs.text:
                return _to_rasterio(pyproj.CRS.from_user_input(srs.text.strip()))
    except (pyproj.exceptions.CRSError, ET.ParseError, OSError) as exc:
        raise GeoreferenceError(f"{path.name}: cannot read the CRS beside it ({exc})") from exc
    return None


def _to_rasterio(crs: pyproj.CRS) -> CRS:
    return CRS.from_wkt(crs.to_wkt())
