"""Georeferenced input and output: the ``batchseg[geo]`` extra (rasterio, shapely, pyproj, pyogrio).

``georef`` reads an input's georeference (GeoTIFF, or an image with a world file), ``bands`` turns
any raster into the 8-bit RGB the model sees, ``raster`` writes label maps on the source grid,
``vectors`` turns label maps into polygons and GeoParquet, ``export`` writes GeoPackage, GeoJSON or
Shapefile. Only this module imports without the extra; each submodule stops with
:class:`GeoExtraMissing` (a message naming ``pip install batchseg[geo]``) when the extra is absent.
"""

from __future__ import annotations

from ._extra import EXTRA_HINT, RUN_MODULES, GeoExtraMissing, GeoreferenceError, geo_versions, require_geo

__all__ = ["EXTRA_HINT", "RUN_MODULES", "GeoExtraMissing", "GeoreferenceError", "geo_versions", "require_geo"]
