"""Label maps written window by window, and big inputs read window by window."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from _runs import read_manifests
from _tile_shapes import Shape, tile_detections
from PIL import Image, ImageDraw

from batchseg import cog, imageio
from batchseg.errors import InvalidImageError
from batchseg.tiles import labelmap
from batchseg.tiles import windows as source_module
from batchseg.tiles.grid import plan_tiles
from batchseg.tiles.labelmap import label_map_relpath, read_label_window, write_label_map
from batchseg.tiles.merge import MergedDetection, merge_tiles
from batchseg.tiles.sparse import SparseMask
from batchseg.tiles.windows import TiffSource, WholeSource, open_source


def _merged(width: int, height: int) -> list[MergedDetection]:
    plan = plan_tiles(width, height, 1008, 252)
    shapes = [
        Shape("ring", 1000.0, 1000.0, 700.0, 500.0, inner=0.5),
        Shape("disc", 2500.0, 760.0, 150.0, 150.0),
        Shape("rect", 0.0, 3000.0, 400.0, 300.0),
        Shape("disc", 2700.0, 700.0, 120.0, 90.0),  # overlaps the disc above: the better score owns it
    ]
    results = {t.id: tile_detections(shapes, t, width, height) for t in plan.tiles}
    return merge_tiles(plan, results)


def _paint(detections: list[MergedDetection], window: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = window
    out = np.zeros((y1 - y0, x1 - x0), np.uint32)
    for d in detections:
        col, row0, row1 = d.mask.clip(window).columns()
        for c, a, b in zip(col.tolist(), row0.tolist(), row1.tolist(), strict=True):
            assert not out[a - y0 : b - y0, c - x0].any()  # visible masks never overlap
            out[a - y0 : b - y0, c - x0] = d.index
    return out


def test_tiled_tiff_label_map_holds_every_detection(tmp_path: Path) -> None:
    width, height = 3100, 3500  # not a multiple of the 512 block
    merged = _merged(width, height)
    assert len(merged) == 4
    path = tmp_path / label_map_relpath("a/b.jpg", tiled=True)
    write_label_map(path, merged, width, height)
    assert path.name == "b.jpg.tif" and not list(path.parent.glob(".*"))  # no temp file left
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        assert page.is_tiled and page.tilewidth == labelmap.BLOCK and page.dtype == np.uint16
        assert page.compression == 8 and page.shape == (height, width)  # DEFLATE
        whole = page.asarray()
    assert np.array_equal(whole, _paint(merged, (0, 0, width, height)))
    for d in merged:
        assert np.count_nonzero(whole == d.index) == d.area_px
    window = (900, 400, 2800, 1300)
    assert np.array_equal(read_label_window(path, window), whole[400:1300, 900:2800])


def test_png_label_map_for_an_image_processed_whole(tmp_path: Path) -> None:
    merged = _merged(3000, 3500)
    path = tmp_path / label_map_relpath("x.png", tiled=False)
    assert path.name == "x.png.png"
    write_label_map(path, merged, 3000, 3500)
    assert np.array_equal(imageio.read_label_map(path), _paint(merged, (0, 0, 3000, 3500)))


def test_more_than_65535_detections_make_a_uint32_map(tmp_path: Path) -> None:
    height, width, n = 300, 300, 70_000
    positions = np.arange(n, dtype=np.int64) + 500  # one pixel each
    merged = [
        MergedDetection(
            k + 1,
            "p",
            1.0,
            (0.0, 0.0, 1.0, 1.0),
            1,
            1,
            SparseMask(positions[k : k + 1], positions[k : k + 1] + 1, height),
        )
        for k in range(n)
    ]
    path = tmp_path / "m.tif"
    write_label_map(path, merged, width, height)
    labels = tifffile.imread(path)
    assert labels.dtype == np.uint32
    flat = labels.T.ravel()  # column-major, as the positions are
    assert np.array_equal(flat[500 : 500 + n], np.arange(1, n + 1))
    assert np.count_nonzero(flat) == n
    with pytest.raises(ValueError, match="65535"):
        write_label_map(tmp_path / "m.png", merged, width, height)


def test_bigtiff_past_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cog, "_BIGTIFF_FROM", 1000)
    merged = _merged(3000, 3500)
    write_label_map(tmp_path / "big.tif", merged, 3000, 3500)
    with tifffile.TiffFile(tmp_path / "big.tif") as tf:
        assert tf.is_bigtiff
    assert np.array_equal(
        read_label_window(tmp_path / "big.tif", (0, 0, 3000, 3500)), _paint(merged, (0, 0, 3000, 3500))
    )


@pytest.mark.parametrize("layout", [{"tile": (256, 256)}, {"rowsperstrip": 37}])
def test_tiff_windows_equal_the_image(tmp_path: Path, layout: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1000, 1300, 3), np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="rgb", compression="zlib", **layout)  # type: ignore[arg-type]
    source = open_source(tmp_path / "a.tif", max_pixels=10)  # read by window: --max-pixels does not apply
    assert isinstance(source, TiffSource) and (source.width, source.height) == (1300, 1000)
    for window in [(0, 0, 1300, 1000), (255, 255, 257, 257), (1000, 700, 1300, 1000), (3, 500, 900, 999)]:
        x0, y0, x1, y1 = window
        assert np.array_equal(source.read(window), pixels[y0:y1, x0:x1])
    source.close()


def test_16_bit_tiff_is_stretched_over_the_whole_image_not_per_window(tmp_path: Path) -> None:
    values = np.full((600, 600), 1000, np.uint16)
    values[:, 300:] = 3000
    values[0, 0] = 0
    values[-1, -1] = 4000
    tifffile.imwrite(tmp_path / "g.tif", values, tile=(128, 128))
    source = open_source(tmp_path / "g.tif", max_pixels=10**6)
    left, right = source.read((10, 10, 100, 100)), source.read((400, 400, 500, 500))
    assert (left == round(1000 * 255 / 4000)).all() and (right == round(3000 * 255 / 4000)).all()
    assert left.shape == (90, 90, 3)
    source.close()


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    pixels = np.zeros((64, 128, 4), np.uint8)
    pixels[..., :3] = 200
    pixels[:, 64:, 3] = 255
    tifffile.imwrite(
        tmp_path / "a.tif", pixels, photometric="rgb", extrasamples=["unassalpha"], tile=(32, 32)
    )
    source = open_source(tmp_path / "a.tif", max_pixels=10**6)
    window = source.read((0, 0, 128, 64))
    source.close()
    assert (window[:, :64] == 0).all() and (window[:, 64:] == 200).all()


def test_formats_read_whole_are_refused_above_max_pixels_with_a_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (400, 300), (10, 20, 30)).save(tmp_path / "a.jpg")
    whole = open_source(tmp_path / "a.jpg", max_pixels=120_000)
    assert isinstance(whole, WholeSource) and whole.read((0, 0, 5, 5)).shape == (5, 5, 3)
    with pytest.raises(InvalidImageError, match="gdal_translate -co TILED=YES") as info:
        open_source(tmp_path / "a.jpg", max_pixels=100_000)
    assert "--max-pixels" in str(info.value) and "vips tiffsave" in str(info.value)
    # A TIFF stored as one big strip cannot be read in parts either.
    monkeypatch.setattr(source_module, "MAX_CHUNK_BYTES", 2**20)
    tifffile.imwrite(
        tmp_path / "s.tif", np.zeros((3000, 3000, 3), np.uint8), photometric="rgb", rowsperstrip=3000
    )
    with pytest.raises(InvalidImageError, match="TILED=YES"):
        open_source(tmp_path / "s.tif", max_pixels=1_000_000)
    with pytest.raises(InvalidImageError, match="--max-tiled-pixels"):
        open_source(tmp_path / "s.tif", max_pixels=10**8, max_tiled_pixels=1000)
    with pytest.raises(InvalidImageError, match="not an image"):
        (tmp_path / "t.jpg").write_bytes(b"hello")
        open_source(tmp_path / "t.jpg", max_pixels=10**6)


_SIDE = 30_000
_BLOCK = 512


def _block(bx: int, by: int) -> np.ndarray:
    texture = (np.arange(_BLOCK)[:, None] % 16 + np.arange(_BLOCK)[None, :] % 16).astype(np.uint8)
    return texture + np.uint8(30 * ((bx + 2 * by) % 7))


def _write_tiled(path: Path, side: int) -> Path:
    """A side x side tiled TIFF, written block by block by tifffile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = ((bx, by) for by in range(-(-side // _BLOCK)) for bx in range(-(-side // _BLOCK)))
    tifffile.imwrite(
        path,
        (_block(bx, by) for bx, by in blocks),
        shape=(side, side),
        dtype=np.uint8,
        tile=(_BLOCK, _BLOCK),
        compression="zlib",
        compressionargs={"level": 1},
        photometric="minisblack",
    )
    return path


@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30000 x 30000 tiled TIFF (900 MP, 10 MB on disk)."""
    return _write_tiled(tmp_path_factory.mktemp("big") / "big.tif", _SIDE)


#: The side of the TIFF a whole run tiles: 400 MP, above the default --max-pixels (250 MP) as the
#: 900 MP one is, so it can only be read by window; 729 tiles of 1008 keep the run short.
_RUN_SIDE = 20_000


#: Peak RSS growth allowed while reading windows of the 900 MP image (its pixels alone are 2.7 GB
#: as RGB): measured 7 MB over a 40 MB peak after the first window, 47 MB in all (interpreter and
#: imports included), while reading 155 windows of 1008 x 1008;
#: a 1008 x 1008 RGB window is 3 MB and the chunks it touches a few more.
RSS_BOUND_MB = 64

_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from batchseg.tiles.grid import plan_tiles
    from batchseg.tiles.windows import open_source
    def peak_mb():
        # VmHWM: this process's own peak (getrusage's maxrss keeps the parent's peak across exec).
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    source = open_source(sys.argv[1], max_pixels=250_000_000)
    plan = plan_tiles(source.width, source.height, 1008, 252)
    source.read(plan.tiles[0].window)
    before = peak_mb()
    tiles = [t for t in plan.tiles if t.row in (0, 17) or t.col == 39 or t.row == t.col]
    sums = {t.id: int(source.read(t.window)[..., 0].astype(np.int64).sum()) for t in tiles}
    print(json.dumps({"before": before, "after": peak_mb(), "tiles": len(tiles), "sums": sums}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_a_30000x30000_tiled_tiff_is_read_by_window_in_bounded_memory(big_tiff: Path) -> None:
    # A subprocess of its own: peak RSS of this test process would include everything before it.
    done = subprocess.run(
        [sys.executable, "-c", _READER, str(big_tiff)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(done.stdout)
    assert report["tiles"] > 100
    assert report["after"] - report["before"] < RSS_BOUND_MB, report
    assert report["after"] < 3 * RSS_BOUND_MB, report  # interpreter, numpy and tifffile included
    plan = plan_tiles(_SIDE, _SIDE, 1008, 252)
    for tile_id, total in report["sums"].items():
        x0, y0, x1, y1 = plan.by_id(tile_id).window
        expected = sum(
            int(
                _block(bx, by)[
                    max(y0, by * _BLOCK) - by * _BLOCK : min(y1, (by + 1) * _BLOCK) - by * _BLOCK,
                    max(x0, bx * _BLOCK) - bx * _BLOCK : min(x1, (bx + 1) * _BLOCK) - bx * _BLOCK,
                ]
                .astype(np.int64)
                .sum()
            )
            for by in range(y0 // _BLOCK, (y1 - 1) // _BLOCK + 1)
            for bx in range(x0 // _BLOCK, (x1 - 1) // _BLOCK + 1)
        )
        assert total == expected, tile_id


#: Peak RSS of a worker running the 20000 x 20000 TIFF's 729 tiles (threshold engine, sampled
#: every 0.1 s): measured 88 MiB (63 MiB for the 30000 x 30000 one's 1,600 tiles); the image's pixels
#: alone are 1.2 GB as RGB (400 MB as its one grey band) and its label map 800 MB as uint16.
#: (With the tiny SAM3 and torch loaded, benchmarks/tiles.py measured 804 MiB.)
RUN_RSS_BOUND_MIB = 200


def test_a_20000x20000_tiled_tiff_runs_in_a_worker_of_bounded_memory(tmp_path: Path) -> None:
    """``batchseg run`` on a 400 MP TIFF (729 tiles of 1008, two workers sharing them): the
    label map is written window by window and no worker's RSS comes near the image's size."""
    import psutil

    big = _write_tiled(tmp_path / "in" / "big.tif", _RUN_SIDE)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "batchseg", "run", str(big.parent), "--output", str(output),
        "--engine", "batchseg.engines.threshold:load", "--prompt", "red", "--tile", "1008", "--workers", "2",
    ]  # fmt: skip
    peak = 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        while proc.poll() is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):  # the workers
                    peak = max(peak, child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.1)
        log = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, log
    assert 0 < peak < RUN_RSS_BOUND_MIB * 2**20, peak / 2**20
    with tifffile.TiffFile(output / "masks" / "big.tif.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.shape == (_RUN_SIDE, _RUN_SIDE)


def test_a_rotated_tiff_is_not_read_by_window(tmp_path: Path) -> None:
    """Windows are in the upright image: a TIFF with an Orientation tag is decoded whole (turned
    upright as any image), within --max-pixels."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :] = 255
    tifffile.imwrite(
        tmp_path / "r.tif", pixels, photometric="rgb", tile=(16, 16), extratags=[(274, 3, 1, 3, True)]
    )
    source = open_source(tmp_path / "r.tif", max_pixels=10**6)
    assert isinstance(source, WholeSource)
    assert (source.read((0, 30, 60, 40)) == 255).all()  # rotated 180 degrees: the white band is at the bottom


def test_a_tiff_whose_pixels_cannot_be_decoded_is_an_input_problem(tmp_path: Path) -> None:
    """Zlib data under an LZW tag: tifffile cannot decode it; within --max-pixels Pillow is tried
    (decoded whole) and says the data is damaged, above it the message names the compression."""
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(32, 32), compression="zlib")
    data = path.read_bytes()
    entry = b"\x03\x01\x03\x00\x01\x00\x00\x00\x08\x00"  # Compression (259) = 8, DEFLATE
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, b"\x03\x01\x03\x00\x01\x00\x00\x00\x05\x00"))  # 5: LZW
    with pytest.raises(InvalidImageError, match="damaged"):
        open_source(path, max_pixels=10**6)
    with pytest.raises(InvalidImageError, match="LZW compression.*cannot be decoded.*TILED=YES"):
        open_source(path, max_pixels=1000)


