"""What the engines read and write per image, georeferenced or not: one place for both engines.

``read_for_engine`` gives the RGB image the model sees. A plain image goes through
``imageio.read_image`` (EXIF orientation and all). A georeferenced input (GeoTIFF keys, or a world
file beside the image) is read through rasterio (``geo.bands``: band choice, one stretch per image,
nodata mask) and never EXIF-transposed; its :class:`~batchseg.geo.georef.Georef` and valid-pixel
mask travel in ``image.info``, as the size of a draft-decoded JPEG does, so an engine's pipeline
carries them without new parameters. ``drop_nodata`` clears nodata pixels from a label map before
its detections are described; ``mask_relpath``, ``save_label_map`` and ``write_vectors`` put the
label map (a GeoTIFF on the source grid, or a PNG with world-file sidecars) and the polygons part
file in place. ``check_geo_extra`` is the parent's check that the extra is there when needed.
Torch-free; the geo modules are imported only for georeferenced inputs and ``--vectors``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image

from . import imageio
from .geo import RUN_MODULES, require_geo
from .geo._extra import raster_unreadable
from .geo.detect import folder_listing, looks_georeferenced

if TYPE_CHECKING:
    from .config import RunConfig
    from .geo.georef import Georef
    from .records import Detection

__all__ = [
    "GEOREF_KEY",
    "VALID_KEY",
    "check_geo_extra",
    "drop_nodata",
    "drop_unpainted",
    "georef_fields",
    "georef_of",
    "mask_relpath",
    "polygons_relpath",
    "read_for_engine",
    "read_georeferenced",
    "save_label_map",
    "valid_of",
    "write_vectors",
]

#: ``image.info`` keys: the input's Georef, and its HxW bool mask of valid pixels (absent: all valid).
GEOREF_KEY = "batchseg_georef"
VALID_KEY = "batchseg_valid"

T = TypeVar("T")


# ---- the parent's check ------------------------------------------------------------------------


def _extra_installed() -> bool:
    """Whether each module of the extra a run needs can be found, without importing it (the parent
    stays light)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in RUN_MODULES)
    except (ImportError, ValueError):
        return False


def check_geo_extra(config: RunConfig, paths: Iterable[str]) -> None:
    """Stop the run (GeoExtraMissing, exit 1) when it needs the geo extra and it is missing: with
    ``--vectors``, or when one of ``paths`` (relative to the input) is georeferenced. Images are
    looked at only when the extra is missing, and only until the first georeferenced one."""
    if _extra_installed():
        return
    if config.vectors:
        require_geo("--vectors")
    root = Path(config.input)
    listings: dict[Path, frozenset[str]] = {}
    for rel in paths:
        path = root / rel
        if path.parent not in listings:
            listings[path.parent] = folder_listing(path.parent)
        if looks_georeferenced(path, listings[path.parent]):
            require_geo(f"{rel} is georeferenced; reading it")
            return


# ---- reading -----------------------------------------------------------------------------------


def read_for_engine(
    path: str | os.PathLike[str], config: RunConfig, *, draft_side: int | None = None
) -> Image.Image:
    """The RGB image of ``path`` for the model; see the module docstring. InvalidImageError (and its
    GeoreferenceError) for a per-image problem."""
    if looks_georeferenced(path):
        image = read_georeferenced(path, config)
        if image is not None:
            return image
    return imageio.read_image(path, config.max_pixels, draft_side=draft_side)


def read_georeferenced(path: str | os.PathLike[str], config: RunConfig) -> Image.Image | None:
    """A georeferenced input through rasterio, or None when it turns out to have no georeference."""
    imageio.check_not_empty(path)  # the same sentence as for any other empty file
    require_geo(f"{Path(path).name} is georeferenced; reading it")
    from rasterio.errors import RasterioError

    from .geo.bands import plan_bands, read_rgb
    from .geo.georef import read_georef

    try:
        georef = read_georef(path)
        if georef is None:
            return None
        if georef.width * georef.height > config.max_pixels:
            raise imageio.too_many_pixels(georef.width, georef.height, config.max_pixels)
        plan = plan_bands(path, config.bands)
        import rasterio

        with rasterio.open(path) as src:
            rgb, valid = read_rgb(src, plan)
    except RasterioError as exc:  # damaged blocks, an unsupported compression...
        raise raster_unreadable(exc) from exc
    image = Image.fromarray(rgb, mode="RGB")
    image.info[GEOREF_KEY] = georef
    if not valid.all():
        image.info[VALID_KEY] = valid
    return image


def georef_of(image: Image.Image) -> Georef | None:
    georef: Georef | None = image.info.get(GEOREF_KEY)
    return georef


