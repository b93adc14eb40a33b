"""Tiling through ``python -m batchseg run``: drawn shapes come out once each, exact, across seams.

The colour-threshold engine's masks are exactly the drawn pixels inside each tile, so every shape
(on a seam, on the corner of four tiles, larger than a tile, on the border, a ring with a hole)
must be one detection with IoU >= 0.99 and nothing else may be found. Also: a tiled TIFF read by
window, a poison tile, an output folder made before tiling, and the tiny SAM3 end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from _runs import LiveRun, start_run, wait_until
from _storage import make_config
from _tile_shapes import Shape
from PIL import Image

from batchseg.errors import ConfigMismatchError
from batchseg.records import Detection
from batchseg.runner import run
from batchseg.store.checkpoint import Checkpoint
from batchseg.tiles.grid import TilePlan, plan_tiles
from batchseg.tiles.progress import TileProgress
from batchseg.tiles.sparse import SparseMask

# Every run a test here starts (its workers and merge helpers too) is gone when the test ends.
pytestmark = pytest.mark.usefixtures("no_process_left")

TESTS = Path(__file__).resolve().parent
THRESHOLD = "batchseg.engines.threshold:load"

#: 6000 x 4000: seams of --tile 1008 (step 756) at x = 756, 1008, 1512, ...; of --tile 700
#: --tile-overlap 200 (step 500) at x = 500, 700, 1000, ...
SHAPES = [
    Shape("disc", 1008, 500, 60, 60),  # on a seam
    Shape("disc", 1008, 1008, 90, 90),  # on the corner of four tiles
    Shape("rect", 3300, 2600, 700, 600),  # larger than a tile
    Shape("disc", 0, 2000, 80, 80),  # cut by the image border
    Shape("rect", 5950, 3950, 50, 50),  # in the bottom-right corner of the image
    Shape("ring", 2000, 1000, 250, 250, 0.5),  # a ring with a hole, across seams
    Shape("ring", 5000, 1500, 600, 600, 0.75),  # a ring larger than a tile
    Shape("disc", 200, 200, 20, 20),  # inside one tile
    Shape("ellipse", 1500, 3500, 1200, 40),  # long and thin, across many tiles
]


def draw(shapes: list[Shape], width: int, height: int) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    for shape in shapes:
        x0, y0, x1, y1 = shape.bbox(width, height)
        pixels[y0:y1, x0:x1][shape.raster((x0, y0, x1, y1))] = (255, 0, 0)
    return pixels


def batchseg(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "batchseg", *(str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300, check=False)


def start_batchseg(args: list[str | Path], tmp_path: Path, hooks: dict[str, str]) -> LiveRun:
    """``batchseg ARGS`` started in the background (to be killed), the test engines importable
    and their ``hooks`` (``BATCHSEG_TEST_*``) set."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return start_run(args, tmp_path / "console.txt", cwd=tmp_path, env={"PYTHONPATH": path, **hooks})