def thunderscan_tiff(path: Path, grey4: np.ndarray) -> Path:
    """A 4-bit grey TIFF in ThunderScan compression (32809), which libtiff (so Pillow) decodes and
    tifffile does not: one RAW code (0xC0 | value) per pixel, one strip."""
    height, width = grey4.shape
    data = bytes(0xC0 | int(v) for v in grey4.ravel())
    tags = [(256, width), (257, height), (258, 4), (259, 32809), (262, 1), (273, 0), (277, 1), (278, height)]
    tags.append((279, len(data)))
    data_at = 8 + 2 + len(tags) * 12 + 4
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, data_at if tag == 273 else value) for tag, value in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + data)
    return path


def test_a_tiff_compression_tifffile_cannot_decode_is_decoded_whole(tmp_path: Path) -> None:
    grey4 = np.zeros((40, 60), np.uint8)
    grey4[5:20, 10:30] = 15
    path = thunderscan_tiff(tmp_path / "t.tif", grey4)
    assert source_module.upright_size(path) == (60, 40, False)  # planned as an image decoded whole
    source = open_source(path, max_pixels=10**6)
    assert isinstance(source, WholeSource)
    assert np.array_equal(source.read((0, 0, 60, 40))[..., 0], grey4 * 17)
    with pytest.raises(InvalidImageError, match="--max-pixels.*TILED=YES"):
        open_source(path, max_pixels=1000)


