"""The ``batchseg[geo]`` extra: whether it is installed, and the errors of the geo modules."""

from __future__ import annotations

import importlib

from ..errors import ConfigError, InvalidImageError

__all__ = [
    "EXTRA_HINT",
    "GeoExtraMissing",
    "GeoreferenceError",
    "RUN_MODULES",
    "geo_versions",
    "missing_extra",
    "raster_unreadable",
    "require_geo",
]

EXTRA_HINT = "pip install 'batchseg[geo]'"

#: import name -> distribution, in the order the doctor reports them.
_MODULES = ("rasterio", "shapely", "pyproj", "pyogrio")

#: What a run needs (reading, label GeoTIFFs, --vectors); pyogrio serves ``batchseg export`` only,
#: so a platform where its wheel cannot be had still runs georeferenced jobs.
RUN_MODULES = ("rasterio", "shapely", "pyproj")


class GeoExtraMissing(ConfigError):
    """A georeferenced input, --vectors or an export needs the geo extra, which is not installed."""


class GeoreferenceError(InvalidImageError):
    """One input's georeference cannot be used (degenerate transform, unreadable CRS, no valid
    pixels): a per-image ``invalid_input`` status, never fatal to the run."""


def raster_unreadable(exc: Exception) -> InvalidImageError:
    """A raster GDAL cannot decode (damaged blocks, a compression it lacks): the image's status.
    rasterio's message often says only "see previous exception": GDAL's own text is its cause."""
    detail = exc.__cause__ if exc.__cause__ is not None else exc
    return InvalidImageError(
        f"The raster's pixels cannot be read ({detail}); the file is damaged or incomplete: "
        "copy or export it again."
    )


def missing_extra(
    exc: ImportError | None = None, what: str = "georeferenced input and output"
) -> GeoExtraMissing:
    """The error for a missing extra; ``exc`` names the module that failed to import."""
    detail = f" ({exc})" if exc is not None else ""
    return GeoExtraMissing(f"{what} needs the geo extra{detail}: {EXTRA_HINT}")


def geo_versions() -> dict[str, str]:
    """Installed versions of the extra's packages plus ``gdal`` (rasterio's) and ``gdal_pyogrio``;
    raises GeoExtraMissing."""
    versions: dict[str, str] = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise missing_extra(exc) from exc
        versions[name] = str(getattr(module, "__version__", "?"))
    import pyogrio
    import rasterio

    versions["gdal"] = str(rasterio.__gdal_version__)
    # pyogrio's wheels carry a GDAL of their own (the export uses it).
    versions["gdal_pyogrio"] = str(pyogrio.__gdal_version_string__)
    return versions


def require_geo(what: str = "georeferenced input and output", modules: tuple[str, ...] = RUN_MODULES) -> None:
    """Stop with a message naming the extra unless each package a run needs (``modules``) imports."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise missing_extra(exc, what) from exc
