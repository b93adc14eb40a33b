"""Overlay previews checked pixel by pixel on label maps and images built here."""

from __future__ import annotations

import colorsys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchseg.atomic import TEMP_SUFFIX
from batchseg.config import RunConfig
from batchseg.imageio import save_label_map
from batchseg.records import Detection, ItemResult, Status
from batchseg.report import previews
from batchseg.report.previews import (
    LEGEND_HEIGHT,
    PreviewMaker,
    PreviewSpec,
    instance_colours,
    preview_size,
    prompt_colour,
    read_label_map_small,
    render_preview,
    write_preview,
)

PROMPTS = ("roof", "tree")


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "out" / "masks").mkdir(parents=True)
    return tmp_path / "in", tmp_path / "out"


def _gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(
        np.uint8
    )


def test_fill_and_outline_pixel_by_pixel(tmp_path: Path) -> None:
    src, out = _folders(tmp_path)
    pixels = _gradient(120, 80)
    Image.fromarray(pixels).save(src / "a.png")  # lossless: the expected pixels are exact
    labels = np.zeros((80, 120), np.uint16)
    labels[10:30, 10:50] = 1  # roof
    labels[10:30, 50:70] = 3  # roof, touching label 1: the seam is outlined on both sides
    labels[40:75, 60:120] = 2  # tree, reaching the image's right edge
    save_label_map(out / "masks/a.png.png", labels)
    detections = [("roof", 1), ("tree", 2), ("roof", 3)]
    spec = PreviewSpec(src, out, PROMPTS, max_side=1024)

    preview = np.asarray(render_preview(spec, "a.png", "masks/a.png.png", detections))
    assert preview.shape == (80 + LEGEND_HEIGHT, 120, 3)  # small images are never enlarged
    colours = instance_colours(detections, PROMPTS)
    body = preview[:80]

    inside = np.zeros_like(labels, bool)
    for index, colour in colours.items():
        region = labels == index
        core = np.zeros_like(region)
        core[1:-1, 1:-1] = (
            region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
        )
        edge = region & ~core
        expected = (pixels[core].astype(int) + np.array(colour) + 1) // 2
        assert np.array_equal(body[core], expected), f"fill of label {index}"
        assert np.all(body[edge] == colour), f"outline of label {index}"
        inside |= region
    assert np.array_equal(body[~inside], pixels[~inside])  # background untouched
    # The seam between labels 1 and 3: both columns are outline, each in its own colour.
    assert tuple(body[20, 49]) == colours[1] and tuple(body[20, 50]) == colours[3]
    # The image edge closes an instance that touches it.
    assert tuple(body[50, 119]) == colours[2]
    # Legend: a swatch per prompt in the prompt's family colour, on the strip below the image.
    strip = preview[80:]
    for k in range(len(PROMPTS)):
        assert (strip.reshape(-1, 3) == prompt_colour(k, len(PROMPTS))).all(axis=1).sum() >= 36


def test_colours_come_in_one_family_per_prompt() -> None:
    detections = [("roof", i) for i in range(1, 7)] + [("tree", i) for i in range(7, 13)]
    colours = instance_colours(detections, PROMPTS)
    assert colours[1] == prompt_colour(0, 2) and colours[7] == prompt_colour(1, 2)
    assert len(set(colours.values())) == 12  # every instance its own colour

    def hue(rgb: tuple[int, int, int]) -> float:
        return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]

    def distance(a: float, b: float) -> float:
        return min(abs(a - b), 1 - abs(a - b))

    roof, tree = hue(prompt_colour(0, 2)), hue(prompt_colour(1, 2))
    for index, colour in colours.items():
        own, other = (roof, tree) if index <= 6 else (tree, roof)
        assert distance(hue(colour), own) <= 0.07 < distance(hue(colour), other)


def test_downscaled_by_nearest_labels_and_draft_decoding(tmp_path: Path) -> None:
    src, out = _folders(tmp_path)
    Image.fromarray(_gradient(2048, 1024)).save(src / "big.jpg", quality=95)
    labels = np.zeros((1024, 2048), np.uint16)
    labels[100:500, 200:900] = 1
    labels[600:1000, 1000:1900] = 2
    labels[300:302, 1200:1900] = 3  # a 2-pixel line: sampled or not, never a blended value
    save_label_map(out / "masks/big.jpg.png", labels)
    assert preview_size(2048, 1024, 1024) == (1024, 512)

    small = read_label_map_small(out / "masks/big.jpg.png", (1024, 512))
    assert small.dtype == np.uint16 and np.array_equal(small, labels[1::2, 1::2])  # pixel centres

    spec = PreviewSpec(src, out, PROMPTS, max_side=1024)
    path = write_preview(spec, "big.jpg", "masks/big.jpg.png", [("roof", 1), ("tree", 2), ("roof", 3)])
    assert path == out / "previews/big.jpg.jpg"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    with Image.open(path) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (1024, 512 + LEGEND_HEIGHT)
        got = np.asarray(jpeg.convert("RGB")).astype(int)
    colours = instance_colours([("roof", 1), ("tree", 2), ("roof", 3)], PROMPTS)
    image = _gradient(2048, 1024)[1::2, 1::2].astype(int)
    for (y, x), label in (((150, 300), 1), ((400, 700), 2)):  # interior points, preview pixels
        expected = (image[y, x] + np.array(colours[label]) + 1) // 2
        assert np.abs(got[y, x] - expected).max() <= 12  # JPEG's loss
    assert np.abs(got[20, 20] - image[20, 20]).max() <= 12


