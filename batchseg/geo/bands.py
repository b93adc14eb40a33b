"""From any raster to the 8-bit RGB the model sees, one window at a time, plus a nodata mask.

Bands: ``--bands 1,2,3`` (1-based; one number means grey, repeated into RGB); by default the bands
whose colour interpretation is red, green, blue, else the first three, else band 1 as grey.
Stretch: 8-bit data is used as it is. Other data (uint16, int16, float32, ...) gets ONE linear
stretch per image and band, from the 2nd to the 98th percentile of the valid pixels (QGIS's default
cumulative cut), computed once from a decimated read of at most ``STATS_SIDE`` pixels on the long side
(GDAL serves it from an internal overview when the file has one) and applied identically to every
window, so tiles of one image never differ in contrast.

Valid pixels follow the dataset's mask as GDAL defines it: a per-dataset mask (an internal mask,
a ``.msk`` file, an alpha band) when the file has one, else the OR of the chosen bands' nodata
masks (a pixel is data when ANY chosen band is not at its nodata value), a NaN counting as nodata of
its band. So a pure red roof (255, 0, 0) in an RGB with nodata 0 is data; the collar, 0 in every
band, is not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ._extra import GeoreferenceError, missing_extra

try:
    import rasterio
    from rasterio.enums import ColorInterp, MaskFlags, Resampling
    from rasterio.windows import Window
except ImportError as _exc:  # pragma: no cover
    raise missing_extra(_exc) from _exc

__all__ = ["BandPlan", "PERCENTILES", "STATS_SIDE", "parse_bands", "plan_bands", "read_rgb", "valid_mask"]

#: Low and high percentile of the per-image stretch for data that is not 8-bit.
PERCENTILES = (2.0, 98.0)
#: Long side, in pixels, of the decimated read the stretch is computed from.
STATS_SIDE = 1024

Window_ = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class BandPlan:
    """Which bands feed R, G, B and how each is scaled to 0..255; computed once per image, picklable."""

    bands: tuple[int, int, int]  # 1-based band numbers for R, G, B
    stretch: tuple[tuple[float, float], ...] | None  # (low, high) per entry of ``bands``; None: 8-bit


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"1,2,3"`` -> (1, 2, 3); one or three positive band numbers; None/empty: the default choice."""
    if text is None or not text.strip():
        return None
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--bands {text!r}: give band numbers like 1,2,3 (or one band: 4)") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ConfigError(f"--bands {text!r}: give one or three band numbers, counted from 1")
    return bands


def plan_bands(path: str | os.PathLike[str], requested: Sequence[int] | None = None) -> BandPlan:
    """Choose the bands of ``path`` and compute its stretch; GeoreferenceError for a per-image problem."""
    with rasterio.open(path) as src:
        bands = _choose(src, requested, Path(path).name)
        if src.dtypes[bands[0] - 1] == "uint8" and all(src.dtypes[b - 1] == "uint8" for b in bands):
            _check_some_valid(src, bands, Path(path).name)
            return BandPlan(bands, None)
        return BandPlan(bands, _stretch(src, bands, Path(path).name))


def _choose(src: rasterio.DatasetReader, requested: Sequence[int] | None, name: str) -> tuple[int, int, int]:
    if requested:
        if max(requested) > src.count:
            raise GeoreferenceError(
                f"{name} has {src.count} band(s): --bands {list(requested)} is out of range"
            )
        r = tuple(requested)
        return (r[0], r[0], r[0]) if len(r) == 1 else (r[0], r[1], r[2])
    interp = list(src.colorinterp)
    wanted = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    if all(ci in interp for ci in wanted):
        red, green, blue = (interp.index(ci) + 1 for ci in wanted)
        return red, green, blue
    return (1, 2, 3) if src.count >= 3 else (1, 1, 1)


