"""Whether an input is georeferenced, told without the extra: a world file beside it, or GeoTIFF keys
in a TIFF's first page. Cheap enough for the parent to scan a run's images when the extra is missing
(folder listings are cached, so a folder of photos costs one listing, not six stats an image).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import tifffile

from ._extra import RUN_MODULES, require_geo

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = [
    "GEOTIFF_TAGS",
    "check_geo_extra",
    "has_geotiff_keys",
    "looks_georeferenced",
    "world_file_for",
    "world_file_names",
    "folder_listing",
]

#: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
_TIFF_SUFFIXES = (".tif", ".tiff")


def world_file_names(path: str | os.PathLike[str]) -> list[str]:
    """Names a world file of ``path`` may have, in the order GDAL tries them: ``x.jgw`` (first and
    last letter of the extension + w), ``x.jpgw``, ``x.wld``; lower case first, then upper."""
    path = Path(path)
    ext = path.suffix.lstrip(".")
    if not ext:
        return []
    names = []
    for candidate in (ext[0] + ext[-1] + "w", ext + "w", "wld"):
        names += [path.stem + "." + candidate.lower(), path.stem + "." + candidate.upper()]
    return names


def world_file_for(path: str | os.PathLike[str]) -> Path | None:
    """The world file beside ``path``, or None."""
    path = Path(path)
    return next((path.with_name(n) for n in world_file_names(path) if path.with_name(n).is_file()), None)


def folder_listing(folder: str | os.PathLike[str]) -> frozenset[str]:
    """The names in ``folder`` (empty when it cannot be listed), for ``looks_georeferenced``."""
    try:
        return frozenset(os.listdir(folder))
    except OSError:
        return frozenset()


def has_geotiff_keys(path: str | os.PathLike[str]) -> bool:
    """True when the first page of a TIFF carries GeoTIFF tags (the header only is read)."""
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            return any(code in tags for code in GEOTIFF_TAGS)
    except Exception:  # noqa: BLE001 - not a readable TIFF: the reader will say so for that image
        return False


def looks_georeferenced(path: str | os.PathLike[str], listing: frozenset[str] | None = None) -> bool:
    """A world file beside ``path`` or, for a TIFF, GeoTIFF keys. ``listing``: the names in the
    image's folder (``folder_listing``), for a scan of many images: one listing, not six stats each.
    An object's /vsis3/ path reaches the readers only for a georeferenced TIFF (``remote.localize``);
    the parent's scan (with a listing) cannot tell without reading it, and says no."""
    if os.fspath(path).replace("\\", "/").startswith("/vsis3/"):
        return listing is None
    path = Path(path)
    names = world_file_names(path)
    if listing is not None:
        found = any(n in listing for n in names)
    else:
        found = any(path.with_name(n).is_file() for n in names)
    if found:
        return True
    return path.suffix.lower() in _TIFF_SUFFIXES and has_geotiff_keys(path)


def extra_installed() -> bool:
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
    if extra_installed():
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
