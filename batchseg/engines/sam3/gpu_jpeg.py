"""Big JPEGs decoded on the GPU (nvJPEG through torchvision), for the tiles of a run on CUDA.

A JPEG cannot be read in parts: the tiles of one are cut from the whole decoded image. Pillow
(libjpeg-turbo, one core) took 0.73 s for a 10000 x 10000 JPEG on an H100's host, and for the
first image of a task the first tile waits for all of it. nvJPEG took 0.12 s, the copy back to
host memory included; the tiles are cut from those pixels as from Pillow's, so nothing after the
decode changes. Loading nvJPEG takes about 1 s (``warm``, in a thread while the engine encodes
its prompts and applies its speed-ups; the backbone's capture waits for it); a JPEG read before
then is Pillow's.

Only a JPEG whose upright RGB image is what nvJPEG gives is decoded here: YCbCr or grey, stored
upright (no EXIF orientation to apply) and complete (ends with its end-of-image marker; Pillow
refuses a cut-short file, and this decode must not accept one). Anything else, and any failure
(no nvJPEG in this torchvision, too little free GPU memory, an error of nvJPEG), gives None: Pillow
decodes the file then, with its own checks and messages.

nvJPEG's inverse DCT and chroma upsampling are not libjpeg-turbo's, so pixels differ from Pillow's
by a few levels at colour edges (``benchmarks/tiles.py --phases decode``: mean 0.11, largest 13 on
its JPEG); a CPU run and a GPU run already differ more than that in their arithmetic.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from ... import imageio

__all__ = ["GpuJpeg", "plain_jpeg_size"]

log = logging.getLogger(__name__)

#: Device memory a decode may take, in bytes of the decoded RGB image: the planar result, its
#: interleaved copy and nvJPEG's own buffers.
WORKING_COPIES = 3
#: Device memory left free beside a decode, for the model running meanwhile.
HEADROOM = 1 << 30
#: Images smaller than this (pixels) stay with Pillow: their decode is short and overlapped anyway.
MIN_PIXELS = 4_000_000
#: Bytes of each of the two pinned buffers a decoded image comes back through.
STAGING_BYTES = 32 << 20
#: nvJPEG errors after which the run's JPEGs all go to Pillow (a driver or build that cannot).
MAX_FAILURES = 3


def plain_jpeg_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose upright RGB pixels nvJPEG gives as they are: baseline or
    progressive, YCbCr or grey, no EXIF orientation other than top-left, ending with its
    end-of-image marker; else None. Reads the header and the file's last bytes only."""
    try:
        with imageio.open_header(path) as im:
            if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L"):
                return None
            if im.getexif().get(0x0112, 1) != 1:
                return None
            size = im.size
        with open(path, "rb") as fh:
            fh.seek(-2, os.SEEK_END)
            if fh.read(2) != b"\xff\xd9":
                return None
    except Exception:  # noqa: BLE001 - anything odd: Pillow decodes it and says what is wrong
        return None
    return size


