"""Reading input images safely and writing the uint16 label maps, plus the output-path rules.

``read_image`` turns every way an input can be bad into ``InvalidImageError`` with one sentence a user
can act on; the worker records it as status ``invalid_input``. What it guarantees:

* the pixel limit is checked from the header, before any pixel is decoded (decompression bombs);
* the whole image is decoded (``load()``) with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, so a truncated
  file is refused, never silently padded with gray;
* the result is RGB, 8 bits a channel, with the EXIF orientation applied (so it, and its mask, match
  what an image viewer shows), and only the first frame of an animated file;
* transparent pixels are composited onto black: what lies under alpha 0 is undefined, black is not;
* 16-bit, 32-bit integer and float grayscale are stretched linearly from their own minimum and
  maximum to 0..255 (12-bit data in a 16-bit container stays visible; nothing is clipped).

This module is imported by the parent process: it must never import torch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import ntpath
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .atomic import atomic_write_bytes
from .errors import InvalidImageError
from .logs import about_image

__all__ = [
    "PILLOW_LIMIT_LOCK",
    "WINDOWS_MAX_PATH",
    "check_not_empty",
    "configure_pillow",
    "encode_label_png",
    "mask_relpath",
    "open_header",
    "oriented_size",
    "path_too_long",
    "pixels_view",
    "read_image",
    "read_label_map",
    "read_pixels",
    "safe_output_path",
    "save_label_map",
    "too_many_pixels",
]

#: Held while Pillow's process-wide pixel limit is switched off to read a header (see ``_open``).
PILLOW_LIMIT_LOCK = threading.Lock()
#: Windows' classic MAX_PATH counts the terminating NUL: a usable path has at most 259 characters.
WINDOWS_MAX_PATH = 260

# Label maps are mostly zeros: level 1 with Z_RLE is the fastest setting and compresses them best.
_LABEL_PNG_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


#: ``image.info`` key holding (width, height) of the upright full-size image when the JPEG was
#: decoded at a reduced scale (``draft_side``); absent when the image is at full size.
ORIGINAL_SIZE = "batchseg_original_size"


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the upright image at full size, also for a draft-decoded JPEG."""
    size = image.info.get(ORIGINAL_SIZE, image.size)
    return int(size[0]), int(size[1])


def read_image(
    path: str | os.PathLike[str], max_pixels: int, *, draft_side: int | None = None
) -> Image.Image:
    """Decode ``path`` into an RGB image (rules in the module docstring).

    ``draft_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several
    times faster) as long as both sides stay at least this long: for a model that resizes to that
    square anyway, the result differs by about a grey level. ``original_size(image)`` still tells
    the full size, which masks are made at.

    Raises ``InvalidImageError`` (chained to the underlying error) when the file cannot be read, is
    empty, is not an image, has more than ``max_pixels`` pixels, is damaged or truncated, or uses a
    color mode that cannot become RGB. ``MemoryError`` is not an input problem and propagates.
    """
    with about_image(path):  # what Pillow's libtiff or a warning says names the image
        return _read_image(path, max_pixels, draft_side)


def read_pixels(path: str | os.PathLike[str], max_pixels: int) -> np.ndarray:
    """The pixels ``read_image`` gives, (height, width, 3) uint8 and read-only, taken from the
    decoded image itself where it is upright RGB: no copy of a whole decoded image on the way (a
    10000 x 10000 JPEG: 0.24 s and 400 MB less). What a big image cut into tiles is read from."""
    with about_image(path), _decoded(path, max_pixels, None, detached=False) as (image, _):
        return pixels_view(image)  # taken before the image closes; the view keeps its memory


def _read_image(path: str | os.PathLike[str], max_pixels: int, draft_side: int | None) -> Image.Image:
    with _decoded(path, max_pixels, draft_side, detached=True) as (image, full_size):
        pass
    if image.size != full_size:
        image.info[ORIGINAL_SIZE] = full_size
    return image