def one_disc(tmp_path: Path) -> Path:
    """A folder with ``a.png``: 2500 x 1800, one red disc on the seam of the first two tiles of 1008."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(draw([Shape("disc", 1200, 500, 90, 90)], 2500, 1800)).save(folder / "a.png")
    return folder


def manifests(output: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    images = {row["path"]: row for row in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}
    return images, pq.read_table(output / "manifest" / "detections.parquet").to_pylist()


def assert_exact(shapes: list[Shape], detections: list[dict[str, Any]], width: int, height: int) -> None:
    """Each shape is exactly one detection with IoU >= 0.99; no detection is left over."""
    masks = [SparseMask.from_rle(d["mask_rle"], (0, 0, width, height), height) for d in detections]
    unmatched = set(range(len(detections)))
    for shape in shapes:
        drawn = shape.sparse(width, height)
        ious = []
        for mask in masks:
            shared = drawn.intersection_area(mask)
            ious.append(shared / (drawn.area + mask.area - shared))
        best = int(np.argmax(ious))
        assert ious[best] >= 0.99, f"{shape}: best IoU {ious[best]:.4f}"
        assert sum(iou > 0.01 for iou in ious) == 1, f"{shape} is found more than once: {ious}"
        unmatched.discard(best)
    assert len(detections) == len(shapes) and not unmatched, f"extra detections: {sorted(unmatched)}"


def assert_label_map_matches(output: Path, row: dict[str, Any], detections: list[dict[str, Any]]) -> None:
    """The .tif holds labels 1..N, each with the area its detections.parquet row states."""
    assert row["mask_path"].endswith(".tif")
    labels = tifffile.imread(output / row["mask_path"])
    assert labels.shape == (row["height"], row["width"])
    areas = np.bincount(labels.ravel(), minlength=len(detections) + 1)
    assert len(areas) == len(detections) + 1
    assert sorted(d["index"] for d in detections) == list(range(1, len(detections) + 1))
    for d in detections:
        assert areas[d["index"]] == d["area_px"], d["index"]


@pytest.fixture(scope="module")
def seams_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seams")
    Image.fromarray(draw(SHAPES, 6000, 4000)).save(folder / "big.png", compress_level=1)
    Image.fromarray(draw([Shape("disc", 100, 80, 30, 30)], 300, 200)).save(folder / "small.png")
    return folder


@pytest.mark.parametrize("tiling", [["--tile", "1008"], ["--tile", "700", "--tile-overlap", "200"]])
def test_every_shape_is_one_exact_detection_across_seams(
    seams_folder: Path, tmp_path: Path, tiling: list[str]
) -> None:
    output = tmp_path / "out"
    done = batchseg(
        "run", seams_folder, "--output", output, "--engine", THRESHOLD, "--prompt", "red", *tiling
    )
    assert done.returncode == 0, done.stdout + done.stderr
    images, detections = manifests(output)
    big = [d for d in detections if d["path"] == "big.png"]
    assert images["big.png"]["status"] == "ok" and images["big.png"]["n_detections"] == len(SHAPES)
    assert_exact(SHAPES, big, 6000, 4000)
    assert_label_map_matches(output, images["big.png"], big)
    by_tiles = sorted(d["tiles"] for d in big)
    assert by_tiles[0] == 1 and by_tiles[-1] >= 9  # the big ring and rectangle span many tiles
    # An image no larger than a tile is processed whole: a PNG label map, one tile per detection.
    assert images["small.png"]["mask_path"] == "masks/small.png.png"
    assert [d["tiles"] for d in detections if d["path"] == "small.png"] == [1]


def test_the_tiles_of_an_image_spread_over_every_worker(seams_folder: Path, tmp_path: Path) -> None:
    """--workers 2: both workers run tiles of the big image (each tile once), and the merged result
    is exactly the one-worker result."""
    pids = tmp_path / "pids.txt"
    common = ["--engine", "poison_engine:load", "--prompt", "red", "--tile", "1008"]
    two = batchseg(
        "run", seams_folder, "--output", tmp_path / "two", *common, "--workers", "2",
        env={"BATCHSEG_TEST_PIDS": str(pids)},
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    one = batchseg("run", seams_folder, "--output", tmp_path / "one", *common, "--workers", "1")
    assert one.returncode == 0, one.stdout + one.stderr
    windows = [line.rsplit(",", 1) for line in pids.read_text().split()]
    assert len(windows) == len({w for w, _ in windows}) == 40  # 8 x 5 tiles, each run once
    assert len({pid for _, pid in windows}) == 2
    images, detections = manifests(tmp_path / "two")
    big = [d for d in detections if d["path"] == "big.png"]
    assert images["big.png"]["status"] == "ok" and images["big.png"]["attempts"] == 1
    assert_exact(SHAPES, big, 6000, 4000)
    assert_label_map_matches(tmp_path / "two", images["big.png"], big)
    drop = ("run_id",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in detections] == [
        {k: v for k, v in r.items() if k not in drop} for r in manifests(tmp_path / "one")[1]
    ]
    assert not (tmp_path / "two" / "tiles-in-progress").exists()


def test_auto_processes_whole_images_for_an_engine_without_a_model_input(
    seams_folder: Path, tmp_path: Path
) -> None:
    """The threshold engine states no model input: ``--tile auto`` (the default) never tiles."""
    output = tmp_path / "out"
    done = batchseg(
        "run",
        seams_folder,
        "--output",
        output,
        "--engine",
        THRESHOLD,
        "--prompt",
        "red",
        "--include",
        "small.png",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    images, _ = manifests(output)
    assert images["small.png"]["mask_path"] == "masks/small.png.png"
    with Checkpoint.open_existing(output, read_only=True) as cp:
        assert cp.stored_config()["tile"] == "auto"


def test_a_tiled_tiff_is_read_by_window_and_a_png_too_big_to_decode_is_refused(tmp_path: Path) -> None:
    """--max-pixels below the image's size: only reading by window can process the TIFF; the PNG
    of the same size, which must be decoded whole, gets invalid_input naming a conversion."""
    folder = tmp_path / "in"
    folder.mkdir()
    shapes = [
        Shape("disc", 1008, 1008, 90, 90),
        Shape("rect", 2000, 1300, 500, 400),
        Shape("disc", 2950, 10, 60, 60),
    ]
    pixels = draw(shapes, 3000, 2000)
    tifffile.imwrite(folder / "ortho.tif", pixels, tile=(256, 256), compression="zlib", photometric="rgb")
    Image.fromarray(pixels).save(folder / "same.png", compress_level=1)
    output = tmp_path / "out"
    done = batchseg(
        "run", folder, "--output", output, "--engine", THRESHOLD, "--prompt", "red", "--tile", "1008",
        "--max-pixels", "2000000", "--max-attempts", "1",
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    images, detections = manifests(output)
    assert images["ortho.tif"]["status"] == "ok"
    tiff = [d for d in detections if d["path"] == "ortho.tif"]
    assert_exact(shapes, tiff, 3000, 2000)
    assert_label_map_matches(output, images["ortho.tif"], tiff)
    assert images["same.png"]["status"] == "invalid_input"
    assert "--max-pixels" in images["same.png"]["error_message"]
    assert "gdal_translate" in images["same.png"]["error_message"]


def test_a_poison_tile_fails_its_image_naming_the_tile(tmp_path: Path) -> None:
    folder = one_disc(tmp_path)
    Image.fromarray(draw([Shape("disc", 100, 80, 30, 30)], 300, 200)).save(folder / "small.png")
    output = tmp_path / "out"
    done = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "1008", "--max-attempts", "1",
        env={"BATCHSEG_TEST_POISON": "756,0"},
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    images, detections = manifests(output)
    row = images["a.png"]
    assert row["status"] == "error" and row["error_type"] == "RuntimeError"
    assert row["error_message"].startswith("tile r000c001 (window x 756-1764, y 0-1008): poisoned window")
    assert "RuntimeError" in row["traceback"] and row["mask_path"] is None
    assert not (output / "masks" / "a.png.tif").exists()
    assert not [d for d in detections if d["path"] == "a.png"]
    assert images["small.png"]["status"] == "ok"  # the other image of the task is not touched
    # The tiles that finished are kept; `batchseg retry` (no poison now) runs only the others.
    kept = {
        i
        for f in (output / "tiles-in-progress" / "a.png").glob("*.json")
        for i in json.loads(f.read_text())["tiles"]
    }
    assert len(kept) == 7 and "r000c001" not in kept  # 9 tiles; the batch of 8 held the poison
    windows = tmp_path / "windows.txt"
    again = batchseg("retry", output, env={"BATCHSEG_TEST_WINDOWS": str(windows)})
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(windows.read_text().split()) == ["1492,792", "756,0"]  # r000c001 and r002c002
    images, detections = manifests(output)
    assert images["a.png"]["status"] == "ok" and len([d for d in detections if d["path"] == "a.png"]) == 1


def test_tiled_images_run_as_one_stream_and_a_poison_tile_fails_only_its_image(tmp_path: Path) -> None:
    """Three tiled images of one task (9, 12 and 9 tiles, batches of 6): the engine gets the last
    tiles of one image with the first of the next in one batch (its pipeline carries on), each
    image's result is made as soon as its last tile is in (before the batch holding it ends), and a
    poisoned tile of the middle image fails that image alone, its tiles not yet run dropped."""
    folder = one_disc(tmp_path)
    shutil.copy(folder / "a.png", folder / "c.png")
    # Wider than a.png: its last column of tiles starts at x 1592, a window the others do not have.
    Image.fromarray(draw([Shape("disc", 1200, 500, 90, 90)], 2600, 1800)).save(folder / "b.png")
    output, batches, windows = tmp_path / "out", tmp_path / "batches.jsonl", tmp_path / "windows.txt"
    done = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "1008", "--max-attempts", "1",
        env={"BATCHSEG_TEST_POISON": "1512,756", "BATCHSEG_TEST_BATCHES": str(batches),
             "BATCHSEG_TEST_WINDOWS": str(windows), "BATCHSEG_TEST_TASK_SIZE": "6"},
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    calls = [json.loads(line) for line in batches.read_text().splitlines()]
    stream = [c for c in calls if len(c["paths"]) > 1]  # the poisoned batch's tiles then run alone
    assert [sorted(set(c["paths"])) for c in stream[:2]] == [["a.png"], ["a.png", "b.png"]]
    images, detections = manifests(output)
    assert images["a.png"]["status"] == images["c.png"]["status"] == "ok"
    assert images["a.png"]["finished_at"].timestamp() < stream[1]["end"]  # told within that batch
    row = images["b.png"]
    assert row["status"] == "error"
    assert row["error_message"].startswith("tile r001c002 (window x 1512-2520, y 756-1764): poisoned window")
    assert len(windows.read_text().split()) < 27  # b's tiles after the poisoned batch did not run
    for name in ("a.png", "c.png"):
        assert len([d for d in detections if d["path"] == name]) == 1
    assert not [d for d in detections if d["path"] == "b.png"]


def test_a_run_killed_mid_stream_keeps_the_image_it_finished_and_resumes_the_next(tmp_path: Path) -> None:
    """Two tiled images streamed in batches of 6 (9 tiles each): the run is killed once the
    second batch (a's last three tiles, b's first three) is done. a was finished and recorded
    within that batch; the resumed run does not touch it, and runs only b's six other tiles."""
    folder = one_disc(tmp_path)
    shutil.copy(folder / "a.png", folder / "b.png")
    output, windows, batches = tmp_path / "out", tmp_path / "windows.txt", tmp_path / "batches.jsonl"
    args = ["run", folder, "--engine", "poison_engine:load", "--prompt", "red", "--tile", "1008"]
    live = start_batchseg(
        [*args, "--output", output],
        tmp_path,
        {
            "BATCHSEG_TEST_WINDOWS": str(windows),
            "BATCHSEG_TEST_TASK_SIZE": "6",
            "BATCHSEG_TEST_KEEP_EACH": "1",
            "BATCHSEG_TEST_STALL_AFTER": "12",  # the first tile of the third batch hangs
        },
    )
    kept = output / "tiles-in-progress" / "b.png"

    def a_recorded_and_b_kept() -> bool:
        try:
            with Checkpoint.open_existing(output, read_only=True) as cp:
                settled = cp.is_settled("a.png")
        except Exception:  # noqa: BLE001 - not created yet, or busy: ask again
            return False
        return settled and len(_kept_windows(kept, plan_tiles(2500, 1800, 1008, 252))) == 3

    assert wait_until(a_recorded_and_b_kept, 60, while_alive=live), live.output()
    live.kill()
    assert len(windows.read_text().split()) == 12
    again = batchseg(*args, "--output", output, env={"BATCHSEG_TEST_BATCHES": str(batches)})
    assert again.returncode == 0, again.stdout + again.stderr
    ran = [path for line in batches.read_text().splitlines() for path in json.loads(line)["paths"]]
    assert ran == ["b.png"] * 6
    images, detections = manifests(output)
    assert images["a.png"]["status"] == images["b.png"]["status"] == "ok"
    for name in ("a.png", "b.png"):
        found = [d for d in detections if d["path"] == name]
        assert_exact([Shape("disc", 1200, 500, 90, 90)], found, 2500, 1800)


