"""imageio: every bad-input kind built for real with Pillow, label maps, and output-path guards."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from batchseg.errors import InvalidImageError
from batchseg.imageio import (
    encode_label_png,
    mask_relpath,
    path_too_long,
    read_image,
    read_label_map,
    safe_output_path,
    save_label_map,
)

LIMIT = 10_000_000


def noise_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def saved(tmp_path: Path, name: str, image: Image.Image, **params: object) -> Path:
    path = tmp_path / name
    image.save(path, **params)  # type: ignore[arg-type]
    return path


def mode_of(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# --- refused inputs -----------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"^The file is empty \(0 bytes\).*copy it again\.$"):
        read_image(path, LIMIT)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match=r"cannot be read \(No such file or directory\)") as info:
        read_image(tmp_path / "gone.png", LIMIT)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(InvalidImageError, match=r"^The file is not an image Pillow can read") as info:
        read_image(path, LIMIT)
    assert info.value.__cause__ is not None  # raised from Pillow's error


@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file_is_refused(tmp_path: Path, fmt: str, suffix: str) -> None:
    buffer = io.BytesIO()
    noise_rgb(256, 256).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InvalidImageError, match=r"^The image data is damaged or incomplete .*copy or export it"
    ):
        read_image(path, LIMIT)


def test_truncation_is_refused_even_if_someone_allowed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.BytesIO()
    noise_rgb(256, 256).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:3000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InvalidImageError, match=r"damaged or incomplete"):
        read_image(path, LIMIT)


def test_pixel_limit_refused_from_the_header(tmp_path: Path) -> None:
    path = saved(tmp_path, "big.png", noise_rgb(100, 101))
    with pytest.raises(
        InvalidImageError,
        match=r"^The image is 100 x 101 = 10,100 pixels, more than the limit of 10,099 \(--max-pixels\); "
        r"raise --max-pixels if the image is genuine\.$",
    ):
        read_image(path, 10_099)
    assert read_image(path, 10_100).size == (100, 101)


def test_our_limit_rules_over_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's own limit, far below ours, must neither refuse nor warn (warnings are errors here).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = saved(tmp_path, "a.png", noise_rgb(64, 48))
    assert read_image(path, LIMIT).size == (64, 48)


def test_header_damage(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    noise_rgb().save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[29] ^= 0xFF  # inside IHDR: its CRC no longer matches
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with pytest.raises(
        InvalidImageError, match=r"^The file starts like a PNG image but its header is damaged"
    ):
        read_image(path, LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_cut_right_after_the_header(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    noise_rgb(256, 256).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[:40])
    with pytest.raises(InvalidImageError, match=r"damaged or incomplete.*copy or export it again\.$"):
        read_image(path, LIMIT)


# --- accepted inputs, converted to RGB ------------------------------------------------------------


def test_rgb_jpeg_is_returned_as_is(tmp_path: Path) -> None:
    source = noise_rgb()
    path = saved(tmp_path, "a.png", source)
    image = read_image(path, LIMIT)
    assert np.array_equal(pixels(image), np.asarray(source))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = saved(tmp_path, "cmyk.jpg", Image.new("CMYK", (32, 16), (0, 255, 255, 0)), quality=95)
    assert mode_of(path) == "CMYK"
    rgb = pixels(read_image(path, LIMIT))
    assert np.abs(rgb.astype(int) - [255, 0, 0]).max() <= 3  # cyan 0, magenta+yellow full: red


def test_16_bit_grayscale_is_stretched_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 2048, 4095]], dtype=np.uint16)  # 12-bit data in a 16-bit PNG
    path = saved(tmp_path, "g16.png", Image.fromarray(values))
    assert mode_of(path) == "I;16"
    rgb = pixels(read_image(path, LIMIT))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 62, 128, 255]  # v * 255 / 4095, rounded
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_16_bit_constant_image_keeps_its_level(tmp_path: Path) -> None:
    path = saved(tmp_path, "flat.png", Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    assert pixels(read_image(path, LIMIT)).min() == 255


def test_32_bit_integer_mode_i(tmp_path: Path) -> None:
    values = np.array([[-5, 0, 10]], dtype=np.int32)
    path = saved(tmp_path, "i.tif", Image.fromarray(values))
    assert mode_of(path) == "I"
    assert pixels(read_image(path, LIMIT))[0, :, 0].tolist() == [0, 85, 255]


def test_float_mode_f_with_nan(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    path = saved(tmp_path, "f.tif", Image.fromarray(values))
    assert mode_of(path) == "F"
    assert pixels(read_image(path, LIMIT))[0, :, 0].tolist() == [0, 128, 255, 0]


def test_palette_with_transparency_composited_on_black(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)  # red, made transparent below
    image.putpixel((1, 0), 1)  # green, opaque
    path = saved(tmp_path, "p.png", image, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info["transparency"] == 0
    assert pixels(read_image(path, LIMIT)).tolist() == [[[0, 0, 0], [0, 255, 0]]]


def test_la_alpha_composited_on_black(tmp_path: Path) -> None:
    data = np.array([[[200, 255], [200, 0], [200, 128]]], dtype=np.uint8)
    path = saved(tmp_path, "la.png", Image.fromarray(data, mode="LA"))
    assert pixels(read_image(path, LIMIT))[0, :, 0].tolist() == [200, 0, 100]


def test_rgba_alpha_composited_on_black(tmp_path: Path) -> None:
    data = np.array([[[10, 20, 30, 255], [255, 0, 0, 0]]], dtype=np.uint8)
    path = saved(tmp_path, "rgba.png", Image.fromarray(data, mode="RGBA"))
    assert pixels(read_image(path, LIMIT)).tolist() == [[[10, 20, 30], [0, 0, 0]]]


def test_one_bit(tmp_path: Path) -> None:
    image = Image.new("1", (3, 1))
    image.putpixel((1, 0), 1)
    path = saved(tmp_path, "bits.png", image)
    assert mode_of(path) == "1"
    assert pixels(read_image(path, LIMIT))[0, :, 0].tolist() == [0, 255, 0]


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    assert pixels(read_image(path, LIMIT))[4, 4].tolist() == [255, 0, 0]


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    path = saved(tmp_path, "rot.jpg", Image.fromarray(stored), exif=exif.tobytes(), quality=95)
    upright = read_image(path, LIMIT)
    assert upright.size == (20, 40)
    rgb = pixels(upright).astype(int)
    assert np.abs(rgb[5, 10] - [255, 0, 0]).max() <= 8  # the stored left is now on top
    assert np.abs(rgb[35, 10] - [0, 0, 255]).max() <= 8


def test_result_is_detached_from_the_file(tmp_path: Path) -> None:
    path = saved(tmp_path, "a.png", noise_rgb())
    image = read_image(path, LIMIT)
    os.remove(path)  # would fail on Windows if a handle were still open
    assert image.getpixel((0, 0)) is not None


# --- label maps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (37, 53)])
def test_label_map_round_trip(tmp_path: Path, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 65536, shape, dtype=np.uint16)
    labels.flat[0] = 65535
    path = tmp_path / "masks" / "sub" / "a.jpg.png"
    save_label_map(path, labels)
    with Image.open(path) as image:  # any PNG reader sees a 16-bit grayscale image
        assert (image.format, image.mode, image.size) == ("PNG", "I;16", (shape[1], shape[0]))
    back = read_label_map(path)
    assert back.dtype == np.uint16 and np.array_equal(back, labels)


def test_label_map_sparse_blobs_compress_well(tmp_path: Path) -> None:
    labels = np.zeros((300, 400), np.uint16)
    for k in range(1, 40):
        labels[(k * 7) % 280 : (k * 7) % 280 + 15, (k * 11) % 380 : (k * 11) % 380 + 15] = k
    data = encode_label_png(labels)
    assert len(data) < labels.nbytes // 20
    save_label_map(tmp_path / "m.png", labels)
    assert np.array_equal(read_label_map(tmp_path / "m.png"), labels)


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (1536, 2048)])
def test_an_empty_label_map_is_a_valid_png_of_zeros(tmp_path: Path, shape: tuple[int, int]) -> None:
    # Maps without detections come from a cache: the same reader must see the same zeros.
    for _ in range(2):
        save_label_map(tmp_path / "e.png", np.zeros(shape, np.uint16))
        back = read_label_map(tmp_path / "e.png")
        assert back.shape == shape and not back.any()
    one = np.zeros(shape, np.uint16)
    one[-1, -1] = 3  # not empty: encoded, not cached
    save_label_map(tmp_path / "o.png", one)
    assert np.array_equal(read_label_map(tmp_path / "o.png"), one)


def test_label_map_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    save_label_map(path, np.ones((4, 4), np.uint16))
    save_label_map(path, np.full((2, 3), 7, np.uint16))
    assert read_label_map(path).tolist() == [[7, 7, 7], [7, 7, 7]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # no temp file left


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.int32), np.zeros((2, 2, 2), np.uint16)]
)
def test_label_map_refuses_other_arrays_and_keeps_the_old_file(tmp_path: Path, bad: np.ndarray) -> None:
    path = tmp_path / "m.png"
    save_label_map(path, np.ones((4, 4), np.uint16))
    with pytest.raises(ValueError, match="2-D uint16"):
        save_label_map(path, bad)
    assert read_label_map(path).tolist() == np.ones((4, 4)).tolist()


def test_read_label_map_refuses_a_color_image(tmp_path: Path) -> None:
    path = saved(tmp_path, "rgb.png", noise_rgb())
    with pytest.raises(ValueError, match="is a RGB image, not a 16-bit label map"):
        read_label_map(path)


# --- output paths ---------------------------------------------------------------------------------


def test_mask_relpath() -> None:
    assert mask_relpath("a/b.jpg") == "masks/a/b.jpg.png"
    assert mask_relpath("x.PNG") == "masks/x.PNG.png"


def test_safe_output_path_accepts_plain_relative_paths(tmp_path: Path) -> None:
    assert safe_output_path(tmp_path, "masks/a/b.jpg.png") == tmp_path / "masks" / "a" / "b.jpg.png"


@pytest.mark.parametrize(
    "rel",
    [
        "",
        "/etc/passwd",
        "\\windows\\x.png",
        "//server/share/x.png",
        "\\\\server\\share\\x.png",
        "C:x.png",
        "c:/x.png",
        "..",
        "../x.png",
        "masks/../../x.png",
        "masks\\..\\..\\x.png",
        "a\x00b.png",
    ],
)
def test_safe_output_path_refuses_escapes(tmp_path: Path, rel: str) -> None:
    with pytest.raises(ValueError, match="^Refusing output path"):
        safe_output_path(tmp_path / "out", rel)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_safe_output_path_refuses_a_link_leading_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "masks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="resolves outside"):
        safe_output_path(out, "masks/a.jpg.png")


def test_path_too_long(tmp_path: Path) -> None:
    room = 259 - len(str(tmp_path.resolve())) - 1
    assert not path_too_long(tmp_path.resolve() / ("a" * room))  # 259 characters: still fine
    assert path_too_long(tmp_path.resolve() / ("a" * (room + 1)))  # 260: too long
    assert not path_too_long("\\\\?\\C:\\" + "a" * 400)  # extended-length paths have no such limit
