"""The engine's pipeline over several sub-batches (sub-batch k+1 encoded before sub-batch k is
post-processed), and its recovery paths, on the real tiny SAM3: out of memory while queuing halves the
batch, a failure while post-processing reruns that sub-batch image by image, an image that breaks
its sub-batch fails alone. The failures are injected by wrapping one engine method; everything else
is the real code path."""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sam3 import save_noise_image
from _writing import written

from batchseg.config import RunConfig
from batchseg.engines.sam3.engine import load_engine
from batchseg.engines.sam3.pipeline import Sam3Engine
from batchseg.engines.sam3.sizing import batch_for_free_memory, task_size
from batchseg.records import Item, ItemResult, Status
from batchseg.worker.contract import Capabilities, EngineSpec, Segmentation
from batchseg.worker.writer import OutputWriter, WritingBeat

SIZES = [(131, 77), (50, 64), (90, 90), (64, 48), (120, 80), (77, 131), (40, 40)]
POISON = "img_3.png"  # 64x48


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("in")
    for k, (w, h) in enumerate(SIZES):
        save_noise_image(root / f"img_{k}.png", w, h, seed=k)
    return root


@pytest.fixture(scope="module")
def task() -> list[Item]:
    return [Item(f"img_{k}.png", 0, 0) for k in range(len(SIZES))]


def make_engine(
    tiny_model: Path, folder: Path, out: Path, batch_size: int, overlap: bool = True
) -> Sam3Engine:
    config = RunConfig(
        input=folder,
        prompts=("roof", "car"),
        model=str(tiny_model),
        output=out,
        device="cpu",
        dtype="float32",
        threshold=0.0,
        threads=1,
        batch_size=batch_size,
    )
    engine = load_engine(EngineSpec(config), slot=0)
    # The GPU's order (sub-batch k encoded before k-1 is decoded), which a CPU does not use by
    # default: the tests run it here, where no GPU is needed.
    engine.overlap = overlap
    return engine


@pytest.fixture(scope="module")
def reference(
    tiny_model: Path, folder: Path, task: list[Item], tmp_path_factory: pytest.TempPathFactory
) -> list[ItemResult]:
    """Every image alone: no pipeline at all."""
    engine = make_engine(tiny_model, folder, tmp_path_factory.mktemp("ref"), batch_size=1, overlap=False)
    return [written(engine, [item])[0] for item in task]


def assert_same(results: list[ItemResult], reference: list[ItemResult], skip: tuple[str, ...] = ()) -> None:
    assert [r.path for r in results] == [r.path for r in reference]
    for got, want in zip(results, reference, strict=True):
        if got.path in skip:
            continue
        assert got.status is Status.OK, got.traceback
        assert (got.width, got.height) == (want.width, want.height)
        assert [d.prompt for d in got.detections] == [d.prompt for d in want.detections]
        assert np.allclose([d.score for d in got.detections], [d.score for d in want.detections], atol=1e-5)
        assert np.allclose([d.box for d in got.detections], [d.box for d in want.detections], atol=1e-3)


def wrap(engine: Sam3Engine, name: str, before: Callable[..., None]) -> None:
    """Call ``before(*args)`` ahead of the engine's own method ``name`` (it may raise)."""
    method = getattr(engine, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before(*args)
        return method(*args, **kwargs)

    setattr(engine, name, wrapped)


@pytest.mark.parametrize("overlap", [True, False])
def test_sub_batches_equal_images_alone_and_report_as_they_go(
    tiny_model: Path,
    folder: Path,
    task: list[Item],
    reference: list[ItemResult],
    tmp_path: Path,
    overlap: bool,
) -> None:
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=3, overlap=overlap)
    beats: list[tuple[list[tuple[int, ItemResult]], int | None]] = []
    furthest = 0

    def heartbeat(finished: list[tuple[int, ItemResult]], reached: int | None) -> None:
        nonlocal furthest
        beats.append((list(finished), reached))
        assert all(index < furthest for index, _ in finished), "a result before its read was announced"
        furthest = max(furthest, reached or 0)

    results = written(engine, task, heartbeat)
    assert_same(results, reference)
    # 7 images in sub-batches of 3, 3, 1: a beat after each, and one before each new read-ahead.
    assert len([b for b in beats if b[1] is None]) == 3
    assert [reached for _, reached in beats if reached is not None] == [6, 7]
    reported = [index for finished, _ in beats for index, _ in finished]
    assert len(reported) == len(set(reported)) and reported == sorted(reported)
    for index, result in (pair for finished, _ in beats for pair in finished):
        assert result is results[index]