def test_a_merge_that_fails_fails_its_image_and_the_next_attempt_runs_every_tile(tmp_path: Path) -> None:
    """A kept tile whose mask cannot be read (a damaged file) breaks the image's merge in the merge
    helper: the image gets ``error`` saying so, the run goes on, and its kept tiles are dropped so
    that the next attempt runs every tile instead of failing the same way forever."""
    folder = one_disc(tmp_path)
    output = tmp_path / "out"
    first = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "1008", "--max-attempts", "1", env={"BATCHSEG_TEST_POISON": "756,0"},
    )  # fmt: skip
    assert first.returncode == 3, first.stdout + first.stderr
    kept = sorted((output / "tiles-in-progress" / "a.png").glob("*.json"))
    data = json.loads(kept[0].read_text())
    tile = next(iter(data["tiles"]))
    data["tiles"][tile].append(["red", 1, 0.9, [0, 0, 1, 1], 1, "0?"])  # counts of no 1008x1008 mask
    kept[0].write_text(json.dumps(data))
    broken = batchseg("retry", output)
    assert broken.returncode == 3, broken.stdout + broken.stderr
    row = manifests(output)[0]["a.png"]
    assert row["status"] == "error" and "merging failed: ValueError: RLE counts" in row["error_message"]
    assert not (output / "tiles-in-progress" / "a.png").exists()
    windows = tmp_path / "windows.txt"
    again = batchseg("retry", output, env={"BATCHSEG_TEST_WINDOWS": str(windows)})
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(windows.read_text().split()) == 9  # every tile again
    images, detections = manifests(output)
    assert images["a.png"]["status"] == "ok" and len([d for d in detections if d["path"] == "a.png"]) == 1