@contextlib.contextmanager
def _decoded(
    path: str | os.PathLike[str], max_pixels: int, draft_side: int | None, detached: bool
) -> Iterator[tuple[Image.Image, tuple[int, int]]]:
    """The upright RGB image of ``path`` and its full upright size, while the file is open:
    ``detached``, an image of its own that outlives the block (a copy where nothing else made a
    new image), else possibly the decoded file's own image, closed with the block."""
    check_not_empty(path)
    try:
        fh = open(path, "rb")  # we own and close it, so Windows never keeps a handle
    except OSError as exc:
        raise InvalidImageError(
            f"The file cannot be opened ({exc.strerror or exc}); check that it exists and is readable."
        ) from exc
    with fh:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a library imported later may have switched it on
        src = _open(fh, max_pixels)
        with src:
            full_size = oriented_size(src)
            if draft_side and src.format == "JPEG":
                src.draft(None, (draft_side, draft_side))
            _decode_first_frame(src, max_pixels)
            yield _to_rgb(_oriented(src, detached)), full_size


def configure_pillow(max_pixels: int) -> None:
    """Process-wide Pillow settings for a process that reads images for a run (a worker): Pillow's
    own pixel limit set to ours and its decompression-bomb warning made an error, for what only
    decoding finds (GIF frames, TIFF tiles); Pillow's other warnings (odd EXIF, palette
    transparency...) are noise for a batch run and ignored. Set once, before any thread reads."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    # An image up to the limit in one memory block, so ``pixels_view`` can view it (a smaller image
    # still gets only its own size: the block size is a maximum).
    core = Image.core  # type: ignore[attr-defined]
    wanted = -(-4 * max_pixels // 4096) * 4096
    core.set_block_size(min(MAX_BLOCK_BYTES, max(core.get_block_size(), wanted)))


#: Pillow's largest allocation block: a multiple of 4096 below 2 GiB.
MAX_BLOCK_BYTES = 2**31 - 4096


def pixels_view(image: Image.Image) -> np.ndarray:
    """The (height, width, 3) uint8 pixels of an RGB image, read-only. Viewed in place, without a
    copy, where Pillow exports the image's memory (its Arrow interface, Pillow 11.2 and newer, for
    an image in one memory block: ``configure_pillow``); else copied (``np.asarray``). Pillow keeps
    RGB as four bytes a pixel: the view skips the fourth. The view keeps the memory alive.

    A copy of a 10000 x 10000 image takes longer than half its JPEG decode and 300 MB more
    memory (docs/performance.md)."""
    if image.mode == "RGB" and hasattr(image, "__arrow_c_array__"):
        import pyarrow as pa

        try:
            memory = pa.array(image).buffers()[-1]
        except (ValueError, TypeError, pa.ArrowException):  # rows in several blocks: copied
            pass
        else:
            if memory is not None and memory.size == 4 * image.width * image.height:
                rgbx = np.frombuffer(memory, dtype=np.uint8).reshape(image.height, image.width, 4)
                return rgbx[:, :, :3]
    return np.asarray(image)


def oriented_size(src: Image.Image) -> tuple[int, int]:
    """Full size after EXIF orientation (orientations 5 to 8 swap width and height)."""
    width, height = src.size
    try:
        orientation = src.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - unreadable EXIF is ignored, as _oriented does
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def check_not_empty(path: str | os.PathLike[str]) -> None:
    if os.fspath(path).startswith("/vsis3/"):
        return  # an object GDAL reads by window (remote.localize): its listing said its size
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise InvalidImageError(
            f"The file cannot be read ({exc.strerror or exc}); check that it exists and is readable."
        ) from exc
    if size == 0:
        raise InvalidImageError(
            "The file is empty (0 bytes), probably from a failed or unfinished copy; copy it again."
        )


def too_many_pixels(width: int, height: int, max_pixels: int) -> InvalidImageError:
    return InvalidImageError(
        f"The image is {width} x {height} = {width * height:,} pixels, more than the limit of "
        f"{max_pixels:,} (--max-pixels); raise --max-pixels if the image is genuine."
    )


def _bomb(exc: Exception, max_pixels: int) -> InvalidImageError:
    return InvalidImageError(
        f"The image has more pixels than the limit of {max_pixels:,} (--max-pixels; Pillow: {exc}); "
        "raise --max-pixels if the image is genuine."
    )


def open_header(fp: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """``Image.open`` (the header only) with Pillow's own pixel limit off meanwhile: ``max_pixels``
    decides, not Pillow, which warns above its limit and raises above twice it. That limit is a
    process global and images are read by several threads at once: hence ``PILLOW_LIMIT_LOCK``."""
    with PILLOW_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _open(fh: io.BufferedReader, max_pixels: int) -> Image.Image:
    try:
        # No warnings filters here: changing those is never safe from a thread.
        src = open_header(fh)  # the check below sees the size and says it
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        kind = _signature_format(fh)
        if kind is not None:
            raise InvalidImageError(
                f"The file starts like a {kind} image but its header is damaged; copy or export it again."
            ) from exc
        raise InvalidImageError(
            "The file is not an image Pillow can read (its content matches no known image format); "
            "check that it really is an image and not a misnamed or partly downloaded file."
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(
            f"The image is damaged or incomplete and cannot be decoded ({type(exc).__name__}: {exc}); "
            "copy or export it again."
        ) from exc
    width, height = src.size
    if width * height > max_pixels:
        src.close()
        raise too_many_pixels(width, height, max_pixels)
    return src


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
)


def _signature_format(fh: io.BufferedReader) -> str | None:
    """The format whose magic bytes open the file, to tell a damaged image from a non-image."""
    try:
        fh.seek(0)
        head = fh.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


def _decode_first_frame(src: Image.Image, max_pixels: int) -> None:
    """Force a full decode of frame 0, so truncation and corruption surface here and not later."""
    try:
        if src.tell() != 0:  # Image.open starts at frame 0; stay there
            src.seek(0)
        src.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(
            f"The image data is damaged or incomplete ({type(exc).__name__}: {exc}); the file may have "
            "been cut short by an interrupted copy or download, so copy or export it again."
        ) from exc


def _oriented(src: Image.Image, detached: bool = True) -> Image.Image:
    """``src`` turned upright per its EXIF orientation: a new image, or where ``src`` is stored
    upright, a copy of it (``detached``) or ``src`` itself."""
    try:
        if not detached and src.getexif().get(0x0112) not in (2, 3, 4, 5, 6, 7, 8):
            return src
        return ImageOps.exif_transpose(src)
    except MemoryError:
        raise
    except Exception:
        # Unparseable EXIF: viewers cannot apply it either, so the stored pixel order is what users see.
        return src.copy() if detached else src


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_stretch_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        return _composite_on_black(im)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise InvalidImageError(
            f"The image uses color mode {im.mode}, which cannot be converted to RGB; "
            "save it as RGB or grayscale first."
        ) from exc


def _composite_on_black(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the finite range [min, max] linearly onto 0..255 (NaN and infinities become 0).

    A constant image keeps its value: 16-bit divided by 257, other types clipped to 0..255.
    """
    data = values.astype(np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, np.uint8)
    all_finite = bool(finite.all())
    valid = data if all_finite else data[finite]
    lo, hi = float(valid.min()), float(valid.max())
    if hi > lo:
        out = (data - lo) * np.float32(255.0 / (hi - lo))
    elif values.dtype.itemsize == 2 and values.dtype.kind == "u":
        out = data / np.float32(257.0)
    else:
        out = np.clip(data, 0, 255)
    if not all_finite:
        out[~finite] = 0
    result: np.ndarray = np.rint(out).astype(np.uint8)
    return result


