"""Label maps on the source grid: a GeoTIFF written window by window, or sidecars for a PNG mask.

The GeoTIFF has the input's CRS, transform and size exactly; uint16 (uint32 past 65535 labels),
nodata 0, 512x512 tiles, DEFLATE with PREDICTOR=2, BIGTIFF=IF_SAFER. It is written to a temp name
beside the target and renamed into place, so a reader never sees half a label map.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic import atomic_path, atomic_write_bytes
from ._extra import missing_extra
from .georef import Georef, world_file_text

try:
    import pyproj
    import rasterio
    from rasterio.windows import Window
except ImportError as _exc:  # pragma: no cover
    raise missing_extra(_exc) from _exc

__all__ = [
    "LabelWriter",
    "label_dtype",
    "label_profile",
    "open_label_geotiff",
    "write_label_geotiff",
    "write_png_sidecars",
]

BLOCK = 512


def label_dtype(max_label: int) -> str:
    """uint16 while the labels fit, else uint32."""
    return "uint16" if max_label <= np.iinfo(np.uint16).max else "uint32"


def label_profile(georef: Georef, max_label: int) -> dict[str, Any]:
    """The creation options of a label GeoTIFF on ``georef``'s grid."""
    return {
        "driver": "GTiff",
        "width": georef.width,
        "height": georef.height,
        "count": 1,
        "dtype": label_dtype(max_label),
        "crs": georef.crs,
        "transform": georef.affine,
        "nodata": 0,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "predictor": 2,
        "BIGTIFF": "IF_SAFER",
    }


class LabelWriter:
    """An open label GeoTIFF; ``write`` puts one window (x0, y0 from the upper-left) at a time."""

    def __init__(self, dst: rasterio.io.DatasetWriter, dtype: str) -> None:
        self._dst = dst
        self._dtype = dtype

    def write(self, x0: int, y0: int, labels: npt.NDArray[np.integer[Any]]) -> None:
        height, width = labels.shape
        self._dst.write(labels.astype(self._dtype, copy=False), 1, window=Window(x0, y0, width, height))


@contextlib.contextmanager
def open_label_geotiff(path: str | os.PathLike[str], georef: Georef, max_label: int) -> Iterator[LabelWriter]:
    """Yield a writer; the file appears at ``path`` only when the block ends without error."""
    profile = label_profile(georef, max_label)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        yield LabelWriter(dst, profile["dtype"])


def write_label_geotiff(
    path: str | os.PathLike[str],
    georef: Georef,
    labels: npt.NDArray[np.integer[Any]],
    rows_per_write: int = BLOCK * 8,
) -> None:
    """Write a whole label array (rows at a time, so GDAL never holds a second full copy)."""
    if labels.shape != (georef.height, georef.width):
        raise ValueError(f"labels {labels.shape} do not match the grid {(georef.height, georef.width)}")
    with open_label_geotiff(path, georef, int(labels.max(initial=0))) as writer:
        for y0 in range(0, georef.height, rows_per_write):
            writer.write(0, y0, labels[y0 : y0 + rows_per_write])


def write_png_sidecars(png_path: str | os.PathLike[str], georef: Georef) -> list[Path]:
    """World file (``x.pgw``), ``x.prj`` (ESRI WKT) and ``x.png.aux.xml`` (the CRS as GDAL and QGIS
    read it for a PNG) beside a PNG label map; returns the files written."""
    png = Path(png_path)
    written = [png.with_suffix(".pgw")]
    atomic_write_bytes(written[0], world_file_text(georef.transform).encode())
    if georef.crs_wkt is not None:
        crs = pyproj.CRS.from_wkt(georef.crs_wkt)
        written.append(png.with_suffix(".prj"))
        atomic_write_bytes(written[1], crs.to_wkt(pyproj.enums.WktVersion.WKT1_ESRI).encode())
        written.append(png.with_name(png.name + ".aux.xml"))
        srs = crs.to_wkt().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        aux = f'<PAMDataset>\n  <SRS dataAxisToSRSAxisMapping="1,2">{srs}</SRS>\n</PAMDataset>\n'
        atomic_write_bytes(written[2], aux.encode())
    return written