def _decimated(src: rasterio.DatasetReader, bands: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A small read of the whole image (values, valid mask); GDAL picks an overview when there is one."""
    scale = max(src.width, src.height) / STATS_SIDE
    shape = (max(1, round(src.height / max(scale, 1))), max(1, round(src.width / max(scale, 1))))
    unique = sorted(set(bands))
    how = {"out_shape": shape, "resampling": Resampling.nearest}
    data = src.read(unique, out_shape=(len(unique), *shape), resampling=Resampling.nearest)
    valid = valid_mask(src, unique, data, how)
    by_band = {b: data[i] for i, b in enumerate(unique)}
    return np.stack([by_band[b] for b in bands]), valid


def valid_mask(
    src: rasterio.DatasetReader, bands: Sequence[int], data: np.ndarray, how: dict[str, Any]
) -> npt.NDArray[np.bool_]:
    """True where a pixel is data, for ``data`` (the values of ``bands``, in that order) read with
    ``how`` (``window=`` or ``out_shape=``): GDAL's per-dataset mask (internal mask, ``.msk``,
    alpha) when there is one, else the OR of the bands' nodata masks; NaN is nodata of its band.
    One band mask is held at a time, so memory stays that of the window."""
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else None
    dataset = _dataset_mask(src, how)
    if dataset is not None:
        return dataset if finite is None else dataset & finite.any(axis=0)
    valid = np.zeros(data.shape[1:], bool)
    for i, band in enumerate(bands):
        band_valid = src.read_masks(band, **how) > 0
        valid |= band_valid if finite is None else band_valid & finite[i]
    return valid


def _dataset_mask(src: rasterio.DatasetReader, how: dict[str, Any]) -> npt.NDArray[np.bool_] | None:
    """The mask shared by every band, or None when each band has only its nodata value. An alpha
    band counts even when a nodata value shadows it for GDAL (as rasterio's ``dataset_mask``)."""
    mask: npt.NDArray[np.bool_]
    for band, flags in enumerate(src.mask_flag_enums, start=1):
        if MaskFlags.per_dataset in flags:
            mask = src.read_masks(band, **how) > 0
            return mask
    if ColorInterp.alpha in src.colorinterp:
        mask = src.read(src.colorinterp.index(ColorInterp.alpha) + 1, **how) > 0
        return mask
    return None


def _stretch(
    src: rasterio.DatasetReader, bands: tuple[int, int, int], name: str
) -> tuple[tuple[float, float], ...]:
    data, valid = _decimated(src, bands)
    if not valid.any():
        raise GeoreferenceError(f"{name}: every pixel is nodata")
    limits = []
    for band in data:
        values = band[valid].astype(np.float64)
        values = values[np.isfinite(values)]  # a pixel is data when ANY band is: skip this one's NaN
        if values.size == 0:
            raise GeoreferenceError(f"{name}: a chosen band is nodata wherever the image has data")
        low, high = np.percentile(values, PERCENTILES)
        limits.append((float(low), float(high) if high > low else float(low) + 1.0))
    return tuple(limits)


def _check_some_valid(src: rasterio.DatasetReader, bands: tuple[int, int, int], name: str) -> None:
    if not _decimated(src, bands)[1].any():
        raise GeoreferenceError(f"{name}: every pixel is nodata")


def read_rgb(
    src: rasterio.DatasetReader, plan: BandPlan, window: Window_ | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The window as HxWx3 uint8 RGB and its HxW valid mask (False = nodata: no detections there)."""
    x0, y0, x1, y1 = window if window is not None else (0, 0, src.width, src.height)
    win = Window(x0, y0, x1 - x0, y1 - y0)
    unique = sorted(set(plan.bands))
    data = src.read(unique, window=win)
    valid = valid_mask(src, unique, data, {"window": win})
    by_band = {b: data[i] for i, b in enumerate(unique)}
    channels = []
    for i, band in enumerate(plan.bands):
        values = by_band[band]
        if plan.stretch is None:
            channels.append(values.astype(np.uint8, copy=False))
            continue
        low, high = plan.stretch[i]
        scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
        channels.append(np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8))
    rgb = np.stack(channels, axis=-1)
    rgb[~valid] = 0
    return rgb, valid
