"""The merge helper process: the same merge as in-process, and what happens when it dies, fails or
is left behind (a real ``python -m batchseg.tiles.merge_process`` each time, no stand-in)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from _runs import start_run, wait_until
from _tile_shapes import Found, Shape, tile_detections
from conftest import marked_processes
from PIL import Image

from batchseg.records import Detection
from batchseg.tiles.grid import TilePlan, plan_tiles
from batchseg.tiles.merge import MergeRules, merge_tiles
from batchseg.tiles.merge_process import MergeProcess
from batchseg.tiles.progress import TileProgress

SHAPES = [
    Shape("disc", 1008, 500, 60, 60),  # on a seam
    Shape("ring", 2000, 1000, 250, 250, 0.5),  # across seams, with a hole
    Shape("rect", 2600, 1900, 700, 600),  # larger than a tile
]

RULES = MergeRules(match=0.5)  # the default --tile-match, --suppress-iou off


def _tiles(plan: TilePlan) -> dict[str, list[Found]]:
    return {t.id: tile_detections(SHAPES, t, plan.width, plan.height) for t in plan.tiles}


def _rows(merged: list) -> list[tuple]:  # type: ignore[type-arg]
    return [(m.index, m.prompt, m.score, m.box, m.area_px, m.tiles, m.mask_rle(3000)) for m in merged]


@pytest.fixture
def helper() -> MergeProcess:
    process = MergeProcess()
    yield process
    process.stop()


def _merge(helper: MergeProcess, plan: TilePlan, tiles: dict[str, list[Found]]) -> tuple[list, list[str]]:  # type: ignore[type-arg]
    merge = helper.begin(plan, RULES)
    ids = list(tiles)
    for first in range(0, len(ids), 4):  # a batch at a time, as the worker sends them
        merge.add({tile_id: tiles[tile_id] for tile_id in ids[first : first + 4]})
    return merge.result()


def test_the_helper_merges_as_the_worker_would(helper: MergeProcess) -> None:
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    merged, rles = _merge(helper, plan, tiles)
    expected = merge_tiles(plan, tiles)
    assert len(expected) == len(SHAPES)
    assert _rows(merged) == _rows(expected)
    assert rles == [m.mask_rle(plan.width) for m in expected]
    again, _ = _merge(helper, plan, tiles)  # the same helper serves the next image
    assert _rows(again) == _rows(expected)


def test_an_image_dropped_half_way_leaves_nothing_behind(helper: MergeProcess) -> None:
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    failed = helper.begin(plan, RULES)
    failed.add(dict(list(tiles.items())[:3]))
    failed.close()  # a tile failed: the image is given up
    merged, _ = _merge(helper, plan, tiles)
    assert _rows(merged) == _rows(merge_tiles(plan, tiles))


def test_a_broken_mask_fails_that_image_only(helper: MergeProcess) -> None:
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    broken = dict(tiles)
    first = plan.tiles[0].id
    broken[first] = [Found("red", 0.9, "0?")]  # RLE counts of another size
    with pytest.raises(RuntimeError, match="merging failed: ValueError: RLE counts"):
        _merge(helper, plan, broken)
    merged, _ = _merge(helper, plan, tiles)
    assert len(merged) == len(SHAPES)


def test_a_killed_helper_fails_its_image_and_the_next_image_gets_a_new_one(helper: MergeProcess) -> None:
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    merge = helper.begin(plan, RULES)
    merge.add(tiles)
    assert helper._proc is not None
    os.kill(helper._proc.pid, signal.SIGKILL)
    helper._proc.wait()
    with pytest.raises(RuntimeError, match="merge process ended"):
        merge.result()
    merged, _ = _merge(helper, plan, tiles)
    assert len(merged) == len(SHAPES)


#: A merge that keeps a helper busy for minutes: a hundred small squares on each of 10,816 tiles,
#: the same rows for every tile (so the message is small: pickle sends the list once).
BUSY = textwrap.dedent(
    """
    import numpy as np
    from batchseg import rle
    from batchseg.tiles.grid import plan_tiles
    from batchseg.tiles.merge import MergeRules
    from batchseg.tiles.merge_process import _Row

    def busy(helper):
        plan = plan_tiles(20000, 20000, 256, 64)
        rows = []
        for k in range(100):
            mask = np.zeros((256, 256), bool)
            x, y = k * 37 % 246, k * 53 % 246
            mask[y : y + 8, x : x + 8] = True
            rows.append(_Row("red", 0.5 + k / 1000, rle.encode(mask)))
        merge = helper.begin(plan, MergeRules(match=0.5))
        merge.add({tile.id: rows for tile in plan.tiles})
        return merge
    """
)


def _busy(helper: MergeProcess):  # type: ignore[no-untyped-def]
    scope: dict[str, object] = {}
    exec(BUSY, scope)  # noqa: S102 - the same code the stand-in worker below runs
    return scope["busy"](helper)  # type: ignore[operator]


def _wait_busy(pid: int) -> psutil.Process:
    """The helper once it has spent 1.2 s of CPU (its start costs a fraction of that): deep in a merge."""
    helper = psutil.Process(pid)
    for _ in range(1200):  # polls, not a time limit: a loaded machine only makes it slower
        times = helper.cpu_times()
        if times.user + times.system >= 1.2:
            return helper
        time.sleep(0.05)
    raise AssertionError("the merge helper never got busy")


def _gone_soon(process: psutil.Process) -> bool:
    """Whether ``process`` is gone (or a zombie nobody reaped yet) within 30 polls of 0.1 s."""
    for _ in range(30):
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_an_image_given_up_ends_a_busy_helper_and_the_next_image_gets_a_new_one(helper: MergeProcess) -> None:
    """A tiled image that fails (a bad tile) while its helper is deep in a long merge step: the
    helper ends at once, so the worker's next image is merged by a new helper instead of waiting
    behind the abandoned merge until the watchdog kills the worker."""
    abandoned = _busy(helper)
    assert helper.pid is not None
    busy = _wait_busy(helper.pid)
    abandoned.close()
    assert not busy.is_running() or busy.status() == psutil.STATUS_ZOMBIE
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    merged, _ = _merge(helper, plan, tiles)
    assert helper.pid != busy.pid
    assert _rows(merged) == _rows(merge_tiles(plan, tiles))


def test_an_image_begun_over_an_unfinished_one_gets_a_new_helper(helper: MergeProcess) -> None:
    _busy(helper)  # never finished nor closed
    assert helper.pid is not None
    busy = _wait_busy(helper.pid)
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    merged, _ = _merge(helper, plan, tiles)
    assert not busy.is_running() or busy.status() == psutil.STATUS_ZOMBIE
    assert _rows(merged) == _rows(merge_tiles(plan, tiles))


#: A stand-in worker: starts its merge helper through the worker's own code, makes it busy, says
#: the helper's pid, and waits; "exit" on its stdin ends it normally.
STAND_IN = BUSY + textwrap.dedent(
    """
    import sys
    from batchseg.tiles.merge_process import shared
    merge = busy(shared())
    print(shared().pid, flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.parametrize("end", ["SIGKILL", "SIGTERM", "exit"])
def test_a_busy_helper_ends_with_its_worker_however_the_worker_ends(end: str) -> None:
    """The helper is CPU-bound in a merge (no message read for minutes) when its worker ends: it
    is gone within 3 s all the same (parent-death signal, parent watch, end of its input)."""
    with subprocess.Popen(
        [sys.executable, "-c", STAND_IN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as worker:
        assert worker.stdout is not None and worker.stdin is not None
        busy = _wait_busy(int(worker.stdout.readline()))
        try:
            if end == "exit":
                worker.stdin.write("exit\n")
                worker.stdin.flush()
            else:
                worker.send_signal(getattr(signal, end))
            worker.wait()
            assert _gone_soon(busy), f"the merge helper outlived its worker ({end})"
        finally:
            if busy.is_running():
                busy.kill()


TESTS = Path(__file__).resolve().parent


def test_a_worker_killed_during_a_merge_leaves_no_helper_and_the_run_records_every_image(
    tmp_path: Path, no_process_left: str
) -> None:
    """Through ``python -m batchseg run``: the worker is SIGKILLed while its helper holds a tiled
    image's merge (20 of its 30 tiles run, 16 or more kept; the engine stalls). The helper is gone
    3 s later; the run goes on, the image's second attempt runs the tiles not kept, and every
    image is recorded."""
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = np.zeros((1800, 2500, 3), np.uint8)
    pixels[400:700, 450:1300] = (255, 0, 0)  # across seams of --tile 500
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels[:300, :400]).save(folder / "b.png")  # whole
    windows = tmp_path / "windows.txt"
    args = ["run", folder, "--engine", "poison_engine:load", "--prompt", "red", "--tile", "500"]
    live = start_run(
        [*args, "--tile-overlap", "100", "--workers", "1", "--output", tmp_path / "out"],
        tmp_path / "console.txt",
        cwd=tmp_path,
        env={
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "BATCHSEG_TEST_WINDOWS": str(windows),
            "BATCHSEG_TEST_STALL_AFTER": "20",
        },
    )

    def helpers() -> list[psutil.Process]:
        found = []
        for proc in marked_processes(no_process_left):
            with contextlib.suppress(psutil.Error):
                if "batchseg.tiles.merge_process" in proc.cmdline():
                    found.append(proc)
        return found

    stalled = lambda: windows.exists() and len(windows.read_text().split()) >= 20  # noqa: E731
    assert wait_until(lambda: stalled() and len(helpers()) == 1, 120, while_alive=live), live.output()
    (helper,) = helpers()
    worker = psutil.Process(helper.ppid())
    assert any("spawn_main" in part for part in worker.cmdline())  # the run's worker process
    windows.unlink()  # the stall counts this run's windows: the second attempt runs to the end
    worker.kill()
    assert _gone_soon(helper), "the merge helper outlived its SIGKILLed worker"
    assert live.wait(300) == 0, live.output()
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out" / "manifest" / "images.parquet").to_pylist()}
    assert {path: (r["status"], r["attempts"]) for path, r in rows.items()} == {
        "a.png": ("ok", 2),
        "b.png": ("ok", 1),
    }
    assert rows["a.png"]["n_detections"] == 1
    assert len(windows.read_text().split()) <= 30 - 16  # the kept tiles were not run again


def _kept(folder: Path, key: str = "a") -> TileProgress:
    """Where an image's tiles are kept, as a worker keeps them (one file per ``_save``)."""
    return TileProgress(folder, {"image": key})


def _save(progress: TileProgress, tiles: dict[str, list[Found]]) -> None:
    rows = {
        tile_id: [
            Detection(d.prompt, k, d.score, (0.0, 0.0, 1.0, 1.0), 1, d.mask_rle) for k, d in enumerate(found)
        ]
        for tile_id, found in tiles.items()
    }
    progress.save(next(iter(rows)), rows)


def test_a_followed_merge_has_the_kept_tiles_of_every_worker_before_the_image_is_merged(
    helper: MergeProcess, tmp_path: Path
) -> None:
    """Tiles kept in the image's folder (by this worker or another) are merged as they land: the
    merge of the image then gets only the tiles it lacks, and equals a merge of all of them."""
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    ids = list(tiles)
    progress = _kept(tmp_path / "a")
    _save(progress, {i: tiles[i] for i in ids[:4]})
    helper.follow(progress, plan, RULES)
    _save(progress, {i: tiles[i] for i in ids[4:-2]})  # another worker's, then this one's next keep
    _save(progress, {i: tiles[i] for i in ids[2:6]})  # a tile kept twice (a rerun) counts once
    helper.follow(progress, plan, RULES)
    merge = helper.begin(plan, RULES, progress)
    merge.add({i: tiles[i] for i in ids[-2:]})  # only what was never kept
    merged, rles = merge.result()
    expected = merge_tiles(plan, tiles)
    assert _rows(merged) == _rows(expected)
    assert rles == [m.mask_rle(plan.width) for m in expected]


def test_a_followed_merge_is_not_taken_for_another_image_or_settings(
    helper: MergeProcess, tmp_path: Path
) -> None:
    """Another key (settings, input) or a folder gone (merged elsewhere) start a new merge; at most
    two images are followed, the oldest dropped first."""
    plan = plan_tiles(3000, 2500, 1008, 252)
    tiles = _tiles(plan)
    ids = list(tiles)
    half = {i: tiles[i] for i in ids[: len(ids) // 2]}

    def merged_alone(progress: TileProgress) -> list[tuple]:  # type: ignore[type-arg]
        merge = helper.begin(plan, RULES, progress)
        merge.add({i: tiles[i] for i in ids[-1:]})
        return _rows(merge.result()[0])

    alone = _rows(merge_tiles(plan, {i: tiles[i] for i in ids[-1:]}))
    a = _kept(tmp_path / "a")
    _save(a, half)
    helper.follow(a, plan, RULES)
    assert merged_alone(_kept(tmp_path / "a", key="changed")) == alone
    helper.follow(a, plan, RULES)
    folders = [tmp_path / name for name in ("b", "c", "d")]
    for folder in folders:
        progress = _kept(folder)
        _save(progress, half)
        helper.follow(progress, plan, RULES)
    assert merged_alone(_kept(folders[0])) == alone  # a, then b: the oldest of four, dropped
    shutil.rmtree(folders[1])
    helper.follow(_kept(folders[2]), plan, RULES)
    assert merged_alone(_kept(folders[1])) == alone  # its folder went: dropped
    assert merged_alone(_kept(folders[2])) != alone  # still followed: half the tiles in
