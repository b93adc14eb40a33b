"""Reading big inputs one window at a time.

Tiled and striped TIFF/BigTIFF are read through tifffile chunk by chunk: a window costs the chunks
it touches, never the whole image, so memory stays flat in the image's area. Its codecs come from
imagecodecs (a dependency: LZW, JPEG, CCITT G3/G4, WebP... in a window as in a whole image); a TIFF
whose compression tifffile cannot decode even so (rare ones, some old-style JPEG) is decoded whole
by Pillow's libtiff, like a JPEG. Other formats (JPEG, PNG, WebP...) cannot be read in parts: they
are decoded whole, only up to ``--max-pixels``, and refused above it with a message naming a
conversion to a tiled TIFF. Tiled-readable images have their own limit, ``--max-tiled-pixels``
(default 4 GP).

Pixels come back as RGB uint8 normalised for the whole image, never per window: grey becomes RGB,
alpha is composited on black, and data of more than 8 bits is stretched from the whole image's
own minimum and maximum (found by one pass over the chunks), as ``imageio.read_image`` does.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import tifffile

from .. import imageio
from ..errors import InvalidImageError
from ..logs import about_image

__all__ = [
    "DEFAULT_MAX_TILED_PIXELS",
    "ImageSource",
    "TiffSource",
    "WholeSource",
    "WindowReader",
    "open_source",
    "upright_size",
]

#: Largest image read by window (width x height).
DEFAULT_MAX_TILED_PIXELS = 4_000_000_000
#: Largest TIFF chunk (tile or strip) read by window: one strip holding the whole image is not.
MAX_CHUNK_BYTES = 64 * 2**20

CONVERT_HINT = (
    "convert it to a tiled TIFF, which is read one window at a time: "
    "`gdal_translate -co TILED=YES -co COMPRESS=DEFLATE -co BIGTIFF=IF_SAFER IN OUT.tif` or "
    "`vips tiffsave IN OUT.tif --tile --compression deflate --bigtiff`"
)


class ImageSource(Protocol):
    """An input image read by window: ``read((x0, y0, x1, y1))`` gives (y1-y0, x1-x0, 3) uint8."""

    width: int
    height: int

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray: ...
    def close(self) -> None: ...


#: A decoder an engine may offer for images decoded whole: their (height, width, 3) uint8 upright
#: pixels, or None where it does not decode that file (``imageio.read_pixels`` does then).
WholeDecoder = Callable[[str], "np.ndarray | None"]


class WholeSource:
    """An image decoded whole (formats that cannot be read in parts), windows cut from it."""

    def __init__(
        self, path: str | os.PathLike[str], max_pixels: int, decode: WholeDecoder | None = None
    ) -> None:
        pixels = decode(os.fspath(path)) if decode is not None else None
        self._pixels = pixels if pixels is not None else imageio.read_pixels(path, max_pixels)
        self.height, self.width = self._pixels.shape[:2]

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = window
        return self._pixels[y0:y1, x0:x1]

    def close(self) -> None:
        self._pixels = np.zeros((0, 0, 3), np.uint8)


class TiffSource:
    """A tiled or striped TIFF/BigTIFF read chunk by chunk through tifffile (first page)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = tifffile.TiffFile(path)
        try:
            page = self._file.pages.first
            self._page = page
            self.height, self.width = int(page.imagelength), int(page.imagewidth)
            self._ch = (
                int(page.tilelength)
                if page.is_tiled
                else min(int(page.rowsperstrip or 0) or self.height, self.height)
            )
            self._cw = int(page.tilewidth) if page.is_tiled else self.width
            self._across = math.ceil(self.width / self._cw)
            self._range: tuple[float, float] | None = None
            if page.dtype is None:
                raise ValueError("its sample format is not supported")
            self._dtype: np.dtype[Any] = page.dtype
        except BaseException:
            self._file.close()
            raise

    @property
    def chunk_bytes(self) -> int:
        return self._ch * self._cw * int(self._page.samplesperpixel) * self._dtype.itemsize

    def _chunks(self, window: tuple[int, int, int, int]) -> list[int]:
        x0, y0, x1, y1 = window
        return [
            r * self._across + c
            for r in range(y0 // self._ch, (y1 - 1) // self._ch + 1)
            for c in range(x0 // self._cw, (x1 - 1) // self._cw + 1)
        ]

    def read_samples(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The window's samples in the file's own type, (h, w, samples)."""
        x0, y0, x1, y1 = window
        page = self._page
        out = np.zeros((y1 - y0, x1 - x0, int(page.samplesperpixel)), self._dtype)
        chunks = self._chunks(window)
        offsets = [page.dataoffsets[k] for k in chunks]
        counts = [page.databytecounts[k] for k in chunks]
        for data, k in self._file.filehandle.read_segments(offsets, counts, indices=chunks, flat=True):
            assert isinstance(k, int)  # flat=True: (bytes, index) pairs
            segment, _, _ = page.decode(data, k, jpegtables=page.jpegtables)
            if segment is None:  # a chunk never written: TIFF readers show it as zeros
                continue
            cy, cx = (k // self._across) * self._ch, (k % self._across) * self._cw
            seg = np.asarray(segment).reshape(-1, *np.shape(segment)[-3:])[0]  # (h, w, samples)
            sy0, sx0 = max(y0, cy), max(x0, cx)
            sy1, sx1 = min(y1, cy + seg.shape[0]), min(x1, cx + seg.shape[1])
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = seg[sy0 - cy : sy1 - cy, sx0 - cx : sx1 - cx]
        return out

    @property
    def _colour(self) -> int:
        """Colour samples per pixel (grey 1 or RGB 3); a 2nd or 4th sample is alpha."""
        return 3 if int(self._page.samplesperpixel) >= 3 else 1

    def value_range(self) -> tuple[float, float]:
        """Finite minimum and maximum of the colour samples of the whole image, one chunk at a
        time (cached): one range for all channels, as for whole images, so colours keep their balance."""
        if self._range is None:
            lo, hi = math.inf, -math.inf
            for y in range(0, self.height, self._ch):
                for x in range(0, self.width, self._cw):
                    window = (x, y, min(x + self._cw, self.width), min(y + self._ch, self.height))
                    colour = self.read_samples(window)[..., : self._colour]
                    finite = colour[np.isfinite(colour)]
                    if finite.size:
                        lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            self._range = (lo, hi) if lo <= hi else (0.0, 0.0)
        return self._range

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        raw = self.read_samples(window)
        colour = raw[..., : self._colour]
        if raw.dtype != np.uint8:
            lo, hi = self.value_range()
            values = colour.astype(np.float32)
            scaled = (values - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.clip(values, 0, 255)
            colour = np.rint(np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)).astype(np.uint8)
        rgb = np.repeat(colour, 3, axis=2) if self._colour == 1 else colour
        if raw.shape[2] in (2, 4):  # alpha: composite on black, as for whole images
            full = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "ui" else 1.0
            alpha = np.clip(raw[..., -1:].astype(np.float32) / np.float32(full), 0, 1)
            rgb = np.rint(rgb.astype(np.float32) * alpha).astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def close(self) -> None:
        self._file.close()


def open_source(
    path: str | os.PathLike[str],
    *,
    max_pixels: int,
    max_tiled_pixels: int = DEFAULT_MAX_TILED_PIXELS,
    bands: Sequence[int] | None = None,
    decode: WholeDecoder | None = None,
) -> ImageSource:
    """The image at ``path`` as a windowed source; ``InvalidImageError`` with a sentence (and a
    conversion to run) when it is too big for how it can be read. A georeferenced input (GeoTIFF
    keys or a world file) is a ``geo.raster_windows.GeoSource``: ``bands`` (``--bands``) and one stretch per
    image, its ``valid(window)`` says where nodata must carry no detection. ``decode`` is tried first
    for an image decoded whole (the engine's GPU JPEG decoder)."""
    from ..remote import localize

    path = localize(path)  # an object in S3: its /vsis3/ path (georeferenced TIFF) or a local copy
    with about_image(path):  # what tifffile, rasterio or libtiff say names the image
        return _open_source(path, max_pixels, max_tiled_pixels, bands, decode)


def _open_source(
    path: str | os.PathLike[str],
    max_pixels: int,
    max_tiled_pixels: int,
    bands: Sequence[int] | None,
    decode: WholeDecoder | None,
) -> ImageSource:
    geo = _geo_source(path, bands, max_tiled_pixels)
    if geo is not None:
        return geo
    with open(path, "rb") as fh:
        is_tiff = fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if is_tiff:
        try:
            source = TiffSource(path)
        except Exception as exc:  # noqa: BLE001 - tifffile's many errors become one input problem
            raise InvalidImageError(f"The TIFF file cannot be read ({type(exc).__name__}: {exc}).") from exc
        pixels = source.width * source.height
        if pixels > max_tiled_pixels:
            source.close()
            raise InvalidImageError(
                f"The image is {source.width} x {source.height} = {pixels:,} pixels, more than the limit "
                f"of {max_tiled_pixels:,} for images read by window (--max-tiled-pixels)."
            )
        if _by_window(source) and _check_decodable(source, max_pixels):
            return source
        source.close()
    return _whole(path, max_pixels, decode)


def _geo_source(
    path: str | os.PathLike[str], bands: Sequence[int] | None, max_tiled_pixels: int
) -> ImageSource | None:
    """The georeferenced branch of ``open_source`` (None: not georeferenced); rasterio reads any
    raster GDAL knows by window, so the pixel limit is the windowed one."""
    from ..geo.detect import looks_georeferenced

    if not looks_georeferenced(path):
        return None
    from ..geo import require_geo
    from ..geo._extra import raster_unreadable

    require_geo(f"{os.path.basename(path)} is georeferenced; reading it")
    from rasterio.errors import RasterioError

    from ..geo.raster_windows import GeoSource

    try:
        source = GeoSource.open(path, bands)
    except RasterioError as exc:
        raise raster_unreadable(exc) from exc
    if source is not None and source.width * source.height > max_tiled_pixels:
        source.close()
        raise InvalidImageError(
            f"The image is {source.width} x {source.height} = {source.width * source.height:,} pixels, "
            f"more than the limit of {max_tiled_pixels:,} for images read by window (--max-tiled-pixels)."
        )
    return source


def _by_window(source: TiffSource) -> bool:
    """Whether the TIFF can be read by window: chunks of a bounded size, interleaved samples, no
    Orientation tag other than top-left (windows of the stored pixels would differ from windows
    of the upright image), and a compression and predictor that tifffile can decode (with
    imagecodecs, nearly all; old-style JPEG variants and rare ones such as ThunderScan not).
    Otherwise the file is decoded whole by Pillow (libtiff), within --max-pixels, like a JPEG."""
    page = source._page
    planar_ok = int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1
    upright = int(getattr(page.tags.get(274), "value", 1)) == 1
    codecs = page.compression in tifffile.TIFF.DECOMPRESSORS and page.predictor in tifffile.TIFF.UNPREDICTORS
    return source.chunk_bytes <= MAX_CHUNK_BYTES and planar_ok and upright and codecs


def _check_decodable(source: TiffSource, max_pixels: int) -> bool:
    """Decode one chunk now, so that pixels tifffile cannot decode are found up front: False when
    the image fits --max-pixels (it is then decoded whole, and Pillow says what is wrong if it
    cannot read it either), else an input problem with the reason."""
    try:
        source.read_samples((0, 0, 1, 1))
        return True
    except Exception as exc:  # noqa: BLE001 - every decoding failure is the same input problem
        if source.width * source.height <= max_pixels:
            return False
        source.close()
        compression = getattr(source._page.compression, "name", source._page.compression)
        raise InvalidImageError(
            f"The TIFF's pixels ({compression} compression) cannot be decoded ({type(exc).__name__}: "
            f"{exc}); the file may be damaged: copy or export it again, or {CONVERT_HINT}."
        ) from exc


def _whole(path: str | os.PathLike[str], max_pixels: int, decode: WholeDecoder | None = None) -> ImageSource:
    width, height = _header_size(path)
    if width * height > max_pixels:
        raise InvalidImageError(
            f"The image is {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (--max-pixels) for a format that must be decoded whole; {CONVERT_HINT}."
        )
    return WholeSource(path, max_pixels, decode)


def _header_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Width and height from the header only (no pixel decoded)."""

    try:
        with imageio.open_header(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - Pillow's many errors become one input problem
        raise _unreadable(exc) from exc


def _unreadable(exc: Exception) -> InvalidImageError:
    return InvalidImageError(
        f"The file is not an image that can be read ({type(exc).__name__}: {exc}); check that it is "
        "a complete image file."
    )


def _is_tiff(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def upright_size(path: str | os.PathLike[str]) -> tuple[int, int, bool]:
    """(width, height, windowed) of the upright image from its header only, no pixel decoded;
    ``windowed``: ``open_source`` reads it by window rather than whole. InvalidImageError when
    even the header cannot be read."""
    from ..remote import localize

    path = localize(path)  # an object in S3: its /vsis3/ path (georeferenced TIFF) or a local copy
    with about_image(path):
        if os.fspath(path).startswith("/vsis3/"):
            return _remote_size(path)
        return _upright_size(path)


def _remote_size(path: str | os.PathLike[str]) -> tuple[int, int, bool]:
    """A georeferenced TIFF in S3: GDAL reads its header with a range request; read by window."""
    from rasterio.errors import RasterioError

    from ..geo.raster_windows import GeoSource

    try:
        source = GeoSource.open(path)
    except RasterioError as exc:
        raise InvalidImageError(f"The raster cannot be read ({exc}).") from exc
    if source is None:  # pragma: no cover - remote.localize hands out only georeferenced paths
        raise InvalidImageError("The raster has no georeference.")
    try:
        return source.width, source.height, True
    finally:
        source.close()


def _upright_size(path: str | os.PathLike[str]) -> tuple[int, int, bool]:
    try:
        is_tiff = _is_tiff(path)
    except OSError as exc:
        raise InvalidImageError(f"The file cannot be opened ({exc.strerror or exc}).") from exc
    if is_tiff:
        try:
            source = TiffSource(path)
        except Exception as exc:  # noqa: BLE001 - tifffile's many errors become one input problem
            raise InvalidImageError(f"The TIFF file cannot be read ({type(exc).__name__}: {exc}).") from exc
        try:
            orientation = int(getattr(source._page.tags.get(274), "value", 1))
            windowed = _by_window(source)
            width, height = source.width, source.height
        finally:
            source.close()
        return (height, width, windowed) if orientation in (5, 6, 7, 8) else (width, height, windowed)

    try:
        with imageio.open_header(path) as im:
            width, height = imageio.oriented_size(im)
    except Exception as exc:  # noqa: BLE001 - Pillow's many errors become one input problem
        raise _unreadable(exc) from exc
    return width, height, False


class WindowReader:
    """Windows of a few images at a time, for an engine given windowed items: an image is opened
    (``open_source``) when a window of it is first asked for and kept while windows of it may
    still come, so the tiles of an image cost one decode (a JPEG) or only their chunks (a tiled
    TIFF). The worker streams one image's tiles after another's, and the reading threads may read
    the first tiles of the next image before the last ones of this: the ``OPEN`` images asked for
    last stay open, the one before them is closed. ``prefetch`` opens the next image in a thread
    of its own meanwhile. Safe to share between I/O threads."""

    #: Images kept open at once (beside a prefetched one).
    OPEN = 2

    def __init__(
        self,
        max_pixels: int,
        max_tiled_pixels: int = DEFAULT_MAX_TILED_PIXELS,
        decode: WholeDecoder | None = None,
    ) -> None:
        self.max_pixels, self.max_tiled_pixels = max_pixels, max_tiled_pixels
        self.decode = decode  # tried first for images decoded whole (``open_source``)
        self._lock = threading.Lock()
        self._sources: dict[str, ImageSource] = {}  # the images open, the one asked for last at the end
        self._next: tuple[str, Future[ImageSource]] | None = None
        self._opener: ThreadPoolExecutor | None = None

    def read(
        self, path: str | os.PathLike[str], window: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, int, int, np.ndarray | None]:
        """(pixels of ``window``, width, height of the whole upright image, the window's valid-pixel
        mask where a georeferenced input has nodata in it, else None); ValueError for a window
        outside the image, InvalidImageError for an image that cannot be read."""
        with self._lock, about_image(path):
            source = self._source(os.fspath(path))
            x0, y0, x1, y1 = window
            if not (0 <= x0 < x1 <= source.width and 0 <= y0 < y1 <= source.height):
                raise ValueError(f"window {window} is not inside the {source.width}x{source.height} image")
            read_with_valid = getattr(source, "read_with_valid", None)  # geo.raster_windows.GeoSource's
            if read_with_valid is not None:
                pixels, valid = read_with_valid(window)
                return pixels, source.width, source.height, valid
            return source.read(window), source.width, source.height, None

    def _source(self, key: str) -> ImageSource:
        source = self._sources.pop(key, None)
        if source is None:
            prefetched = self._prefetched(key)
            source = prefetched if prefetched is not None else self._open(key)
            while len(self._sources) >= self.OPEN:  # the image asked for longest ago
                self._sources.pop(next(iter(self._sources))).close()
        self._sources[key] = source
        return source

    def prefetch(self, path: str | os.PathLike[str]) -> None:
        """Start opening ``path`` in a thread of its own (a JPEG is decoded whole then), for the
        image whose windows come next: its decode overlaps the current image's tiles instead of
        holding up its first tile. One image waits so at most (an earlier one is dropped); if the
        opening fails, ``read`` opens it again and meets the error as it would have."""
        key = os.fspath(path)
        with self._lock:
            if key in self._sources or (self._next is not None and self._next[0] == key):
                return
            self._drop_next()
            if self._opener is None:
                self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchseg-prefetch")
            self._next = (key, self._opener.submit(self._open, key))

    def _open(self, key: str) -> ImageSource:
        return open_source(
            key, max_pixels=self.max_pixels, max_tiled_pixels=self.max_tiled_pixels, decode=self.decode
        )

    def _prefetched(self, key: str) -> ImageSource | None:
        if self._next is None or self._next[0] != key:
            return None
        future, self._next = self._next[1], None
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - opened again by the caller, which reports the error
            return None

    def _drop_next(self) -> None:
        if self._next is not None:
            future, self._next = self._next[1], None
            if not future.cancel():  # running or done: its source is closed once it is there
                future.add_done_callback(_close_opened)

    def close(self) -> None:
        """Close the images open and drop a prefetched one: nothing is kept."""
        with self._lock:
            sources, self._sources = self._sources, {}
            for source in sources.values():
                source.close()
            self._drop_next()
            if self._opener is not None:  # its thread ends (after an opening under way, if any)
                self._opener.shutdown(wait=False)
                self._opener = None


def _close_opened(future: Future[ImageSource]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