class GpuJpeg:
    """``decode(path)``: the (height, width, 3) uint8 pixels of a big plain JPEG decoded on
    ``device``, or None where Pillow must decode it. Called from the reading and prefetch threads;
    one decode at a time, on a stream of its own, so the model's queue never waits for it and it
    waits for nothing of the model's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._stream: Any = None
        self._staging: list[torch.Tensor] | None = None
        self._decode: Any = _nvjpeg()
        self.decoded = 0
        self.failures = 0
        self.loaded = threading.Event()  # set by ``warm``

    def __call__(self, path: str | os.PathLike[str]) -> np.ndarray | None:
        if self._decode is None or not self.loaded.is_set():
            return None  # still loading (``warm``): Pillow's, rather than wait
        size = plain_jpeg_size(path)
        if size is None or size[0] * size[1] < MIN_PIXELS:
            return None
        width, height = size
        with self._lock:
            if not self._room_for(width * height * 3):
                return None
            try:
                pixels = self._decoded(np.fromfile(path, np.uint8))
            except torch.cuda.OutOfMemoryError:
                return None  # the model took the memory meanwhile: Pillow's turn, this time
            except Exception as exc:  # noqa: BLE001 - nvJPEG's errors: Pillow decodes it instead
                self._failed(path, exc)
                return None
        if pixels.shape != (height, width, 3):
            return None
        self.decoded += 1
        return pixels

    def _failed(self, path: str | os.PathLike[str], exc: Exception) -> None:
        """A file nvJPEG refuses is Pillow's; a decoder that keeps failing is given up for the run."""
        self.failures += 1
        log.info("nvJPEG could not decode %s (%s); Pillow decodes it", os.fspath(path), exc)
        if self.failures >= MAX_FAILURES:
            self._decode = None

    def _room_for(self, nbytes: int) -> bool:
        free, _total = torch.cuda.mem_get_info(self.device)
        return free > WORKING_COPIES * nbytes + HEADROOM

    def _decoded(self, data: np.ndarray) -> np.ndarray:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            planar = self._decode(torch.from_numpy(data), device=self.device)
            interleaved = planar.permute(1, 2, 0).contiguous()
            del planar
            return self._to_host(interleaved)

    def _to_host(self, pixels: torch.Tensor) -> np.ndarray:
        """``pixels`` copied to host memory through two small pinned buffers, one filling while
        the other is read out: a copy to pageable memory took 0.24 s for 300 MB on an H100, and
        pinning a whole image would hold that much page-locked memory per image open.

        Every wait is on this stream alone. Its blocks are reused by the next decode on it only
        after these waits, so nothing queued elsewhere can still read them (torchvision's decoder
        allocates on the current stream)."""
        flat = pixels.view(-1)
        out = np.empty(flat.numel(), np.uint8)
        if self._staging is None:
            self._staging = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        staging = self._staging
        starts = range(0, flat.numel(), STAGING_BYTES)
        done: list[Any] = []

        def queue(k: int) -> None:
            n = min(STAGING_BYTES, flat.numel() - starts[k])
            staging[k % 2][:n].copy_(flat[starts[k] : starts[k] + n], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            done.append(event)

        queue(0)
        for k, start in enumerate(starts):
            if k + 1 < len(starts):
                queue(k + 1)  # into the other buffer, read out in the step before
            done[k].synchronize()
            n = min(STAGING_BYTES, flat.numel() - start)
            out[start : start + n] = staging[k % 2][:n].numpy()
        return out.reshape(pixels.shape)

    def warm(self) -> None:
        """Load nvJPEG and make its buffers now (about 1 s on an H100), from a thread of the
        engine's while it loads. Until this ends every JPEG is Pillow's: no decode waits for it."""
        try:
            if self._decode is None:
                return
            sample = io.BytesIO()
            Image.new("RGB", (64, 64), (90, 120, 150)).save(sample, "JPEG")
            with self._lock:
                self._decoded(np.frombuffer(sample.getvalue(), np.uint8).copy())
        except Exception as exc:  # noqa: BLE001 - nvJPEG cannot here: Pillow decodes all
            log.info("nvJPEG is not available (%s); Pillow decodes the JPEGs", exc)
            self._decode = None
        finally:
            self.loaded.set()


def load_in_background(device: torch.device, tiled: bool) -> tuple[GpuJpeg | None, threading.Thread | None]:
    """The decoder for a run on ``device`` (None off CUDA) and the thread loading it (``warm``),
    started now unless no image is cut into tiles in this run (``tiled``). The engine starts it
    before encoding its prompts and joins it before the backbone's capture."""
    jpeg = GpuJpeg(device) if device.type == "cuda" else None
    if jpeg is None or not tiled:
        return jpeg, None
    loading = threading.Thread(target=jpeg.warm, name="batchseg-nvjpeg", daemon=True)
    loading.start()
    return jpeg, loading


def _nvjpeg() -> Any:
    """torchvision's GPU JPEG decoder as ``decode(data, device=...)`` giving RGB, or None where
    this torchvision has none (built without nvJPEG, or its image decoding removed) or where
    ``BATCHSEG_NVJPEG=0`` asks for Pillow."""
    if os.environ.get("BATCHSEG_NVJPEG", "1") == "0":
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    if not hasattr(torch.ops.image, "decode_jpegs_cuda"):
        return None
    # torchvision 0.29 warns that its image decoding moves to TorchCodec; this decoder still works.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")

    def decode(data: torch.Tensor, device: torch.device) -> torch.Tensor:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # type: ignore[no-any-return]

    return decode