def valid_of(image: Image.Image, window: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
    """The valid-pixel mask of the image (or of its window); None when every pixel is valid."""
    valid: np.ndarray | None = image.info.get(VALID_KEY)
    if valid is None or window is None:
        return valid
    x0, y0, x1, y1 = window
    return valid[y0:y1, x0:x1]


def georef_fields(image: Image.Image | Georef | None) -> dict[str, Any]:
    """The georeference fields of an ItemResult for this image, or for a Georef (a tiled image's
    ``GeoSource.georef``); empty without one."""
    georef = georef_of(image) if isinstance(image, Image.Image) else image
    if georef is None:
        return {}
    return {
        "crs_wkt": georef.crs_wkt,
        "crs_epsg": georef.epsg,
        "transform": json.dumps(list(georef.transform)),
        "georef_source": georef.source,
    }


# ---- label maps --------------------------------------------------------------------------------


def drop_nodata(
    labels: np.ndarray, instances: Sequence[T], valid: np.ndarray
) -> tuple[np.ndarray, list[T], np.ndarray]:
    """``labels`` with the pixels where ``valid`` is False (nodata, from ``valid_of`` or a tile's
    read) cleared, the instances that still have pixels (renumbered 1..N in their order) and each
    one's pixel count: nodata never carries a detection."""
    labels = np.where(valid, labels, 0).astype(labels.dtype)
    counts = np.bincount(labels.ravel(), minlength=len(instances) + 1)
    return drop_unpainted(labels, instances, counts[1:].astype(np.int64))


def drop_unpainted(
    labels: np.ndarray, instances: Sequence[T], areas: np.ndarray
) -> tuple[np.ndarray, list[T], np.ndarray]:
    """The instances with at least one pixel in ``labels`` (``areas[k - 1]`` pixels of label k),
    renumbered 1..N in their order, and the map renumbered to match: a detection whose pixels all
    went to better ones is no detection (as in a tiled image's merge). The map is only rewritten
    when some instance has no pixel."""
    kept = np.flatnonzero(areas > 0) + 1
    if kept.size == len(instances):
        return labels, list(instances), areas
    lookup = np.zeros(len(instances) + 1, labels.dtype)
    lookup[kept] = np.arange(1, kept.size + 1)
    return lookup[labels], [instances[k - 1] for k in kept.tolist()], areas[kept - 1]


def mask_relpath(rel: str, image: Image.Image) -> str:
    """``masks/<rel>.tif`` for an input with its own georeference (GeoTIFF), else ``masks/<rel>.png``
    (a world-file image gets its sidecars beside the PNG)."""
    georef = georef_of(image)
    if georef is not None and georef.source == "internal":
        return f"masks/{rel}.tif"
    return imageio.mask_relpath(rel)


def save_label_map(target: str | os.PathLike[str], labels: np.ndarray, image: Image.Image) -> None:
    """The label map at ``target`` (from ``mask_relpath``): a GeoTIFF on the source grid, a PNG with
    world file, ``.prj`` and ``.aux.xml`` for a world-file image, or the plain 16-bit PNG."""
    georef = georef_of(image)
    if georef is not None and os.fspath(target).endswith(".tif"):
        from .geo.raster import write_label_geotiff

        write_label_geotiff(target, georef, labels)
        return
    imageio.save_label_map(target, labels)
    if georef is not None:
        from .geo.raster import write_png_sidecars

        write_png_sidecars(target, georef)


# ---- polygons ----------------------------------------------------------------------------------


def polygons_relpath(rel: str) -> str:
    """The per-image polygons part file, beside the label map; combined at manifest export."""
    return f"masks/{rel}.polygons.parquet"


def write_vectors(
    output_dir: Path,
    rel: str,
    labels: np.ndarray | str | os.PathLike[str],
    georef: Georef | None,
    detections: Sequence[Detection],
    config: RunConfig,
    tiles: Sequence[int] | None = None,
) -> str | None:
    """With ``--vectors``: one polygon per detection of this image to its part file (written every
    time, empty too, so a redone image never keeps stale polygons); returns its path or None.
    ``labels``: the label map in memory or its file; ``tiles``: per detection, tiles it was seen in."""
    if not config.vectors:
        return None
    from .geo.vectors import DetectionInfo, image_polygons, write_polygons

    infos = [
        DetectionInfo(d.index, d.prompt, float(d.score), tiles[i] if tiles else 1, d.box, d.area_px)
        for i, d in enumerate(detections)
    ]
    source: Any = labels if isinstance(labels, np.ndarray) else Path(labels)
    rows = image_polygons(
        rel, source, georef, infos, run_id="", model=config.model, simplify=config.simplify
    )  # run id and model are set when the parts are combined
    part = polygons_relpath(rel)
    write_polygons(imageio.safe_output_path(output_dir, part), rows)
    return part
