"""Large images in tiles: the plan, the merge across seams, windowed reading and label maps.

Design: an image above the ``--tile`` size is cut into square tiles of the model's input (1008 px
for SAM3) that overlap by ``--tile-overlap`` (default a quarter of a tile); the last row and column
are shifted inward, so nothing is padded or resized. Each tile is an item with a window; its
detections come back as RLE of the window. ``merge_tiles`` (or ``TileMerger``, fed tile by tile)
turns them into one detection per object with boxes, RLE and ``SparseMask`` runs, never a full-size
array: duplicates are found by mask intersection over the smaller mask inside the overlap, objects
larger than a tile are joined across seams, labels run 1..N by score. ``write_label_map`` then
writes a tiled TIFF block by block, and ``open_source`` reads big inputs by window. Nothing here
imports torch. See docs/aerial-tiles.md.
"""

from .grid import AUTO_FACTOR, Tile, TilePlan, TileSetting, parse_overlap, parse_tile, plan_tiles
from .labelmap import label_map_relpath, read_label_window, write_label_map
from .merge import DEFAULT_MATCH, MergedDetection, TileDetection, TileMerger, merge_tiles
from .sparse import SparseMask
from .windows import DEFAULT_MAX_TILED_PIXELS, ImageSource, WindowReader, open_source, upright_size

__all__ = [
    "AUTO_FACTOR",
    "DEFAULT_MATCH",
    "DEFAULT_MAX_TILED_PIXELS",
    "ImageSource",
    "MergedDetection",
    "SparseMask",
    "Tile",
    "TileDetection",
    "TileMerger",
    "TilePlan",
    "TileSetting",
    "WindowReader",
    "label_map_relpath",
    "merge_tiles",
    "open_source",
    "parse_overlap",
    "parse_tile",
    "plan_tiles",
    "read_label_window",
    "upright_size",
    "write_label_map",
]
