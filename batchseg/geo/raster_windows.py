"""A georeferenced input read by window (``tiles.ImageSource``): rasterio underneath, the bands and
the one stretch per image of ``geo.bands``, so every tile of an image has the same contrast, and the
valid-pixel mask of each window for clearing nodata from its masks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ._extra import missing_extra
from .bands import BandPlan, plan_bands, read_rgb
from .georef import Georef, read_georef

try:
    import rasterio
except ImportError as _exc:  # pragma: no cover
    raise missing_extra(_exc) from _exc

__all__ = ["GeoSource"]

Window = tuple[int, int, int, int]


class GeoSource:
    """Windows of a georeferenced raster as RGB uint8 (nodata black) plus their valid masks."""

    def __init__(
        self, path: str | os.PathLike[str], georef: Georef, bands: Sequence[int] | None = None
    ) -> None:
        self.georef = georef
        self.plan: BandPlan = plan_bands(path, bands)
        self._src = rasterio.open(path)
        self.width, self.height = self._src.width, self._src.height

    @classmethod
    def open(cls, path: str | os.PathLike[str], bands: Sequence[int] | None = None) -> GeoSource | None:
        """The source, or None when ``path`` has no georeference (GeoreferenceError when it is unusable)."""
        georef = read_georef(path)
        return None if georef is None else cls(path, georef, bands)

    def read(self, window: Window) -> npt.NDArray[np.uint8]:
        return read_rgb(self._src, self.plan, window)[0]

    def valid(self, window: Window) -> npt.NDArray[np.bool_]:
        """True where the window's pixels are data (not nodata): masks are cleared elsewhere."""
        return read_rgb(self._src, self.plan, window)[1]

    def read_with_valid(self, window: Window) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None]:
        """The window's pixels and, where it holds nodata, its valid mask (one read for both)."""
        pixels, valid = read_rgb(self._src, self.plan, window)
        return pixels, None if bool(valid.all()) else valid

    def close(self) -> None:
        self._src.close()