def test_16_bit_rgb_keeps_its_colours_with_one_range_for_all_channels(tmp_path: Path) -> None:
    pixels = np.zeros((100, 100, 3), np.uint16)
    pixels[..., 0] = 4000
    pixels[..., 2] = 2000
    tifffile.imwrite(tmp_path / "c.tif", pixels, photometric="rgb", tile=(32, 32))
    source = open_source(tmp_path / "c.tif", max_pixels=10**6)
    assert source.read((50, 50, 51, 51)).tolist() == [[[255, 0, 128]]]
    source.close()


def test_the_next_image_is_opened_beside_the_current_one_and_read_as_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WindowReader.prefetch``: the next image is decoded in a thread of its own, once; its
    windows are what a reader without prefetch gives; the image before stays open beside it (its
    last tiles may still be read while the next image's first are), the one before that is closed;
    a prefetched image that is not asked for is dropped (and closed) by the next prefetch or by
    ``close``; a broken file fails at ``read`` as it would have."""
    rng = np.random.default_rng(2)
    paths = []
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:200])
    opened: list[tuple[str, str]] = []
    closed: list[str] = []
    real_open = source_module.open_source

    def recording_open(path: str, **kwargs: int) -> source_module.ImageSource:
        opened.append((Path(path).name, threading.current_thread().name))
        source = real_open(path, **kwargs)
        real_close = source.close
        source.close = lambda: (closed.append(Path(path).name), real_close())  # type: ignore[method-assign]
        return source

    def left_open(name: str) -> int:
        return [n for n, _ in opened].count(name) - closed.count(name)

    monkeypatch.setattr(source_module, "open_source", recording_open)
    window = (50, 40, 250, 240)
    plain = source_module.WindowReader(10**8)
    expected = {p.name: plain.read(p, window)[0] for p in paths}
    opened.clear()
    closed.clear()
    reader = source_module.WindowReader(10**8)
    reader.read(paths[0], window)
    reader.prefetch(paths[1])
    reader.prefetch(paths[1])  # asked twice: opened once
    got = reader.read(paths[1], window)[0]
    assert np.array_equal(got, expected["b.jpg"])
    assert [name for name, _ in opened] == ["a.jpg", "b.jpg"]
    assert opened[1][1].startswith("batchseg-prefetch") and closed == []
    assert np.array_equal(reader.read(paths[0], window)[0], expected["a.jpg"])  # still open: not again
    reader.prefetch(paths[2])
    reader.prefetch(
        tmp_path / "broken.jpg"
    )  # c was not asked for: dropped (cancelled, or closed once opened)
    time.sleep(0.5)
    assert left_open("c.jpg") == 0
    with pytest.raises(InvalidImageError):
        reader.read(tmp_path / "broken.jpg", window)
    assert np.array_equal(reader.read(paths[2], window)[0], expected["c.jpg"])
    assert closed.count("b.jpg") == 1 and left_open("a.jpg") == 1  # b was asked for longest ago
    assert [name for name, _ in opened].count("a.jpg") == 1
    reader.prefetch(paths[1])
    reader.close()
    time.sleep(0.5)
    assert all(left_open(name) == 0 for name in ("a.jpg", "b.jpg", "c.jpg"))  # nothing kept after close()


#: Compressions Pillow writes a TIFF in (one strip per few rows), each read by window at --tile 512.
PILLOW_COMPRESSIONS = ("tiff_lzw", "group4", "jpeg", "packbits", "tiff_deflate")


def _compressed_folder(folder: Path) -> None:
    """One 1200 x 1200 picture (shapes across the seams of 512 tiles, plus noise far from them)
    saved in each compression; 1-bit for CCITT G4, where only the white shape is left."""
    folder.mkdir()
    picture = Image.new("RGB", (1200, 1200), (0, 0, 0))
    pen = ImageDraw.Draw(picture)
    pen.rectangle([300, 420, 900, 600], fill=(255, 0, 0))
    pen.ellipse([380, 700, 760, 1100], fill=(0, 0, 255))
    pen.ellipse([40, 40, 560, 330], outline=(255, 255, 255), width=30)
    for k in range(40):  # small patches: many objects, some cut by seams
        x, y = 960 + (k % 5) * 45, 40 + (k // 5) * 140
        pen.rectangle([x, y, x + 20 + k % 7, y + 30], fill=(255, 0, 0) if k % 2 else (255, 255, 255))
    for compression in PILLOW_COMPRESSIONS:
        image = picture.convert("1", dither=Image.Dither.NONE) if compression == "group4" else picture
        image.save(folder / f"{compression}.tif", compression=compression)
    grey4 = (np.asarray(picture.convert("L")) // 17).astype(np.uint8)
    thunderscan_tiff(folder / "thunderscan.tif", grey4)


def _run_detections(folder: Path, output: Path, tile: str) -> dict[str, list[tuple[object, ...]]]:
    command = [
        sys.executable, "-m", "batchseg", "run", str(folder), "--output", str(output), "--tile", tile,
        "--engine", "batchseg.engines.threshold:load", "--workers", "1", "--max-detections", "10000",
        "--prompt", "red", "--prompt", "blue", "--prompt", "white",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    images, detections = read_manifests(output)
    assert {row["path"]: row["status"] for row in images} == {row["path"]: "ok" for row in images}
    found: dict[str, list[tuple[object, ...]]] = {row["path"]: [] for row in images}
    for d in detections:
        box = (d["box_x0"], d["box_y0"], d["box_x1"], d["box_y1"])
        found[d["path"]].append((d["prompt"], box, d["area_px"], d["mask_rle"]))
    return {path: sorted(dets, key=str) for path, dets in found.items()}


def test_every_tiff_compression_pillow_writes_runs_tiled_as_whole(tmp_path: Path) -> None:
    """``batchseg run --tile 512`` on TIFFs that Pillow saved in LZW, CCITT G4, JPEG, PackBits and
    Deflate (read by window through tifffile's codecs) and in ThunderScan (which tifffile cannot
    decode: read whole): every image ok, with the detections of the same file at --tile off."""
    folder = tmp_path / "in"
    _compressed_folder(folder)
    for compression in PILLOW_COMPRESSIONS:
        source = open_source(folder / f"{compression}.tif", max_pixels=10)
        assert isinstance(source, TiffSource), compression  # by window: --max-pixels does not apply
        source.close()
    tiled = _run_detections(folder, tmp_path / "tiled", "512")
    whole = _run_detections(folder, tmp_path / "whole", "off")
    assert sorted(tiled) == sorted(f"{c}.tif" for c in (*PILLOW_COMPRESSIONS, "thunderscan"))
    for path in tiled:
        assert len(tiled[path]) >= 20, path
        assert tiled[path] == whole[path], path