def test_no_full_resolution_array_while_compositing(tmp_path: Path) -> None:
    """A 12-megapixel image: the arrays Python allocates stay at preview size (Pillow decodes the
    JPEG at a reduced scale and samples the label map in its own memory); one full-size float
    array of the image would be 288 MB, an int copy of the label map 48 MB."""
    src, out = _folders(tmp_path)
    Image.new("RGB", (4000, 3000), (90, 120, 60)).save(src / "huge.jpg", quality=80)
    labels = np.zeros((3000, 4000), np.uint16)
    labels[500:2500, 500:3500] = 1
    save_label_map(out / "masks/huge.jpg.png", labels)
    del labels
    spec = PreviewSpec(src, out, PROMPTS)
    tracemalloc.start()
    try:
        write_preview(spec, "huge.jpg", "masks/huge.jpg.png", [("roof", 1)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    with Image.open(out / "previews/huge.jpg.jpg") as jpeg:
        assert jpeg.size == (1024, 768 + LEGEND_HEIGHT)


def test_exif_rotated_image_is_previewed_upright(tmp_path: Path) -> None:
    src, out = _folders(tmp_path)
    stored = Image.fromarray(_gradient(200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: upright it is 100 x 200
    stored.save(src / "turned.jpg", exif=exif, quality=95)
    labels = np.zeros((200, 100), np.uint16)
    labels[0:50, :] = 1  # the upright image's top quarter
    save_label_map(out / "masks/turned.jpg.png", labels)
    preview = render_preview(
        PreviewSpec(src, out, PROMPTS), "turned.jpg", "masks/turned.jpg.png", [("roof", 1)]
    )
    assert preview.size == (100, 200 + LEGEND_HEIGHT)
    got = np.asarray(preview).astype(int)
    upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270)).astype(int)
    colour = np.array(instance_colours([("roof", 1)], PROMPTS)[1])
    assert np.abs(got[25, 50] - (upright[25, 50] + colour + 1) // 2).max() <= 10
    assert np.abs(got[150, 50] - upright[150, 50]).max() <= 10


def test_preview_maker_skips_what_it_cannot_make(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, out = _folders(tmp_path)
    Image.fromarray(_gradient(64, 48)).save(src / "good.png")
    (src / "bad.png").write_bytes(b"not an image")
    labels = np.zeros((48, 64), np.uint16)
    labels[5:20, 5:20] = 1
    save_label_map(out / "masks/good.png.png", labels)
    config = RunConfig(input=src, prompts=PROMPTS, output=out, previews=True, preview_size=256)
    detection = Detection("roof", 1, 0.9, (5, 5, 20, 20), 225, "")
    results = [
        ItemResult("good.png", Status.OK, mask_path="masks/good.png.png", detections=[detection]),
        ItemResult("bad.png", Status.ERROR, error_type="ValueError"),
        ItemResult("gone.png", Status.CRASHED),  # never decoded in the parent
    ]
    with PreviewMaker.for_run(config) as maker:
        for result in results:
            maker.submit(result)
    assert (maker.made, maker.failed) == (1, 1)
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["good.png.jpg"]
    assert "no preview for bad.png" in caplog.text
    with PreviewMaker.for_run(config.with_changes(previews=False)) as off:
        off.submit(results[0])
    assert off.made == 0


def test_a_long_backlog_is_left_to_the_end_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = _folders(tmp_path)
    monkeypatch.setattr(previews, "MAX_QUEUED", 0)
    config = RunConfig(input=src, prompts=PROMPTS, output=out, previews=True)
    with PreviewMaker.for_run(config) as maker:
        maker.submit(ItemResult("a.png", Status.OK, mask_path="masks/a.png.png"))
    assert (maker.made, maker.failed, maker.deferred) == (0, 0, 1)


def test_pillows_own_pixel_limit_does_not_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_pixels decides, as for the workers: Pillow's process-wide limit (here 1,000 pixels) would
    call both the image and its label map decompression bombs."""
    src, out = _folders(tmp_path)
    Image.fromarray(_gradient(64, 48)).save(src / "a.png")
    save_label_map(out / "masks/a.png.png", np.ones((48, 64), np.uint16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    spec = PreviewSpec(src, out, PROMPTS)
    assert render_preview(spec, "a.png", "masks/a.png.png", [("roof", 1)]).size == (64, 48 + LEGEND_HEIGHT)
    assert render_preview(spec, "a.png", None, []).size == (64, 48 + LEGEND_HEIGHT)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ValueError, match="more than --max-pixels"):
        render_preview(PreviewSpec(src, out, PROMPTS, max_pixels=1000), "a.png", None, [])


def test_previews_are_readable_by_everyone(tmp_path: Path) -> None:
    src, out = _folders(tmp_path)
    Image.fromarray(_gradient(32, 24)).save(src / "a.png")
    path = write_preview(PreviewSpec(src, out, PROMPTS), "a.png", None, [])
    assert path.stat().st_mode & 0o777 == 0o644  # temp files start private (0600)
