"""Pixels in: what an engine is given of an item, whole image or window, georeferenced or not.

``ImageReader.read(item)`` is the one place a worker turns an ``Item`` into the pixels the model
sees (a ``Picture``), or into the item's failure: ``invalid_input`` for a file that is not a
readable image, ``error`` for anything else. A plain image goes through ``imageio.read_image``
(EXIF orientation and all). A georeferenced input (GeoTIFF keys, or a world file beside the image)
is read through rasterio (``geo.bands``: band choice, one stretch per image, nodata mask) and never
EXIF-transposed. An item with a ``window`` (a tile) is read through ``tiles.WindowReader``, which
keeps its image open between windows and reads a tiled TIFF chunk by chunk; its picture says the
whole image's size. So an engine that reads through this module gets tiling, georeference and
nodata without a line of its own, and ``Picture.found`` turns its labels and instances into the
``Segmentation`` the worker's writer takes.

Inside the SAM3 pipeline a PIL image carries its georeference and valid-pixel mask in
``image.info`` (``GEOREF_KEY``, ``VALID_KEY``), as it does the size of a draft-decoded JPEG.
Torch-free; the geo modules are imported only for georeferenced inputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .. import imageio
from ..errors import InvalidImageError
from ..geo import require_geo
from ..geo._extra import raster_unreadable
from ..geo.detect import looks_georeferenced
from ..records import Item, ItemResult, Status, failure_result
from ..remote import localize
from ..tiles.windows import WholeDecoder, WindowReader
from .contract import Instance, Segmentation

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..geo.georef import Georef

__all__ = [
    "GEOREF_KEY",
    "VALID_KEY",
    "ImageReader",
    "Picture",
    "georef_of",
    "read_for_engine",
    "valid_of",
]

#: ``image.info`` keys: the input's Georef, and its HxW bool mask of valid pixels (absent: all valid).
GEOREF_KEY = "batchseg_georef"
VALID_KEY = "batchseg_valid"


@dataclass
class Picture:
    """The pixels of an item as the model sees them: ``image`` is upright RGB, the whole image or
    the item's window; ``size`` the whole image's (width, height) when ``image`` is a window (None:
    it is the whole image); ``georef`` and ``valid`` (HxW bool, False on nodata; None: all valid)
    as the input has them; ``started_at`` when the read began."""

    item: Item
    image: Image.Image
    size: tuple[int, int] | None = None
    georef: Georef | None = None
    valid: np.ndarray | None = field(default=None, repr=False)
    started_at: float = field(default_factory=time.time)

    @cached_property
    def pixels(self) -> np.ndarray:
        """Height x width x 3 uint8, read-only; made once (each ``np.asarray`` of an image copies)."""
        return np.asarray(self.image)

    def found(self, labels: np.ndarray, instances: list[Instance]) -> Segmentation:
        """What the engine found in this picture, as the worker's writer takes it."""
        return Segmentation(
            labels,
            instances,
            size=self.size,
            georef=self.georef,
            valid=self.valid,
            started_at=self.started_at,
        )


class ImageReader:
    """Reads the items of a run's input for an engine; safe to share between I/O threads. ``close``
    lets go of the image a tiled item kept open."""

    def __init__(self, config: RunConfig, decode: WholeDecoder | None = None) -> None:
        self.config = config
        self.root = Path(config.input)
        # ``decode``: the engine's own decoder for images cut into tiles from their whole pixels.
        self.windows = WindowReader(config.max_pixels, config.max_tiled_pixels, decode)

    def read(self, item: Item, *, draft_side: int | None = None) -> Picture | ItemResult:
        """The item's ``Picture``, or its failure. ``draft_side``: a whole JPEG may be decoded at a
        reduced scale whose sides stay at least this long (never a window)."""
        started = time.time()
        try:
            if item.window is not None:
                return self._window(item, item.window, started)
            image = read_for_engine(self.root / item.path, self.config, draft_side=draft_side)
            return Picture(item, image, None, georef_of(image), valid_of(image), started)
        except InvalidImageError as exc:
            return failure_result(item, Status.INVALID_INPUT, exc=exc, started_at=started)
        except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
            return failure_result(item, Status.ERROR, exc=exc, started_at=started)

    def prefetch(self, item: Item) -> None:
        """The image of ``item`` comes next as tiles: open (decode) it while the current one runs."""
        self.windows.prefetch(self.root / item.path)

    def close(self) -> None:
        self.windows.close()

    def _window(self, item: Item, window: tuple[int, int, int, int], started: float) -> Picture:
        # A tile's georeference is the tiled image's (the worker's tiling holds it), not the window's.
        pixels, width, height, valid = self.windows.read(self.root / item.path, window)
        image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
        return Picture(item, image, (width, height), None, valid, started)


def read_for_engine(
    path: str | os.PathLike[str], config: RunConfig, *, draft_side: int | None = None
) -> Image.Image:
    """The RGB image of ``path`` for the model; see the module docstring. InvalidImageError (and its
    GeoreferenceError) for a per-image problem."""
    path = localize(path)  # an object in S3: its /vsis3/ path (georeferenced TIFF) or a local copy
    if looks_georeferenced(path):
        image = _read_georeferenced(path, config)
        if image is not None:
            return image
    return imageio.read_image(path, config.max_pixels, draft_side=draft_side)


def _read_georeferenced(path: str | os.PathLike[str], config: RunConfig) -> Image.Image | None:
    """A georeferenced input through rasterio, or None when it turns out to have no georeference."""
    imageio.check_not_empty(path)  # the same sentence as for any other empty file
    require_geo(f"{Path(path).name} is georeferenced; reading it")
    from rasterio.errors import RasterioError

    from ..geo.bands import plan_bands, read_rgb
    from ..geo.georef import read_georef

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
