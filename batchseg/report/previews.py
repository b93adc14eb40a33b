"""Overlay previews: ``OUTPUT/previews/<relative path>.jpg``, the image with its instances drawn in.

Each instance of the label map is filled in its own colour at half opacity and outlined (one pixel,
full colour); colours come in one hue family per prompt, and a strip under the image is the legend.
Everything is shrunk before it is composited: the JPEG is decoded at a reduced DCT scale (draft
mode) and the label map is sampled nearest-neighbour at the preview's pixel centres, so no
full-resolution float array is ever made. :func:`read_label_map_small` is the one place that reads
a label map: a tiled format for big images plugs in there.

During a run a :class:`PreviewMaker` in the parent makes them on a few threads as results arrive,
off the model's path; ``batchseg report --previews`` makes the missing ones afterwards.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path
from ..config import RunConfig
from ..imageio import open_header, original_size, read_image, safe_output_path
from ..logs import about_image
from ..records import ItemResult, Status
from ..store.folder import preview_relpath

__all__ = [
    "DEFAULT_PREVIEW_SIZE",
    "PreviewMaker",
    "PreviewSpec",
    "instance_colours",
    "preview_relpath",
    "prompt_colour",
    "read_label_map_small",
    "render_preview",
    "write_preview",
]

DEFAULT_PREVIEW_SIZE = 1024
LEGEND_HEIGHT = 16
JPEG_QUALITY = 85
#: Statuses whose image gets a preview: ok (overlay) and error (the plain image, to see what failed).
#: Crashed and timed-out images are never decoded in the parent: they may be what killed a worker.
PREVIEW_STATUSES = (Status.OK.value, Status.ERROR.value)
#: Previews waiting for a thread, at most: past it a result's preview is left to the end of the run
#: (``report_after_run`` makes the missing ones), so a backlog never grows without bound.
MAX_QUEUED = 2_000
_LOG = logging.getLogger("batchseg.report")
_UNKNOWN = (128, 128, 128)


# ---- colours --------------------------------------------------------------------------------------


def _prompt_hue(prompt_index: int, n_prompts: int) -> float:
    # Evenly spread over the wheel, starting at orange-red (reads well on green aerial imagery).
    return (0.02 + prompt_index / max(1, n_prompts)) % 1.0


def prompt_colour(prompt_index: int, n_prompts: int) -> tuple[int, int, int]:
    """The family colour of a prompt (the legend's swatch)."""
    return _hsv(_prompt_hue(prompt_index, n_prompts), 0.85, 1.0)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def instance_colours(
    detections: Sequence[tuple[str, int]], prompts: Sequence[str]
) -> dict[int, tuple[int, int, int]]:
    """Label index -> colour for an image's detections ``(prompt, index)``.

    The k-th instance of a prompt (by index) varies hue within a band a quarter as wide as the prompt's
    share of the wheel, and saturation and value, so neighbours of one prompt stay apart while the
    family stays recognisable.
    """
    order = list(prompts) + sorted({p for p, _ in detections} - set(prompts))
    band = 0.25 / max(1, len(order))
    seen: dict[str, int] = {}
    colours: dict[int, tuple[int, int, int]] = {}
    for prompt, index in sorted(detections, key=lambda d: d[1]):
        k = seen.get(prompt, 0)
        seen[prompt] = k + 1
        base = _prompt_hue(order.index(prompt), len(order))
        shift = ((k * 0.618034 + 0.5) % 1.0 - 0.5) * band  # the first is the family colour
        colours[index] = _hsv(base + shift, (0.85, 0.6, 1.0)[k % 3], (1.0, 0.8, 0.65)[k // 3 % 3])
    return colours


# ---- reading at preview size ----------------------------------------------------------------------


def preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the image part of a preview: the long side of the whole JPEG (legend
    strip included) at most ``max_side``, never enlarged."""
    scale = min(1.0, max_side / width, (max_side - LEGEND_HEIGHT) / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@contextlib.contextmanager
def _label_map(path: Path) -> Iterator[Image.Image]:
    """Open a label map (ours: trusted) with Pillow's pixel limit lifted for the header, under the
    lock imageio holds while it does the same, so a 200-megapixel mask is not a "decompression bomb"."""
    with open_header(path) as image:
        if image.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
            raise ValueError(f"{path} is a {image.mode} image, not a 16-bit label map.")
        yield image


def read_label_map_small(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The label map at ``path`` sampled nearest-neighbour to ``size`` (width, height), uint16.

    Samples are taken at the preview pixels' centres, so no label is ever blended with another.
    Today masks are 16-bit PNGs (decoded whole: 2 bytes a pixel); a tiled format reads windows here.
    """
    with _label_map(path) as image:
        # Pillow's nearest neighbour samples at the output pixels' centres, in its own memory.
        small = image.resize(size, Image.Resampling.NEAREST) if image.size != size else image
        labels: np.ndarray = np.asarray(small).astype(np.uint16, copy=False)
    return labels


# ---- compositing ----------------------------------------------------------------------------------


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of an instance with a 4-neighbour of another label (the image's edge counts as 0)."""
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] != centre
    result: np.ndarray = edge & (labels > 0)
    return result


def composite(image: Image.Image, labels: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """RGB uint8 array: instances filled at 50% opacity ((pixel + colour + 1) // 2), outlines in full."""
    pixels: np.ndarray = np.asarray(image.convert("RGB"), dtype=np.uint8)
    top = int(max(int(labels.max(initial=0)), max(colours, default=0)))
    lut = np.empty((top + 1, 3), np.uint16)
    lut[:] = _UNKNOWN
    for index, colour in colours.items():
        lut[index] = colour
    # One channel at a time: 2-D boolean indexing is several times faster than on (h, w, 3).
    out = pixels.copy()
    inside = labels > 0
    tint = lut[labels[inside]]
    for c in range(3):
        channel = out[..., c]
        channel[inside] = ((channel[inside] + tint[:, c] + 1) >> 1).astype(np.uint8)
    edge = _outline(labels)
    out[edge] = lut[labels[edge]].astype(np.uint8)
    return out


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _legend(width: int, prompts: Sequence[str], counts: dict[str, int]) -> Image.Image:
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    font = _font()
    x = 4
    for k, prompt in enumerate(prompts):
        if x > width - 20:
            break
        draw.rectangle([x, 4, x + 8, 12], fill=prompt_colour(k, len(prompts)))
        text = f"{prompt} {counts.get(prompt, 0)}"
        draw.text((x + 12, 2), text, fill=(235, 235, 235), font=font)
        x += 12 + round(draw.textlength(text, font=font)) + 10
    return strip


@dataclass(frozen=True)
class PreviewSpec:
    """What a preview needs besides the image: where things are, the run's prompts, the size."""

    input_dir: Path
    output_dir: Path
    prompts: tuple[str, ...]
    max_side: int = DEFAULT_PREVIEW_SIZE
    max_pixels: int = 250_000_000


def _stored_size(path: Path, max_pixels: int) -> tuple[int, int]:
    with open_header(path) as probe:  # imageio's rule: max_pixels decides, not Pillow's own limit
        width, height = probe.size
    if width * height > max_pixels:
        raise ValueError(f"{path} has {width * height:,} pixels, more than --max-pixels")
    return width, height


def render_preview(
    spec: PreviewSpec, rel: str, mask_path: str | None, detections: Sequence[tuple[str, int]]
) -> Image.Image:
    """The preview of input ``rel`` (image, overlay of ``mask_path`` if given, legend strip)."""
    source = spec.input_dir / rel
    if not (mask_path or "").lower().endswith(".tif"):  # read whole: an object in S3, its local copy
        from ..remote import localize

        source = Path(localize(source))
    labels_path = spec.output_dir / mask_path if mask_path else None
    if labels_path is not None and labels_path.suffix.lower() == ".tif":
        return _render_tiled(spec, source, labels_path, detections)
    # Header only: the size decides the draft scale. The label map's is the upright size; without
    # one, the image's stored size may be turned by EXIF, which leaves its short side the same.
    if labels_path is not None:
        with _label_map(labels_path) as probe:
            full = probe.size
    else:
        full = _stored_size(source, spec.max_pixels)
    size = preview_size(full[0], full[1], spec.max_side)
    image = read_image(source, spec.max_pixels, draft_side=max(1, min(size)))
    if labels_path is None:
        size = preview_size(*original_size(image), spec.max_side)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    if labels_path is not None:
        labels = read_label_map_small(labels_path, size)
        pixels = composite(image, labels, instance_colours(detections, spec.prompts))
        image = Image.fromarray(pixels)
    return _with_legend(image, size, detections, spec.prompts)


def _with_legend(
    image: Image.Image, size: tuple[int, int], detections: Sequence[tuple[str, int]], known: Sequence[str]
) -> Image.Image:
    counts: dict[str, int] = {}
    for prompt, _ in detections:
        counts[prompt] = counts.get(prompt, 0) + 1
    prompts = list(known) + sorted(set(counts) - set(known))
    out = Image.new("RGB", (size[0], size[1] + LEGEND_HEIGHT))
    out.paste(image, (0, 0))
    out.paste(_legend(size[0], prompts, counts), (0, size[1]))
    return out


def _render_tiled(
    spec: PreviewSpec, source: Path, labels_path: Path, detections: Sequence[tuple[str, int]]
) -> Image.Image:
    """The preview of a tiled (or georeferenced) image: image and label map sampled band by band
    from window reads, never a full-resolution raster in memory (a 40000 x 40000 map would be
    3.2 GB as one array); nearest-neighbour sampling, as for the labels of any preview."""
    from ..tiles.labelmap import read_label_window
    from ..tiles.windows import TiffSource, open_source

    probe = TiffSource(labels_path)
    try:
        full = (probe.width, probe.height)
    finally:
        probe.close()
    size = preview_size(full[0], full[1], spec.max_side)
    labels = _sample_bands(lambda window: read_label_window(labels_path, window), full, size)
    reader = open_source(source, max_pixels=spec.max_pixels)
    try:
        pixels = _sample_bands(reader.read, full, size)
    finally:
        reader.close()
    image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]).astype(np.uint8, copy=False))
    image = Image.fromarray(composite(image, labels, instance_colours(detections, spec.prompts)))
    return _with_legend(image, size, detections, spec.prompts)


def _sample_bands(
    read: Callable[[tuple[int, int, int, int]], np.ndarray], full: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """``size`` samples at the preview pixels' centres, reading ``full`` in bands of 512 rows."""
    (width, height), (w, h) = full, size
    ys = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
    parts = []
    for top in range(0, height, _BAND_ROWS):
        rows = ys[(ys >= top) & (ys < top + _BAND_ROWS)]
        if rows.size:
            band = read((0, top, width, min(height, top + _BAND_ROWS)))
            parts.append(band[rows - top][:, xs])
    return np.concatenate(parts)


#: Rows read at a time for a tiled image's preview (a TIFF's tile height).
_BAND_ROWS = 512


def write_preview(
    spec: PreviewSpec, rel: str, mask_path: str | None, detections: Sequence[tuple[str, int]]
) -> Path:
    """Render and write ``previews/<rel>.jpg`` atomically; returns its path."""
    target = safe_output_path(spec.output_dir, preview_relpath(rel))
    with about_image(spec.input_dir / rel):  # what GDAL says while sampling the image names it
        image = render_preview(spec, rel, mask_path, detections)
    with atomic_path(target) as tmp:
        image.save(tmp, "JPEG", quality=JPEG_QUALITY)
    return target


# ---- during a run ---------------------------------------------------------------------------------


def preview_threads() -> int:
    """Threads for previews in the parent: a quarter of the cores, 1 to 4 (workers need the rest)."""
    return max(1, min(4, (os.cpu_count() or 2) // 4))


class PreviewMaker:
    """Makes previews on a few threads of the parent as results arrive; ``submit`` never blocks.

    With more than ``MAX_QUEUED`` waiting, a result's preview is skipped (``deferred``) and made by
    the pass over missing previews at the end of the run.

    A preview that cannot be made (an unreadable image, a full disk) is logged and skipped: it never
    fails the run, and ``batchseg report --previews`` can make it later. Use as a context manager,
    or call ``close`` (which waits for the queued previews; after an exception they are dropped).
    """

    def __init__(self, spec: PreviewSpec | None, threads: int | None = None) -> None:
        self.spec = spec
        self._pool = (
            ThreadPoolExecutor(threads or preview_threads(), thread_name_prefix="preview") if spec else None
        )
        self._futures: set[Future[None]] = set()
        self._lock = threading.Lock()
        self.made = 0
        self.failed = 0
        self.deferred = 0

    @classmethod
    def for_run(cls, config: RunConfig) -> PreviewMaker:
        """A maker for a run: one that makes nothing unless ``config.previews`` is set."""
        if not config.previews:
            return cls(None)
        spec = PreviewSpec(
            input_dir=Path(config.input),
            output_dir=config.output_dir,
            prompts=tuple(config.prompts),
            max_side=config.preview_size,
            max_pixels=config.max_pixels,
        )
        return cls(spec)

    def submit(self, result: ItemResult) -> None:
        """Queue the preview of a result (ok: overlay; error: the plain image); others are ignored."""
        if self._pool is None or str(result.status) not in PREVIEW_STATUSES:
            return
        if self.pending() >= MAX_QUEUED:
            self.deferred += 1
            return
        detections = [(d.prompt, d.index) for d in result.detections]
        future = self._pool.submit(self._make, result.path, result.mask_path, detections)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._done)

    def submit_many(self, jobs: Iterable[tuple[str, str | None, list[tuple[str, int]]]]) -> None:
        """Queue previews given as (relative path, mask path, detections)."""
        assert self._pool is not None, "a PreviewMaker without a spec makes nothing"
        for rel, mask_path, detections in jobs:
            future = self._pool.submit(self._make, rel, mask_path, detections)
            with self._lock:
                self._futures.add(future)
            future.add_done_callback(self._done)

    def pending(self) -> int:
        with self._lock:
            return len(self._futures)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def _make(self, rel: str, mask_path: str | None, detections: list[tuple[str, int]]) -> None:
        assert self.spec is not None
        try:
            write_preview(self.spec, rel, mask_path, detections)
            with self._lock:
                self.made += 1
        except Exception as exc:  # noqa: BLE001 - a preview is a convenience; the run goes on
            with self._lock:
                self.failed += 1
            _LOG.warning("no preview for %s: %s: %s", rel, type(exc).__name__, exc)

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> PreviewMaker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(wait=exc is None)
