"""Label maps on the source grid: a cloud-optimized GeoTIFF written block by block, or sidecars
for a PNG mask.

The GeoTIFF has the input's CRS, transform and size exactly; uint16 (uint32 past 65535 labels),
nodata 0, the layout of ``cog`` (512x512 tiles, DEFLATE with the predictor, nearest overviews,
IFDs first). Its GeoTIFF keys are GDAL's own: GDAL writes a one-pixel GeoTIFF with the CRS and
transform in memory and its tags are copied, so every CRS GDAL can encode is encoded as GDAL does.
It is written to a temp name beside the target and renamed into place, so a reader never sees half
a label map.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic import atomic_write_bytes
from ..cog import Tag, nodata_tag, value_bytes, write_cog_atomically
from ._extra import missing_extra
from .georef import Georef, world_file_text

try:
    import pyproj
    import rasterio
    import tifffile
    from rasterio.io import MemoryFile
except ImportError as _exc:  # pragma: no cover
    raise missing_extra(_exc) from _exc

__all__ = [
    "GEO_TAGS",
    "geotiff_tags",
    "label_dtype",
    "write_label_geotiff",
    "write_png_sidecars",
]

#: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams,
#: GeoAsciiParams: the tags that say where a GeoTIFF lies.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)


def label_dtype(max_label: int) -> str:
    """uint16 while the labels fit, else uint32."""
    return "uint16" if max_label <= np.iinfo(np.uint16).max else "uint32"


def geotiff_tags(georef: Georef, nodata: int | None = 0) -> list[Tag]:
    """The GeoTIFF tags of ``georef``'s CRS and transform as GDAL writes them, plus GDAL's nodata."""
    profile = {"driver": "GTiff", "width": 1, "height": 1, "count": 1, "dtype": "uint8"}
    with rasterio.Env(GTIFF_WRITE_TOWGS84="AUTO"), MemoryFile() as memory:
        with memory.open(**profile, crs=georef.crs, transform=georef.affine) as dst:
            dst.write(np.zeros((1, 1, 1), np.uint8))
        data = memory.read()
    tags = []
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if tif.byteorder != "<":  # pragma: no cover - GDAL writes the machine's order, little-endian
            raise ValueError("GDAL wrote a big-endian GeoTIFF")
        for tag in tif.pages.first.tags:
            if tag.code in GEO_TAGS:
                size = value_bytes(int(tag.dtype), tag.count)
                raw = data[tag.valueoffset : tag.valueoffset + size]
                tags.append(Tag(tag.code, int(tag.dtype), tag.count, raw))
    return tags + ([nodata_tag(nodata)] if nodata is not None else [])


class _Array:
    """A label array in memory as a ``cog.Painter``."""

    def __init__(self, labels: npt.NDArray[np.integer[Any]]) -> None:
        self.labels = labels

    def __call__(self, out: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> bool:
        if cols[-1] - cols[0] + 1 == cols.size and rows[-1] - rows[0] + 1 == rows.size:
            part = self.labels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        else:
            part = self.labels[np.ix_(rows, cols)]
        if not part.any():
            return False
        out[...] = part
        return True


def write_label_geotiff(
    path: str | os.PathLike[str], georef: Georef, labels: npt.NDArray[np.integer[Any]]
) -> None:
    """Write a whole label array as a COG GeoTIFF on ``georef``'s grid."""
    if labels.shape != (georef.height, georef.width):
        raise ValueError(f"labels {labels.shape} do not match the grid {(georef.height, georef.width)}")
    dtype = np.uint16 if label_dtype(int(labels.max(initial=0))) == "uint16" else np.uint32
    write_cog_atomically(path, georef.width, georef.height, dtype, _Array(labels), geotiff_tags(georef))


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
