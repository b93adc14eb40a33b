"""Big JPEGs decoded on the GPU for their tiles (``engines.sam3.gpu_jpeg``): which files nvJPEG may
take (checked on any machine), its pixels against Pillow's and the fall-back to Pillow (on a GPU)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from batchseg import imageio
from batchseg.engines.sam3.gpu_jpeg import GpuJpeg, plain_jpeg_size
from batchseg.errors import InvalidImageError
from batchseg.tiles.windows import WindowReader

HAS_CUDA = torch.cuda.is_available()


def _photo(width: int, height: int) -> Image.Image:
    """A photograph-like image: gradients and coloured shapes whose edges a lens has softened."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], axis=2)
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(0)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        side = int(rng.integers(width // 40, width // 8))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle((x0, y0, x0 + side, y0 + side // 2), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(2))


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, "JPEG", quality=90, **kwargs)
    return path


def test_only_upright_complete_rgb_or_grey_jpegs_are_for_nvjpeg(tmp_path: Path) -> None:
    photo = _photo(640, 480)
    assert plain_jpeg_size(_save(photo, tmp_path / "rgb.jpg")) == (640, 480)
    assert plain_jpeg_size(_save(photo.convert("L"), tmp_path / "grey.jpg")) == (640, 480)
    assert plain_jpeg_size(_save(photo, tmp_path / "progressive.jpg", progressive=True)) == (640, 480)
    assert plain_jpeg_size(_save(photo.convert("CMYK"), tmp_path / "cmyk.jpg")) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: Pillow turns it upright, nvJPEG would not
    assert plain_jpeg_size(_save(photo, tmp_path / "rotated.jpg", exif=exif)) is None
    exif[0x0112] = 1
    assert plain_jpeg_size(_save(photo, tmp_path / "upright.jpg", exif=exif)) == (640, 480)
    whole = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    assert plain_jpeg_size(tmp_path / "cut.jpg") is None
    photo.save(tmp_path / "photo.png")
    assert plain_jpeg_size(tmp_path / "photo.png") is None
    (tmp_path / "noise.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    assert plain_jpeg_size(tmp_path / "noise.jpg") is None


def test_a_windows_image_comes_from_the_decoder_given_or_else_from_pillow(tmp_path: Path) -> None:
    path = _save(_photo(640, 480), tmp_path / "a.jpg")
    asked: list[str] = []

    def brighter(name: str) -> np.ndarray | None:  # any decoder: here Pillow's pixels plus one
        asked.append(name)
        return imageio.read_pixels(name, 10**9) + 1 if name.endswith("a.jpg") else None

    reader = WindowReader(10**9, decode=brighter)
    pixels, width, height, _ = reader.read(path, (10, 20, 110, 70))
    assert (width, height) == (640, 480) and asked == [str(path)]
    expected = imageio.read_pixels(path, 10**9)[20:70, 10:110]
    assert np.array_equal(pixels, expected + 1)
    other = _save(_photo(320, 240), tmp_path / "b.jpg")
    pixels, *_ = reader.read(other, (0, 0, 50, 50))  # the decoder says None: Pillow's pixels
    assert np.array_equal(pixels, imageio.read_pixels(other, 10**9)[:50, :50])
    reader.close()


@pytest.mark.skipif(not HAS_CUDA, reason="nvJPEG needs a CUDA GPU")
@pytest.mark.parametrize("progressive", [False, True])
def test_nvjpeg_pixels_are_pillows_within_a_few_levels(tmp_path: Path, progressive: bool) -> None:
    path = _save(_photo(3000, 2000), tmp_path / "big.jpg", progressive=progressive)
    decoder = GpuJpeg(torch.device("cuda"))
    assert decoder(str(path)) is None  # nvJPEG still loading: Pillow decodes it, nothing waits
    decoder.warm()
    pixels = decoder(str(path))
    assert pixels is not None and decoder.decoded == 1
    pillow = imageio.read_pixels(path, 10**9)
    assert pixels.shape == pillow.shape and pixels.dtype == np.uint8
    diff = np.abs(pixels.astype(np.int16) - pillow.astype(np.int16))
    # nvJPEG upsamples chroma otherwise than libjpeg-turbo: a few levels at colour edges. Measured
    # on an H100: this image mean 0.20, 99th percentile 6, largest 41 (at a saturated edge); the
    # benchmark's 10000x10000 JPEG mean 0.11, 99.9th percentile 3, largest 13.
    stats = (diff.mean(), np.percentile(diff, 99), diff.max())
    print("nvJPEG against Pillow: mean, 99th percentile, largest", stats)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8, stats


@pytest.mark.skipif(not HAS_CUDA, reason="nvJPEG needs a CUDA GPU")
def test_what_nvjpeg_must_not_decode_goes_to_pillow_with_its_errors(tmp_path: Path) -> None:
    decoder = GpuJpeg(torch.device("cuda"))
    decoder.warm()
    big = _photo(3000, 2000)
    assert decoder(str(_save(big.convert("CMYK"), tmp_path / "cmyk.jpg"))) is None
    assert decoder(str(_save(_photo(800, 600), tmp_path / "small.jpg"))) is None  # Pillow's is quick
    whole = io.BytesIO()
    big.save(whole, "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    assert decoder(str(tmp_path / "cut.jpg")) is None
    reader = WindowReader(10**9, decode=decoder)
    with pytest.raises(InvalidImageError, match="damaged or incomplete"):  # Pillow's message, as without
        reader.read(tmp_path / "cut.jpg", (0, 0, 10, 10))
    assert decoder.decoded == 0