# --- label maps -------------------------------------------------------------------------------


def save_label_map(path: str | os.PathLike[str], labels: np.ndarray) -> None:
    """Write a uint16 HxW label map as a 16-bit grayscale PNG, atomically (temp file + os.replace).

    0 is background and k the detection with index k. Written directly (not through Pillow, whose
    adaptive filtering costs about 4x more): PNG filter "Up" on every row, then zlib level 1 with the
    run-length strategy, which suits maps that are mostly zeros with flat blobs.
    """
    atomic_write_bytes(path, encode_label_png(labels))


def encode_label_png(labels: np.ndarray) -> bytes:
    """The PNG bytes of a uint16 HxW label map (see ``save_label_map``)."""
    if labels.ndim != 2 or labels.dtype != np.uint16:
        raise ValueError(f"A label map must be a 2-D uint16 array, not {labels.ndim}-D {labels.dtype}.")
    height, width = labels.shape
    if height == 0 or width == 0:
        raise ValueError(f"A label map must not be empty, got {height} x {width}.")
    if not labels.any():
        return _background_png(height, width)  # an image without detections: same bytes, cached
    return _encode_label_png(labels)


@functools.lru_cache(maxsize=8)
def _background_png(height: int, width: int) -> bytes:
    return _encode_label_png(np.zeros((height, width), np.uint16))