def test_a_short_sub_batch_is_padded_to_the_full_batch_the_first_time_its_size_comes(
    tiny_model: Path, folder: Path, task: list[Item], reference: list[ItemResult], tmp_path: Path
) -> None:
    """On a GPU a short size's first run would capture a graph and plan cuDNN's kernels for it
    (``Sam3Engine.pad_rows``): the first time, its rows are padded to the full batch, which is
    decoded whole and post-processed for its real images only; the next time it runs as it is."""
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=3)
    engine.pad_short = True  # on by default where the backbone is captured or compiled (a GPU)
    rows: list[int] = []
    vision = engine.model.get_vision_features

    def counted(pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        rows.append(pixel_values.shape[0])
        return vision(pixel_values=pixel_values, **kwargs)

    engine.model.get_vision_features = counted
    landed: list[int] = []
    wrap(engine, "land", lambda scored, sizes, *rest: landed.append(len(sizes)))
    assert_same(written(engine, task), reference)  # 7 images: 3, 3 and 1 padded with 2
    assert rows == [3, 3, 3] and landed == [3, 3, 1]
    assert_same(written(engine, task), reference)  # the size of 1 came before: as it is
    assert rows[3:] == [3, 3, 1] and landed[3:] == [3, 3, 1]
    # A lone image the ladder retries is never padded (the path of out-of-memory recoveries).
    assert len(engine.segment([engine.read(task[0])])) == 1 and rows[-1] == 1


@pytest.mark.parametrize("overlap", [True, False])
def test_out_of_memory_while_decoding_halves_the_batch_for_good(
    tiny_model: Path,
    folder: Path,
    task: list[Item],
    reference: list[ItemResult],
    tmp_path: Path,
    overlap: bool,
) -> None:
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=4, overlap=overlap)
    seen: list[int] = []

    def no_room_for_four(encoded: Any) -> None:
        seen.append(len(encoded.sizes))
        if len(encoded.sizes) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    wrap(engine, "launch_prompts", no_room_for_four)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = written(engine, task)
    assert_same(results, reference)
    # 4 fails and goes again as 2 + 2; with overlap the 3 encoded meanwhile fail too and go as 2 + 1.
    assert engine.max_batch == 2
    assert seen == ([4, 2, 2, 3, 2, 1] if overlap else [4, 2, 2, 2, 1])
    assert any("continuing with batch 2" in str(w.message) for w in caught)
    # The smaller size is kept for the next task.
    seen.clear()
    assert_same(written(engine, task), reference)
    assert seen == [2, 2, 2, 1]


def test_out_of_memory_while_post_processing_reruns_that_sub_batch_smaller(
    tiny_model: Path, folder: Path, task: list[Item], reference: list[ItemResult], tmp_path: Path
) -> None:
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=3)
    landed: list[int] = []

    def only_one_fits(scored: Any, sizes: Any, *rest: Any) -> None:
        landed.append(len(sizes))
        if len(sizes) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    wrap(engine, "land", only_one_fits)
    with pytest.warns(RuntimeWarning, match="at batch 3; continuing with batch 1"):
        results = written(engine, task)
    assert_same(results, reference)
    # A sub-batch of 3 out of memory goes again in sub-batches of 1 (3 // 2 would not fit either):
    # the first and the second (encoded before the first failed) alike; the last holds 1 image.
    assert landed == [3, 1, 1, 1, 3, 1, 1, 1, 1]
    assert engine.max_batch == 1


@pytest.mark.parametrize("stage", ["encode_images", "launch_prompts"])
def test_an_image_that_breaks_its_sub_batch_fails_alone(
    tiny_model: Path, folder: Path, task: list[Item], reference: list[ItemResult], tmp_path: Path, stage: str
) -> None:
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=3)
    width, height = SIZES[3]

    def poison(batch: Any) -> None:
        sizes = batch.sizes if stage == "launch_prompts" else [(i.height, i.width) for i in batch]
        if (height, width) in sizes:
            raise ValueError("this image breaks the model (injected)")

    wrap(engine, stage, poison)
    results = written(engine, task)
    assert_same(results, reference, skip=(POISON,))
    bad = results[3]
    assert bad.path == POISON and bad.status is Status.ERROR
    assert bad.error_type == "ValueError" and "injected" in (bad.error_message or "")


