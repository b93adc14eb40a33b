"""What the engines read per image, georeferenced or not: one place for every engine.

``read_for_engine`` gives the RGB image the model sees. A plain image goes through
``imageio.read_image`` (EXIF orientation and all). A georeferenced input (GeoTIFF keys, or a world
file beside the image) is read through rasterio (``geo.bands``: band choice, one stretch per image,
nodata mask) and never EXIF-transposed; its :class:`~batchseg.geo.georef.Georef` and valid-pixel
mask travel in ``image.info``, as the size of a draft-decoded JPEG does, so an engine's pipeline
carries them without new parameters. What is written of an image is the worker's
(``worker.writer``); ``polygons_relpath`` names its polygons part file for the store too.
``check_geo_extra`` is the parent's check that the extra is there when needed.
Torch-free; the geo modules are imported only for georeferenced inputs and ``--vectors``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import imageio
from .geo import RUN_MODULES, require_geo
from .geo._extra import raster_unreadable
from .geo.detect import folder_listing, looks_georeferenced
from .remote import localize

if TYPE_CHECKING:
    from .config import RunConfig
    from .geo.georef import Georef

__all__ = [
    "GEOREF_KEY",
    "VALID_KEY",
    "check_geo_extra",
    "georef_fields",
    "georef_of",
    "polygons_relpath",
    "read_for_engine",
    "read_georeferenced",
    "valid_of",
]

#: ``image.info`` keys: the input's Georef, and its HxW bool mask of valid pixels (absent: all valid).
GEOREF_KEY = "batchseg_georef"
VALID_KEY = "batchseg_valid"


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
    path = localize(path)  # an object in S3: its /vsis3/ path (georeferenced TIFF) or a local copy
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


# ---- polygons ----------------------------------------------------------------------------------


def polygons_relpath(rel: str) -> str:
    """The per-image polygons part file, beside the label map; combined at manifest export."""
    return f"masks/{rel}.polygons.parquet"
