"""One layer per run: ``labels.vrt``, a GDAL virtual mosaic over every georeferenced label map.

Written with the manifest (every export, periodic ones too), from the checkpoint's ok rows whose
label map is a GeoTIFF on a north-up grid: a VRT is XML that names each map and where it lies, so
it costs nothing to rewrite and QGIS or GDAL open the run as one raster (each map's overviews
serve the zoomed-out views). The mosaic's grid is the union of the maps' extents at the finest
pixel size among them; nodata 0, so a map's empty pixels never hide a neighbour's labels (where
maps overlap, the later path wins). Labels stay each map's own numbers (1..N per image); the
polygons of the same run are ``manifest/polygons.parquet``.

One mosaic has one CRS. When the maps have several, each CRS gets ``labels.<CRS>.vrt``
(``labels.EPSG_32633.vrt``, a CRS without an EPSG code its name and a hash) and there is no
``labels.vrt``; maps of world files without a CRS are ``labels.no_crs.vrt`` beside them. Rotated
or sheared grids cannot be mosaicked without resampling (GDAL's ``gdalbuildvrt`` refuses them
too): they are left out. Needs nothing but the standard library: the parent writes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..atomic import atomic_write_bytes

__all__ = ["MOSAIC_NAME", "LabelMap", "label_maps", "mosaic_name", "write_mosaics"]

MOSAIC_NAME = "labels.vrt"
NO_CRS = "no_crs"
_ROWS = (
    "SELECT mask_path, width, height, crs_wkt, crs_epsg, transform, n_detections FROM images"
    " WHERE status='ok' AND transform IS NOT NULL AND mask_path LIKE '%.tif' ORDER BY path"
)


@dataclass(frozen=True)
class LabelMap:
    """A georeferenced label map of the run: its path (relative to the output folder), size, grid."""

    mask_path: str
    width: int
    height: int
    crs_wkt: str | None
    epsg: int | None
    transform: tuple[float, float, float, float, float, float]
    labels: int  # detections: uint32 past 65535

    @property
    def frame(self) -> str:
        """The name part of the CRS's mosaic: ``EPSG_32633``, ``no_crs`` or a name and a hash."""
        if self.crs_wkt is None:
            return NO_CRS
        if self.epsg is not None:
            return f"EPSG_{self.epsg}"
        name = re.search(r'^\w+\["([^"]*)"', self.crs_wkt)
        tag = re.sub(r"[^A-Za-z0-9]+", "_", name.group(1) if name else "").strip("_")[:40] or "crs"
        return f"{tag}_{hashlib.sha1(self.crs_wkt.encode()).hexdigest()[:8]}"


def label_maps(conn: sqlite3.Connection) -> list[LabelMap]:
    """The run's georeferenced GeoTIFF label maps on north-up grids, in path order."""
    maps = []
    for mask, width, height, wkt, epsg, transform, n in conn.execute(_ROWS):
        a, b, c, d, e, f = (float(v) for v in json.loads(transform))
        if b != 0.0 or d != 0.0 or a <= 0.0 or e >= 0.0:
            continue  # rotated, sheared or flipped: no mosaic without resampling
        maps.append(LabelMap(mask, int(width), int(height), wkt, epsg, (a, b, c, d, e, f), int(n or 0)))
    return maps


def mosaic_name(frame: str, frames: Iterable[str]) -> str:
    """``labels.vrt`` when every map shares the frame, else ``labels.<frame>.vrt``."""
    return MOSAIC_NAME if set(frames) == {frame} else f"labels.{frame}.vrt"


def write_mosaics(output_dir: Path, maps: Sequence[LabelMap]) -> list[Path]:
    """Write the mosaic of each CRS (see the module), remove mosaics no map is in any more; returns
    the files written."""
    by_frame: dict[str, list[LabelMap]] = defaultdict(list)
    for item in maps:
        by_frame[item.frame].append(item)
    written = []
    for frame, members in by_frame.items():
        target = Path(output_dir) / mosaic_name(frame, by_frame)
        atomic_write_bytes(target, vrt_xml(members).encode())
        written.append(target)
    folder = Path(output_dir)
    for stale in [*folder.glob(MOSAIC_NAME), *folder.glob("labels.*.vrt")]:
        if stale not in written:
            stale.unlink(missing_ok=True)
    return written


def vrt_xml(maps: Sequence[LabelMap]) -> str:
    """The VRT of ``maps`` (one CRS, north-up): the union of their extents at the finest pixel size."""
    res_x = min(m.transform[0] for m in maps)
    res_y = min(-m.transform[4] for m in maps)
    left = min(m.transform[2] for m in maps)
    top = max(m.transform[5] for m in maps)
    right = max(m.transform[2] + m.width * m.transform[0] for m in maps)
    bottom = min(m.transform[5] + m.height * m.transform[4] for m in maps)
    width, height = max(1, round((right - left) / res_x)), max(1, round((top - bottom) / res_y))
    kind = "UInt32" if any(m.labels > 65535 for m in maps) else "UInt16"
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">']
    if maps[0].crs_wkt is not None:
        lines.append(f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(maps[0].crs_wkt)}</SRS>')
    lines.append(f"  <GeoTransform>{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {-res_y!r}</GeoTransform>")
    lines.append(f'  <VRTRasterBand dataType="{kind}" band="1">')
    lines.append("    <NoDataValue>0</NoDataValue>")
    for m in maps:
        a, _, c, _, e, f = m.transform
        source = "UInt32" if m.labels > 65535 else "UInt16"
        x_off, y_off = (c - left) / res_x, (top - f) / res_y
        x_size, y_size = m.width * a / res_x, m.height * -e / res_y
        lines += [
            "    <ComplexSource>",
            f'      <SourceFilename relativeToVRT="1">{escape(m.mask_path)}</SourceFilename>',
            "      <SourceBand>1</SourceBand>",
            f'      <SourceProperties RasterXSize="{m.width}" RasterYSize="{m.height}" DataType='
            f'{quoteattr(source)} BlockXSize="512" BlockYSize="512"/>',
            f'      <SrcRect xOff="0" yOff="0" xSize="{m.width}" ySize="{m.height}"/>',
            f'      <DstRect xOff="{x_off!r}" yOff="{y_off!r}" xSize="{x_size!r}" ySize="{y_size!r}"/>',
            "      <NODATA>0</NODATA>",
            "    </ComplexSource>",
        ]
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    return "\n".join(lines)