def test_a_spread_poison_tile_is_retried_alone_on_another_worker_then_fails_its_image(tmp_path: Path) -> None:
    folder = one_disc(tmp_path)
    Image.fromarray(draw([Shape("disc", 100, 80, 30, 30)], 300, 200)).save(folder / "small.png")
    output, pids = tmp_path / "out", tmp_path / "pids.txt"
    done = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "1008", "--workers", "2", "--max-attempts", "2",
        env={"BATCHSEG_TEST_POISON": "756,0", "BATCHSEG_TEST_PIDS": str(pids)},
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    images, detections = manifests(output)
    row = images["a.png"]
    assert row["status"] == "error" and row["attempts"] == 2 and row["mask_path"] is None
    assert row["error_message"].startswith("tile r000c001 (window x 756-1764, y 0-1008): poisoned window")
    assert images["small.png"]["status"] == "ok" and not [d for d in detections if d["path"] == "a.png"]
    log = next((output / "logs").glob("*.log")).read_text()
    assert "a.png tile r000c001: attempt 1 of 2 failed with RuntimeError" in log
    # Guaranteed: no tile runs twice (no worker died, so each ran in one task, once) and every tile
    # that ran is kept. Not guaranteed: that all 8 others ran. The retry goes before the image's
    # queued tiles, so when it fails for good first, the tiles still queued are not run (README).
    ran = [line.rsplit(",", 1)[0] for line in pids.read_text().split()]
    assert len(ran) == len(set(ran)) <= 8 and "756,0" not in ran, ran
    plan = plan_tiles(2500, 1800, 1008, 252)
    kept = {
        i
        for f in (output / "tiles-in-progress" / "a.png").glob("*.json")
        for i in json.loads(f.read_text())["tiles"]
    }
    assert {f"{x},{y}" for x, y, _, _ in (plan.by_id(i).window for i in kept)} == set(ran)
    # `batchseg retry` (no poison now) runs the rest: every tile of the image ran exactly once.
    windows = tmp_path / "windows.txt"
    again = batchseg("retry", output, env={"BATCHSEG_TEST_WINDOWS": str(windows)})
    assert again.returncode == 0, again.stdout + again.stderr
    rest = windows.read_text().split()
    assert len(rest) == len(set(rest)) and sorted([*ran, *rest]) == sorted(_windows(plan)), rest
    images, detections = manifests(output)
    assert images["a.png"]["status"] == "ok" and len([d for d in detections if d["path"] == "a.png"]) == 1