def test_out_of_memory_in_the_warm_up_halves_the_batch_until_it_fits(
    tiny_model: Path, folder: Path, task: list[Item], reference: list[ItemResult], tmp_path: Path
) -> None:
    """On a GPU the backbone runs once at load (compiled and captured then): a batch whose
    backbone does not fit is halved there, instead of failing the worker's load."""
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=8)
    tried: list[int] = []
    vision = engine.model.get_vision_features

    def no_room_above_two(pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        tried.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return vision(pixel_values=pixel_values, **kwargs)

    engine.model.get_vision_features = no_room_above_two
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.warm_up()
    assert tried == [8, 4, 2] and engine.max_batch == 2
    assert [str(w.message)[-23:] for w in caught] == ["continuing with batch 4", "continuing with batch 2"]
    assert_same(written(engine, task), reference)


def test_the_warm_up_runs_the_prompts_decoders_and_halves_the_batch_when_they_do_not_fit(
    tiny_model: Path, folder: Path, task: list[Item], reference: list[ItemResult], tmp_path: Path
) -> None:
    """The decoders run once in the warm-up too (their first use is paid in the load, not by the
    first image): a batch whose decoders do not fit is halved there, like the backbone's."""
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=8)
    tried: list[int] = []
    forward, vision = engine.model.forward, engine.model.get_vision_features
    features: list[weakref.ref[Any]] = []

    def no_room_above_two(*args: Any, **kwargs: Any) -> Any:
        tried.append(kwargs["attention_mask"].shape[0])
        if tried[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    def freed_before_the_next_try(**kwargs: Any) -> Any:
        # The features of the batch whose decoders did not fit are memory the smaller one needs.
        assert all(ref() is None for ref in features), "the failed attempt's features are still held"
        out = vision(**kwargs)
        features.append(weakref.ref(out))
        return out

    engine.model.forward = no_room_above_two
    engine.model.get_vision_features = freed_before_the_next_try
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        engine.warm_up()
    engine.model.forward, engine.model.get_vision_features = forward, vision
    assert len(features) == 3
    assert tried == [8, 4] + [2] * len(engine.prompts) and engine.max_batch == 2  # every prompt at 2
    assert_same(written(engine, task), reference)


@pytest.mark.parametrize("overlap", [True, False])
def test_each_image_is_timed_by_its_own_sub_batch(
    tiny_model: Path, folder: Path, task: list[Item], tmp_path: Path, overlap: bool
) -> None:
    """started_at is the image's sub-batch's start, finished_at the end of its own write: the first
    image's duration holds none of the later sub-batches (a task's start was every image's)."""
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=2, overlap=overlap)
    before = time.time()
    results = written(engine, task)  # sub-batches 0-1, 2-3, 4-5, 6
    after = time.time()
    starts = [r.started_at for r in results]
    assert all(r.status is Status.OK for r in results)
    assert all(s is not None and before <= s for s in starts)
    assert starts[0] == starts[1] < starts[2] == starts[3] < starts[4] == starts[5] < starts[6]
    for result in results:
        assert result.started_at is not None and result.finished_at is not None
        assert result.started_at < result.finished_at <= after
    first = results[0]
    assert first.finished_at is not None and first.finished_at < results[6].started_at  # type: ignore[operator]


def test_capabilities_say_what_the_pool_needs(tiny_model: Path, folder: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model, folder, tmp_path, batch_size=3, overlap=False)
    # On a CPU: 4 sub-batches a task, a heartbeat after each, no GPU.
    assert engine.capabilities == Capabilities(
        "cpu float32", task_size=12, heartbeat_every=3, gpu_count=0, model_input=112
    )
    assert (engine.device, engine.preferred_task_size, engine.heartbeat_every) == ("cpu float32", 12, 3)


def test_the_batch_planned_from_free_gpu_memory() -> None:
    gib = 2**30
    assert batch_for_free_memory(80 * gib) == 16  # capped
    assert batch_for_free_memory(4 * gib) == 6  # 4 x 0.7 = 2.8 GiB: (2.8 - 0.55) / 0.36
    assert batch_for_free_memory(gib // 2) == 1  # never below one image
    assert task_size(6, cuda=True) == 6 * 32 and task_size(1, cuda=False) == 4


def test_label_maps_are_written_in_the_io_threads_beside_the_model(
    tiny_model: Path, folder: Path, task: list[Item], tmp_path: Path
) -> None:
    """The engine writes no file: it hands each image's instances to the worker's writer
    (``heartbeat.write``) from its I/O threads, so a label map is written while the model's thread
    goes on with the next sub-batch, never in the model's thread."""
    engine = make_engine(tiny_model, folder, tmp_path / "out", batch_size=2)
    threads: list[str] = []

    class Noting(OutputWriter):  # the worker's writer, noting the thread each image is written in
        def write(self, item: Item, seg: Segmentation) -> ItemResult:
            threads.append(threading.current_thread().name)
            return super().write(item, seg)

    writing = WritingBeat(Noting(engine.config, engine.device), task, lambda *_a, **_k: None)
    results = writing.results(engine.process(task, writing))
    assert [r.status for r in results] == [Status.OK] * len(task)
    assert len(threads) == len(task) and all(name.startswith("batchseg-io") for name in threads), threads
    assert all((tmp_path / "out" / r.mask_path).is_file() for r in results if r.mask_path)
