"""``imageio.pixels_view``: a decoded image's pixels viewed in Pillow's own memory instead of
copied (what a big JPEG cut into tiles is read from), equal to the copy, alive as long as the view."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchseg import imageio
from batchseg.tiles.windows import WholeSource

CORE = Image.core  # type: ignore[attr-defined]


@pytest.fixture
def block_size() -> Iterator[None]:
    """Pillow's block size is process-wide: each test leaves it as it found it."""
    before = CORE.get_block_size()
    yield
    CORE.set_block_size(before)


def _photo(path: Path, size: tuple[int, int] = (1500, 1200)) -> Path:
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
    return path


def test_a_decoded_image_is_viewed_not_copied(tmp_path: Path, block_size: None) -> None:
    CORE.set_block_size(4096)  # 1500 x 1200 RGB in blocks of 4 KiB: rows apart, so copied
    path = _photo(tmp_path / "a.jpg")
    apart = imageio.read_image(path, 10**8)
    copied = imageio.pixels_view(apart)
    assert not np.shares_memory(copied, imageio.pixels_view(apart)), "rows apart: each call copies"
    imageio.configure_pillow(10**8)  # what a worker does: an image up to the limit in one block
    image = imageio.read_image(path, 10**8)
    view, again = imageio.pixels_view(image), imageio.pixels_view(image)
    assert view.shape == (1200, 1500, 3) and view.dtype == np.uint8
    assert np.array_equal(view, np.asarray(image)) and np.array_equal(view, copied)
    assert np.shares_memory(view, again), "two views of one image are one memory: not copies"
    assert not view.flags.writeable
    assert np.array_equal(view[17:40, 3:900], np.asarray(image.crop((3, 17, 900, 40))))


def test_the_view_outlives_the_image(tmp_path: Path, block_size: None) -> None:
    imageio.configure_pillow(10**8)
    view = imageio.pixels_view(imageio.read_image(_photo(tmp_path / "a.jpg"), 10**8))
    want = view.copy()
    gc.collect()
    for _ in range(5):  # memory freed with the image would be handed out again here
        Image.new("RGB", (1500, 1200), (9, 9, 9)).load()
    assert np.array_equal(view, want)


def test_a_whole_source_reads_windows_of_the_viewed_image(tmp_path: Path, block_size: None) -> None:
    imageio.configure_pillow(10**8)
    path = _photo(tmp_path / "big.png", (2100, 1300))
    source = WholeSource(path, 10**8)
    whole = np.asarray(Image.open(path).convert("RGB"))
    assert (source.width, source.height) == (2100, 1300)
    for x0, y0, x1, y1 in ((0, 0, 1008, 1008), (1092, 292, 2100, 1300), (5, 7, 6, 8)):
        assert np.array_equal(source.read((x0, y0, x1, y1)), whole[y0:y1, x0:x1])


@pytest.mark.parametrize("kind", ["upright", "rotated", "grey", "cmyk"])
def test_read_pixels_gives_read_images_pixels_without_a_copy(
    tmp_path: Path, kind: str, block_size: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a big image in tiles is read from: the pixels ``read_image`` gives, every mode and
    orientation; for an upright RGB JPEG no whole-image copy on the way, and alive after the file's
    image is closed and its memory could be handed out again."""
    imageio.configure_pillow(10**8)
    path = _photo(tmp_path / "a.jpg", (300, 200))
    if kind != "upright":
        picture = Image.open(path)
        exif = Image.Exif()
        if kind == "rotated":
            exif[0x0112] = 6  # shown turned 90 degrees clockwise
        converted = {"rotated": picture, "grey": picture.convert("L"), "cmyk": picture.convert("CMYK")}[kind]
        path = tmp_path / f"{kind}.jpg"
        converted.save(path, exif=exif, quality=95)
    want = np.asarray(imageio.read_image(path, 10**8))
    copies = []
    copy = Image.Image.copy

    def counted(self: Image.Image) -> Image.Image:
        copies.append(self.size)
        return copy(self)

    monkeypatch.setattr(Image.Image, "copy", counted)
    got = imageio.read_pixels(path, 10**8)
    gc.collect()
    for _ in range(5):
        Image.new("RGB", (300, 200), (9, 9, 9)).load()
    assert got.shape == want.shape and np.array_equal(got, want), kind
    assert not got.flags.writeable
    if kind == "upright":
        assert copies == []