def test_a_tile_kept_before_its_worker_died_is_not_run_again(tmp_path: Path) -> None:
    """A worker SIGKILLed in a task of spread tiles after it kept the first (kept on being
    reported): the pool heard of none of the task's tiles and runs each again alone; the one on
    disk is done and does not run again, and the merge counts it once (the image is exact)."""
    folder = one_disc(tmp_path)
    output, windows, crash = tmp_path / "out", tmp_path / "windows.txt", tmp_path / "crash.txt"
    done = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "1008", "--workers", "2",
        env={"BATCHSEG_TEST_WINDOWS": str(windows), "BATCHSEG_TEST_KEEP_EACH": "1",
             "BATCHSEG_TEST_CRASH_ONCE": str(crash)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    log = next((output / "logs").glob("*.log")).read_text()
    assert "was killed by signal 9" in log and "running the" in log and "again one at a time" in log
    ran = windows.read_text().split()
    assert crash.read_text().strip() in ran  # the tile kept before the kill
    assert sorted(ran) == sorted(_windows(plan_tiles(2500, 1800, 1008, 252))), ran  # each once
    images, detections = manifests(output)
    assert images["a.png"]["status"] == "ok" and images["a.png"]["attempts"] == 1
    assert_exact([Shape("disc", 1200, 500, 90, 90)], detections, 2500, 1800)
    assert_label_map_matches(output, images["a.png"], detections)
    assert not (output / "tiles-in-progress").exists()


def test_the_tiles_kept_are_read_again_only_from_files_new_or_changed(tmp_path: Path) -> None:
    """``TileProgress.kept_ids``: the ids of the files with the image's key; a file read once is
    not read again while unchanged, a changed one is, a removed one's tiles are forgotten."""
    progress = TileProgress(tmp_path / "a.png", {"size_bytes": 1})
    known: dict[str, Any] = {}
    assert progress.kept_ids(known) == set() and not known  # no folder yet
    progress.save("r000c000", {"r000c000": [], "r000c001": []})
    TileProgress(progress.folder, {"size_bytes": 2}).save("r001c000", {"r001c000": []})  # old input
    assert progress.kept_ids(known) == {"r000c000", "r000c001"}
    first = progress.folder / "batch-r000c000.json"
    stat = first.stat()  # other ids of the same length, the mtime put back: seen as unchanged
    first.write_text(first.read_text().replace("r000c001", "r009c009"))
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert progress.kept_ids(known) == {"r000c000", "r000c001"}  # not read again
    progress.save("r001c000", {"r001c000": [], "r001c001": []})  # the old input's file replaced
    assert progress.kept_ids(known) == {"r000c000", "r000c001", "r001c000", "r001c001"}
    (progress.folder / "batch-r000c000.json").unlink()
    assert progress.kept_ids(known) == {"r001c000", "r001c001"}
    (progress.folder / "batch-r002c000.json").write_text("[1]")  # damaged: its tiles run again
    assert progress.kept_ids(known) == {"r001c000", "r001c001"} == set(progress.load())


def test_kept_tiles_keep_the_prompts_folded_into_their_detections(tmp_path: Path) -> None:
    """A kept tile's detections come back with their ``folded`` prompts (--suppress-iou), and a
    file written before that field existed (six fields a row) still reads, with none."""
    progress = TileProgress(tmp_path / "a.png", {"size_bytes": 1})
    kept = Detection("roof", 1, 0.9, (0.0, 0.0, 4.0, 4.0), 16, "0g0", folded=("rooftop",))
    progress.save("r000c000", {"r000c000": [kept]})
    older = {"key": progress.key, "tiles": {"r000c001": [["tree", 1, 0.5, [1, 1, 2, 2], 1, "01"]]}}
    (progress.folder / "batch-r000c001.json").write_text(json.dumps(older))
    loaded = progress.load()
    assert loaded["r000c000"] == [kept]
    assert loaded["r000c001"] == [Detection("tree", 1, 0.5, (1, 1, 2, 2), 1, "01")]


def test_the_next_tiled_image_is_prefetched_while_the_current_one_runs(tmp_path: Path) -> None:
    """One worker, four images of one task: once the tiles of a tiled image run, the engine hears
    which tiled image comes next (never the small one run whole, never with nothing after), and
    opens it in its prefetch thread, once, before its tiles ask for it; the results are those of
    the images run alone."""
    folder = one_disc(tmp_path)
    shutil.copy(folder / "a.png", folder / "b.png")
    shutil.copy(folder / "a.png", folder / "c.png")
    Image.fromarray(draw([Shape("disc", 100, 80, 30, 30)], 300, 200)).save(folder / "d.png")
    output, log = tmp_path / "out", tmp_path / "prefetch.txt"
    done = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "1008", env={"BATCHSEG_TEST_PREFETCH": str(log)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = log.read_text().splitlines()
    assert [line for line in lines if " " not in line] == ["b.png", "c.png"]  # the hints
    opened = dict(line.split(" ", 1) for line in lines if " " in line)
    assert not opened["a.png"].startswith("batchseg-prefetch")  # the first: read by its tile
    assert opened["b.png"].startswith("batchseg-prefetch") and opened["c.png"].startswith("batchseg-prefetch")
    assert len([line for line in lines if line.startswith(("b.png ", "c.png "))]) == 2  # each opened once
    images, detections = manifests(output)
    assert {row["status"] for row in images.values()} == {"ok"}
    found = {p: [d for d in detections if d["path"] == p] for p in ("a.png", "b.png", "c.png")}
    assert len(found["a.png"]) == 1
    drop = ("path", "run_id")
    assert [{k: v for k, v in d.items() if k not in drop} for d in found["a.png"]] == [
        {k: v for k, v in d.items() if k not in drop} for d in found["c.png"]
    ]


def test_the_watchdog_budget_is_per_batch_of_tiles_not_per_image(tmp_path: Path) -> None:
    """30 tiles of 0.06 s each take longer than --timeout 1, which bounds a batch, not the image."""
    folder = one_disc(tmp_path)
    output = tmp_path / "out"
    done = batchseg(
        "run", folder, "--output", output, "--engine", "poison_engine:load", "--prompt", "red",
        "--tile", "500", "--tile-overlap", "100", "--timeout", "1", "--max-attempts", "1",
        env={"BATCHSEG_TEST_SLEEP": "0.06"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    images, _ = manifests(output)
    assert images["a.png"]["status"] == "ok" and images["a.png"]["duration_s"] > 1.5


def test_an_overlap_past_half_a_tile_ends_the_run_before_any_image(
    seams_folder: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    done = batchseg(
        "run", seams_folder, "--output", output, "--engine", THRESHOLD, "--prompt", "red",
        "--tile", "1008", "--tile-overlap", "600",
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr  # a bad value: refused before any write
    assert "--tile-overlap must be from 2 to half the tile side (504)" in done.stdout + done.stderr
    assert not output.exists()


def test_an_output_folder_made_before_tiling_resumes_with_tiling_off(tmp_path: Path) -> None:
    """tests/data/run-made-by-0.1.0 has no ``tile`` in its fingerprint: without --tile it resumes
    (off, with a note in the log); --tile auto given explicitly is a change of settings."""
    output = tmp_path / "old"
    shutil.copytree(TESTS / "data" / "run-made-by-0.1.0", output)
    empty = tmp_path / "aerial"
    empty.mkdir()
    config = make_config(input=empty, output=output, tile=None)
    with pytest.raises(ConfigMismatchError, match="tile"):
        run(config.with_changes(tile="auto"))
    summary = run(config)
    assert summary.exit_code == 0
    with Checkpoint.open_existing(output, read_only=True) as cp:
        assert cp.stored_config()["tile"] == "off"
        assert cp.counts()["missing"] == 2  # the folder's images are gone: nothing ran
    assert summary.log_path is not None
    assert "--tile not given: off" in summary.log_path.read_text()
    with sqlite3.connect(output / "checkpoint.sqlite") as db:  # the column added on opening
        assert db.execute("SELECT tiles FROM detections").fetchall() == [(1,)]
    assert [d["tiles"] for d in manifests(output)[1]] == [1]
    fresh = run(config.with_changes(output=tmp_path / "new"))
    assert fresh.exit_code == 0
    with Checkpoint.open_existing(tmp_path / "new", read_only=True) as cp:
        assert cp.stored_config()["tile"] == "auto"


def test_the_tiny_sam3_runs_tiles_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    """Masks of a random model mean nothing; the structure must be right: one image row, a .tif
    label map whose labels and areas are those of detections.parquet, boxes inside the image."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (1800, 2500, 3), np.uint8)
    Image.fromarray(pixels).save(folder / "scene.png", compress_level=1)
    output = tmp_path / "out"
    done = batchseg(
        "run", folder, "--model", tiny_model, "--output", output, "--device", "cpu", "--prompt", "roof",
        "--threshold", "0", "--max-detections", "2", "--workers", "1", "--tile", "1008",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    images, detections = manifests(output)
    row = images["scene.png"]
    assert row["status"] == "ok" and (row["width"], row["height"]) == (2500, 1800)
    assert row["n_detections"] == len(detections) > 0
    assert_label_map_matches(output, row, detections)
    for d in detections:
        assert 0 <= d["box_x0"] < d["box_x1"] <= 2500 and 0 <= d["box_y0"] < d["box_y1"] <= 1800
        assert d["mask_height"] == 1800 and d["mask_width"] == 2500 and d["tiles"] >= 1


WINDOW_SCRIPT = """
import json, sys
from pathlib import Path
from batchseg.config import RunConfig
from batchseg.engines.sam3.engine import load_engine
from batchseg.records import Item
from batchseg.worker.contract import EngineSpec
from batchseg.worker.writer import OutputWriter, WritingBeat

folder, model, output = (Path(a) for a in sys.argv[1:4])
config = RunConfig(input=folder, prompts=("roof",), model=str(model), output=output, device="cpu",
                   threshold=0.0, max_detections=3, tile="off")
engine = load_engine(EngineSpec(config), 0)
items = [Item("scene.png", 1, 1, window=(300, 200, 700, 520)), Item("crop.png", 1, 1)]
writing = WritingBeat(OutputWriter(config, engine.capabilities.device), items, lambda *a, **k: None)
results = writing.results(engine.process(items, writing))
engine.close()
print(json.dumps([{"status": str(r.status), "size": [r.width, r.height], "mask": r.mask_path,
                   "dets": [[d.prompt, d.index, d.score, list(d.box), d.area_px, d.mask_rle]
                            for d in r.detections]} for r in results]))
"""


def test_sam3_on_a_window_is_sam3_on_the_crop_in_the_image_frame(tiny_model: Path, tmp_path: Path) -> None:
    """A windowed item gives the crop's detections with boxes moved by the window's origin, the
    whole image's size, and no label map."""
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = np.random.default_rng(1).integers(0, 255, (900, 1200, 3), np.uint8)
    Image.fromarray(pixels).save(folder / "scene.png")
    Image.fromarray(pixels[200:520, 300:700]).save(folder / "crop.png")
    done = subprocess.run(
        [sys.executable, "-c", WINDOW_SCRIPT, str(folder), str(tiny_model), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    window, crop = json.loads(done.stdout.strip().splitlines()[-1])
    assert window["status"] == crop["status"] == "ok"
    assert window["size"] == [1200, 900] and crop["size"] == [400, 320]
    assert window["mask"] is None and crop["mask"] == "masks/crop.png.png"
    assert not (tmp_path / "out" / "masks" / "scene.png.png").exists()
    assert len(window["dets"]) == len(crop["dets"]) > 0
    for (p, i, s, box, area, counts), (p2, i2, s2, box2, area2, counts2) in zip(
        window["dets"], crop["dets"], strict=True
    ):
        assert (p, i, area, counts) == (p2, i2, area2, counts2) and s == pytest.approx(s2)
        assert box == pytest.approx([box2[0] + 300, box2[1] + 200, box2[2] + 300, box2[3] + 200])


@pytest.mark.parametrize(("workers", "task_size"), [("1", ""), ("2", ""), ("1", "64")])
def test_a_killed_run_resumes_a_half_done_image_without_redoing_finished_tiles(
    tmp_path: Path, workers: str, task_size: str
) -> None:
    """SIGKILL of the parent once some batches of tiles are kept: the resumed run does none of
    them again, and its result equals an uninterrupted run's. With two workers the tiles are
    spread over both, and each keeps its own batches. With one batch of all 30 tiles (3 s), the
    tiles finished are kept while it runs (every ``KEEP_EVERY_S``), not only at its end.

    Counted in tiles, not files: a file holds what was finished since the last keep, and keeps
    come at each batch's end and every ``KEEP_EVERY_S`` within it (a slow machine writes more,
    smaller files). The engine stalls after 20 tiles, so the run is killed at a known point."""
    folder = tmp_path / "in"
    folder.mkdir()
    shapes = [
        Shape("disc", 450, 420, 70, 70),
        Shape("rect", 1300, 900, 500, 300),
        Shape("ring", 2100, 600, 200, 200, 0.5),
    ]
    Image.fromarray(draw(shapes, 2500, 1800)).save(folder / "a.png")
    windows = tmp_path / "windows.txt"
    args = [
        "run",
        folder,
        "--engine",
        "poison_engine:load",
        "--prompt",
        "red",
        "--tile",
        "500",
        "--tile-overlap",
        "100",
        "--workers",
        workers,
    ]
    output = tmp_path / "out"
    kept = output / "tiles-in-progress" / "a.png"
    live = start_batchseg(
        [*args, "--output", output],
        tmp_path,
        {
            "BATCHSEG_TEST_WINDOWS": str(windows),
            "BATCHSEG_TEST_SLEEP": "0.1",
            "BATCHSEG_TEST_TASK_SIZE": task_size,
            "BATCHSEG_TEST_STALL_AFTER": "20",
        },
    )
    # Of the 20 tiles run before the stall: one worker keeps its first two batches of 8 at their
    # ends; two workers share the tiles out in tasks of 8 and keep each at its end; one batch of
    # 64 keeps, a second in, the 10 or more tiles finished by then (0.1 s a tile at the least).
    least = 16 if workers == "1" and not task_size else 10 if task_size else 2
    assert wait_until(lambda: len(_kept_windows(kept)) >= least, 60, while_alive=live), live.output()
    live.kill()
    first = windows.read_text().split()
    saved = {f"{t[0]},{t[1]}" for t in _kept_windows(kept)}
    assert least <= len(saved) <= 20 and saved <= set(first)
    windows.unlink()
    again = batchseg(*args, "--output", output, env={"BATCHSEG_TEST_WINDOWS": str(windows)})
    assert again.returncode == 0, again.stdout + again.stderr
    second = windows.read_text().split()
    assert not saved & set(second) and len(second) == 30 - len(saved), (sorted(saved), second)
    assert not kept.exists() and not (output / "tiles-in-progress").exists()
    clean = tmp_path / "clean"
    assert batchseg(*args, "--output", clean).returncode == 0
    resumed, clean_rows = manifests(output)[1], manifests(clean)[1]
    drop = ("run_id",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in clean_rows
    ]
    assert_exact(shapes, resumed, 2500, 1800)


#: What replaces the half-tiled image: (width, height, shapes) drawn as an uncompressed TIFF,
#: whose byte size depends on its width and height only.
REPLACEMENTS = {
    "pixels": (2500, 1800, [Shape("disc", 800, 1200, 80, 80), Shape("rect", 1800, 420, 400, 300)]),
    "size": (2000, 2300, [Shape("disc", 300, 1900, 60, 60), Shape("ring", 1000, 1000, 300, 300, 0.5)]),
    "content": (2500, 1800, [Shape("ellipse", 1250, 900, 900, 60), Shape("disc", 450, 420, 40, 40)]),
}


@pytest.mark.parametrize(("change", "workers"), [("pixels", "1"), ("size", "2"), ("content", "1")])
def test_an_image_changed_while_half_tiled_is_tiled_afresh_on_resume(
    tmp_path: Path, change: str, workers: str
) -> None:
    """The run is killed with 20 of the image's 30 tiles kept; the image is replaced; the same
    command resumes. None of the tiles kept from the old file is used (every tile of the new
    file runs, once) and the result equals a clean run on the new file.

    pixels: other shapes, the same width, height and byte size, a later mtime. size: another
    width and height (another tile plan). content: other shapes with the byte size and mtime put
    back as they were, which only ``--hash`` sees: kept tiles are keyed by what tells a changed
    image everywhere in batchseg, the size and mtime, and the content hash with ``--hash``."""
    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "a.tif"
    old_shapes = [Shape("disc", 450, 420, 70, 70), Shape("rect", 1300, 900, 500, 300)]
    tifffile.imwrite(image, draw(old_shapes, 2500, 1800), photometric="rgb")
    tiling = ["--tile", "500", "--tile-overlap", "100", "--workers", workers]
    args = ["run", folder, "--engine", "poison_engine:load", "--prompt", "red", *tiling]
    args += ["--hash"] if change == "content" else []
    output, windows = tmp_path / "out", tmp_path / "windows.txt"
    kept = output / "tiles-in-progress" / "a.tif"
    live = start_batchseg(
        [*args, "--output", output],
        tmp_path,
        {
            "BATCHSEG_TEST_WINDOWS": str(windows),
            "BATCHSEG_TEST_KEEP_EACH": "1",  # each tile reported is kept: 20 kept at the stall
            "BATCHSEG_TEST_STALL_AFTER": "20",
        },
    )
    assert wait_until(lambda: len(_kept_windows(kept)) >= 20, 60, while_alive=live), live.output()
    live.kill()
    before = image.stat()
    width, height, shapes = REPLACEMENTS[change]
    tifffile.imwrite(image, draw(shapes, width, height), photometric="rgb")
    later = before.st_mtime_ns if change == "content" else before.st_mtime_ns + 1_000_000_000
    os.utime(image, ns=(before.st_atime_ns, later))
    after = image.stat()
    if change != "size":  # the same byte size: only the mtime (or with --hash the content) tells
        same_mtime = after.st_mtime_ns == before.st_mtime_ns
        assert after.st_size == before.st_size and same_mtime == (change == "content")
    again = batchseg(*args, "--output", output, env={"BATCHSEG_TEST_WINDOWS": str(tmp_path / "again.txt")})
    assert again.returncode == 0, again.stdout + again.stderr
    ran = (tmp_path / "again.txt").read_text().split()
    assert sorted(ran) == sorted(_windows(plan_tiles(width, height, 500, 100))), ran
    assert not (output / "tiles-in-progress").exists()
    clean = tmp_path / "clean"
    assert batchseg(*args, "--output", clean).returncode == 0
    _assert_same_result(output, clean, "a.tif")
    images, detections = manifests(output)
    row = images["a.tif"]
    assert (row["width"], row["height"], row["size_bytes"], row["mtime_ns"]) == (
        width, height, after.st_size, after.st_mtime_ns
    )  # fmt: skip
    assert_exact(shapes, detections, width, height)


def _assert_same_result(output: Path, clean: Path, path: str) -> None:
    """The image's row, detections and label map in ``output`` are those of ``clean``."""
    runs = ("run_id", "started_at", "finished_at", "duration_s", "worker_pid", "attempts")
    (images, detections), (clean_images, clean_detections) = manifests(output), manifests(clean)
    drop = ("run_id",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in detections] == [
        {k: v for k, v in r.items() if k not in drop} for r in clean_detections
    ]
    row, clean_row = images[path], clean_images[path]
    assert {k: v for k, v in row.items() if k not in runs} == {
        k: v for k, v in clean_row.items() if k not in runs
    }
    labels = tifffile.imread(output / row["mask_path"])
    assert np.array_equal(labels, tifffile.imread(clean / clean_row["mask_path"]))


def _windows(plan: TilePlan) -> list[str]:
    """Every tile of ``plan`` as the engine logs it, ``x0,y0``."""
    return [f"{t.window[0]},{t.window[1]}" for t in plan.tiles]


def _kept_windows(kept: Path, plan: TilePlan | None = None) -> list[tuple[int, int]]:
    """The windows' origins of the tiles kept on disk, from their ids and the run's tile plan."""
    plan = plan or plan_tiles(2500, 1800, 500, 100)
    ids = []
    for file in kept.glob("batch-*.json"):
        try:
            ids += list(json.loads(file.read_text())["tiles"])
        except FileNotFoundError:  # the image was merged meanwhile: its kept tiles went
            continue
    return [plan.by_id(i).window[:2] for i in ids]


def test_a_tiled_image_gets_its_preview_from_window_reads(tmp_path: Path) -> None:
    """--previews on a tiled image: the label map is a tiled TIFF, read band by band for the preview
    (never whole); the red square shows tinted at its place, the background untouched."""
    folder = tmp_path / "in"
    folder.mkdir()
    picture = np.full((1200, 1600, 3), 128, np.uint8)
    picture[300:700, 500:900] = (255, 0, 0)  # across the seams of 512-pixel tiles
    Image.fromarray(picture).save(folder / "big.png")
    output = tmp_path / "out"
    flags = ["--prompt", "red", "--tile", "512", "--previews", "--preview-size", "400"]
    done = batchseg("run", folder, "--engine", THRESHOLD, "--output", output, *flags)
    assert done.returncode == 0, done.stderr
    assert (output / "masks" / "big.png.tif").is_file()
    with Image.open(output / "previews" / "big.png.jpg") as preview:
        pixels = np.asarray(preview.convert("RGB")).astype(int)
    assert preview.size[0] == 400  # 1600 x 1200 at most 400 wide, the legend strip below
    inside, outside = pixels[125, 175], pixels[20, 20]  # preview pixels: 4 source pixels each
    assert inside[0] > 180 and inside[1] < 90, inside  # red, half tinted with its own colour
    assert abs(outside - 128).max() < 12, outside  # grey background, no overlay