def _encode_label_png(labels: np.ndarray) -> bytes:
    height, width = labels.shape
    rows = np.ascontiguousarray(labels, dtype=">u2").view(np.uint8).reshape(height, 2 * width)
    scanlines = np.empty((height, 1 + 2 * width), np.uint8)
    scanlines[0, 0] = 0  # filter None: no row above
    scanlines[1:, 0] = 2  # filter Up: byte minus the byte above, modulo 256
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
    compressor = zlib.compressobj(_LABEL_PNG_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = compressor.compress(scanlines.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit grayscale, no interlace
    return b"".join([_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def read_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label map written by ``save_label_map`` back as a uint16 HxW array."""
    with Image.open(path) as image:
        if image.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
            raise ValueError(f"{os.fspath(path)} is a {image.mode} image, not a 16-bit label map.")
        return np.asarray(image).astype(np.uint16)


# --- output paths ------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def polygons_relpath(rel: str) -> str:
    """The per-image polygons part file of input ``rel``, beside its label map; combined at export."""
    return f"masks/{rel}.polygons.parquet"


def mask_relpath(rel: str) -> str:
    """Where the label map of input ``rel`` goes, relative to the output folder: ``masks/<rel>.png``.

    The full input name is kept (``a.jpg`` -> ``masks/a.jpg.png``) so ``a.jpg`` and ``a.png`` in the
    same folder never share a mask.
    """
    return f"masks/{rel}.png"


def safe_output_path(output_dir: str | os.PathLike[str], rel: str) -> Path:
    """``output_dir / rel``, refusing anything that could land outside ``output_dir``.

    Raises ``ValueError`` for an empty path, an absolute path (``/x``, ``\\x``, UNC), a drive letter
    (``C:x``), a ``..`` component, a NUL character, or a path whose resolved form (symbolic links
    followed) is not inside the resolved ``output_dir``.
    """
    if not rel or "\x00" in rel:
        raise ValueError(f"Refusing output path {rel!r}: it is empty or holds a NUL character.")
    if rel.startswith(("/", "\\")) or _DRIVE.match(rel) or ntpath.isabs(rel):
        raise ValueError(f"Refusing output path {rel!r}: it is absolute or names a drive.")
    if ".." in re.split(r"[\\/]", rel):
        raise ValueError(f"Refusing output path {rel!r}: it has a '..' component.")
    base = Path(output_dir)
    target = base / rel
    if not target.resolve().is_relative_to(base.resolve()):
        raise ValueError(f"Refusing output path {rel!r}: it resolves outside {os.fspath(base)}.")
    return target


def path_too_long(path: str | os.PathLike[str]) -> bool:
    """True when the absolute form of ``path`` exceeds Windows' classic 259-character limit.

    A pure check on the string (no file system access beyond the current folder): callers use it to
    warn or refuse before Windows fails with a confusing error. ``\\\\?\\`` paths have no such limit.
    """
    text = os.fspath(path)
    if text.startswith("\\\\?\\"):
        return False
    return len(os.path.abspath(text)) >= WINDOWS_MAX_PATH
