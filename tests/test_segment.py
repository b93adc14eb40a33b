"""The SAM3 engine end to end on the tiny model: real files in, label maps and results out.

threshold 0 so the random model yields detections; float32 on CPU so runs are reproducible."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sam3 import save_noise_image
from _writing import written
from PIL import Image

from batchseg import imageio
from batchseg.config import RunConfig
from batchseg.engines.sam3.engine import load_engine
from batchseg.engines.sam3.pipeline import Sam3Engine, pick_device
from batchseg.engines.sam3.speedups import compile_decoders, decoders_compiled, warm_sizes
from batchseg.errors import ConfigError
from batchseg.records import Item, ItemResult, Status
from batchseg.rle import area, decode
from batchseg.worker.contract import EngineSpec

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    save_noise_image(root / "a.png", 131, 77, seed=1)
    save_noise_image(root / "sub" / "b.jpg", 50, 64, seed=2)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def engine_for(
    tiny_model: Path, images: Path, out: Path, prompts: tuple[str, ...], **options: Any
) -> Sam3Engine:
    settings: dict[str, Any] = {"device": "cpu", "dtype": "float32", "threshold": 0.0, "threads": 1}
    settings.update(options)
    config = RunConfig(input=images, prompts=prompts, model=str(tiny_model), output=out, **settings)
    return load_engine(EngineSpec(config), slot=0)


def items(*paths: str) -> list[Item]:
    return [Item(path, 0, 0) for path in paths]


def check_consistent(result: ItemResult, out: Path) -> np.ndarray:
    """Label map file, RLE, areas and boxes all tell the same story; returns the label map."""
    assert result.status is Status.OK, result.traceback
    assert result.mask_path == imageio.mask_relpath(result.path)
    labels = imageio.read_label_map(out / result.mask_path)
    assert labels.shape == (result.height, result.width)
    assert [d.index for d in result.detections] == list(range(1, len(result.detections) + 1))
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True)
    assert labels.max() <= len(result.detections)
    for d in result.detections:
        mask = decode(d.mask_rle, result.height, result.width)
        assert np.array_equal(mask, labels == d.index)
        assert d.area_px == area(d.mask_rle) == int(mask.sum()) > 0  # a covered one is no detection
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= result.width and 0 <= y0 <= y1 <= result.height
    return labels


def test_results_files_and_detections_agree(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    engine = engine_for(tiny_model, images, out, ("roof", "solar panel"), max_detections=7)
    assert engine.device == "cpu float32"
    [a, b] = written(engine, items("a.png", "sub/b.jpg"))
    assert (a.width, a.height, b.width, b.height) == (131, 77, 50, 64)
    for result in (a, b):
        labels = check_consistent(result, out)
        assert labels.any()
        # 7 per prompt kept (threshold 0 keeps every query); those covered entirely by better ones
        # are no detection (this tiny model covers 2 of a's 14)
        assert 0 < len(result.detections) <= 14
        assert {d.prompt for d in result.detections} == {"roof", "solar panel"}
        assert result.worker_pid == os.getpid() and result.device == "cpu float32"
        assert result.started_at is not None and result.finished_at is not None
        assert result.started_at <= result.finished_at
    assert (out / "masks" / "sub" / "b.jpg.png").is_file()


def test_several_prompts_equal_separate_single_prompt_runs(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    both = engine_for(tiny_model, images, tmp_path / "both", ("roof", "tree"))
    [joint] = written(both, items("a.png"))
    singles = {}
    for prompt in ("roof", "tree"):
        engine = engine_for(tiny_model, images, tmp_path / prompt, (prompt,))
        [singles[prompt]] = written(engine, items("a.png"))
    joint_labels = check_consistent(joint, tmp_path / "both")
    single_labels = {p: check_consistent(r, tmp_path / p) for p, r in singles.items()}
    for prompt, single in singles.items():
        mine = [(d.score, d.box) for d in joint.detections if d.prompt == prompt]
        # The joint run keeps each prompt's detections in order, except those whose pixels all went
        # to better detections of the other prompt: those are no detection there.
        assert mine == [(d.score, d.box) for d in single.detections if (d.score, d.box) in mine]
        for gone in (d for d in single.detections if (d.score, d.box) not in mine):
            assert (joint_labels[single_labels[prompt] == gone.index] > 0).all()
    # A pixel is background in the joint map exactly when it is in every single-prompt map...
    assert np.array_equal(joint_labels == 0, (single_labels["roof"] == 0) & (single_labels["tree"] == 0))
    # ...and a pixel a detection holds in the joint map, it holds in its own prompt's map too.
    for d in joint.detections:
        twin = next(s for s in singles[d.prompt].detections if (s.score, s.box) == (d.score, d.box))
        held = joint_labels == d.index
        assert (single_labels[d.prompt][held] == twin.index).all()


def test_processor_gets_the_original_image(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    engine = engine_for(tiny_model, images, tmp_path / "out", ("roof",))
    seen: list[tuple[int, int]] = []
    real_call = engine.processor.__call__

    def spy(*args: Any, **kwargs: Any) -> Any:  # records, then runs the real processor
        seen.extend(image.size for image in kwargs.get("images") or [])
        return real_call(*args, **kwargs)

    engine.processor = type("Spy", (), {"__call__": staticmethod(spy)})()
    [result] = written(engine, items("a.png"))
    assert result.status is Status.OK
    assert seen == [(131, 77)]
    encoded = Sam3Engine.encode_images(engine, [imageio.read_image(images / "a.png", 10**8)])
    assert encoded.sizes == [(77, 131)]


def test_bad_image_then_good_ones(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    engine = engine_for(tiny_model, images, out, ("roof",))
    broken, after = written(engine, items("broken.jpg", "a.png"))
    assert broken.status is Status.INVALID_INPUT and broken.error_type == "InvalidImageError"
    assert broken.error_message and broken.mask_path is None
    check_consistent(after, out)
    [alone] = written(engine, items("sub/b.jpg"))
    check_consistent(alone, out)
    [missing] = written(engine, items("gone.png"))
    assert missing.status is Status.INVALID_INPUT


def test_batch_matches_one_by_one(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    engine = engine_for(tiny_model, images, tmp_path / "out", ("roof", "car"))
    batched = written(engine, items("a.png", "sub/b.jpg"))
    alone = [written(engine, items(path))[0] for path in ("a.png", "sub/b.jpg")]
    for x, y in zip(batched, alone, strict=True):
        assert [d.prompt for d in x.detections] == [d.prompt for d in y.detections]
        assert np.allclose([d.score for d in x.detections], [d.score for d in y.detections], atol=1e-5)
        assert np.allclose([d.box for d in x.detections], [d.box for d in y.detections], atol=1e-3)


def test_unwritable_output_is_an_output_error(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").write_text("a file where the masks folder should be")
    engine = engine_for(tiny_model, images, out, ("roof",))
    [result] = written(engine, items("a.png"))
    assert result.status is Status.ERROR and result.error_type == "OutputError"
    assert "Traceback" in (result.traceback or "")


def test_zero_detections_still_writes_an_empty_map(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    engine = engine_for(tiny_model, images, out, ("roof",))
    engine.config = engine.config.with_changes(threshold=1.0)
    [result] = written(engine, items("a.png"))
    assert result.status is Status.OK and result.detections == []
    assert not imageio.read_label_map(out / result.mask_path).any()


def test_too_long_prompt_fails_at_load(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokens long"):
        engine_for(tiny_model, images, tmp_path / "out", ("roof", " ".join(["tree"] * 40)))


def test_cpu_device_pick() -> None:
    assert pick_device("cpu", slot=3) == "cpu"


def _same_detections(x: ItemResult, y: ItemResult, prompt: str) -> None:
    """``prompt``'s detections of one image from two engines (two devices, or compiled and eager)
    pair up by score (within 1e-3; near-equal scores of two prompts may swap places, so each
    prompt's are paired on their own). At threshold 0 the low-scored masks lie under the better
    ones, and a pixel that rounds the other way can leave one of them unpainted (dropped) on one
    side only: an unpaired detection must be such a sliver, at most two per prompt."""
    left = sorted((d.score, d.area_px) for d in x.detections if d.prompt == prompt)
    right = sorted((d.score, d.area_px) for d in y.detections if d.prompt == prompt)
    assert left and right
    unpaired = []
    for score, area_px in left:
        match = min(right, key=lambda r: abs(r[0] - score), default=None)
        if match is not None and abs(match[0] - score) <= 1e-3:
            right.remove(match)
        else:
            unpaired.append((score, area_px))
    unpaired += right
    sliver = x.width * x.height // 200  # 0.5% of the image
    assert len(unpaired) <= 2 and all(a <= sliver for _, a in unpaired), (unpaired, sliver)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_engine_agrees_with_cpu(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    gpu = engine_for(tiny_model, images, tmp_path / "gpu", ("roof", "tree"), device="cuda")
    assert gpu.device.startswith("cuda:0 ") and gpu.device.endswith(" float32")
    cpu = engine_for(tiny_model, images, tmp_path / "cpu", ("roof", "tree"))
    on_gpu = written(gpu, items("a.png", "sub/b.jpg", "broken.jpg"))
    on_cpu = written(cpu, items("a.png", "sub/b.jpg", "broken.jpg"))
    assert on_gpu[2].status is Status.INVALID_INPUT
    for x, y in zip(on_gpu[:2], on_cpu[:2], strict=True):
        check_consistent(x, tmp_path / "gpu")
        for prompt in ("roof", "tree"):
            _same_detections(x, y, prompt)
    auto = engine_for(tiny_model, images, tmp_path / "auto", ("roof",), device="cuda", dtype="auto")
    check_consistent(written(auto, items("a.png"))[0], tmp_path / "auto")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_unindexed_cuda_spreads_workers_over_gpus() -> None:
    count = torch.cuda.device_count()
    assert [pick_device("cuda", slot) for slot in range(count + 1)] == [
        f"cuda:{i % count}" for i in range(count + 1)
    ]
    assert pick_device("cuda:0", slot=5) == "cuda:0"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_preprocessing_matches_the_cpu_processor() -> None:
    """The engine resizes on the GPU (the processor's own device option): within one uint8 level of
    the CPU processor on a photo-sized image."""
    from transformers import Sam3ImageProcessor

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((2048, 1536), Image.BILINEAR)
    processor = Sam3ImageProcessor()
    on_cpu = processor(images=[photo], return_tensors="pt")["pixel_values"]
    on_gpu = processor(images=[photo], return_tensors="pt", device="cuda")["pixel_values"].cpu()
    assert on_cpu.shape == on_gpu.shape == (1, 3, 1008, 1008)
    levels = ((on_cpu - on_gpu).abs() * 127.5).round()  # in uint8 steps
    stats = f"max {float(levels.max())} steps, {float((levels > 0).float().mean()):.4%} of values differ"
    # Measured on an H100: max 1 step, 16% of values differ (rounding of the antialiased resize).
    assert float(levels.max()) <= 1, stats
    assert float((levels > 0).float().mean()) < 0.25, stats


def _rotated_photo(path: Path) -> Path:
    """A 1600x1200 JPEG stored sideways with EXIF orientation 6 (upright it is 1200x1600)."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((1600, 1200), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90, exif=exif)
    return path


def test_draft_decoded_jpeg_gives_full_size_masks(tiny_model: Path, tmp_path: Path) -> None:
    """The tiny model reads 112 px: the JPEG is decoded at a reduced scale, but the label map, boxes
    and recorded size are the upright full size."""
    _rotated_photo(tmp_path / "in" / "side.jpg")
    engine = engine_for(tiny_model, tmp_path / "in", tmp_path / "out", ("roof",))
    drafted = imageio.read_image(tmp_path / "in" / "side.jpg", 10**9, draft_side=engine.draft_side)
    assert drafted.size[0] < 1200 and imageio.original_size(drafted) == (1200, 1600)
    (result,) = written(engine, items("side.jpg"))
    assert (result.width, result.height) == (1200, 1600)
    check_consistent(result, tmp_path / "out")
    assert result.detections and all(d.box[2] <= 1200 and d.box[3] <= 1600 for d in result.detections)


def test_draft_decoding_is_exact_enough_for_the_processor(tiny_model: Path, tmp_path: Path) -> None:
    """What the model sees from a draft-decoded JPEG is within 3 grey levels of the full decode
    (measured: at most 3, 0.2 on average, for 2048x1536 photos and the 112 px tiny model)."""
    from transformers import Sam3Processor

    path = _rotated_photo(tmp_path / "side.jpg")
    processor = Sam3Processor.from_pretrained(tiny_model)
    side = processor.image_processor.size["height"]
    full = imageio.read_image(path, 10**9)
    drafted = imageio.read_image(path, 10**9, draft_side=2 * side)
    assert drafted.size != full.size
    a = processor(images=[full], return_tensors="pt")["pixel_values"]
    b = processor(images=[drafted], return_tensors="pt")["pixel_values"]
    levels = (a - b).abs() * 127.5
    assert float(levels.max()) <= 4 and float(levels.mean()) <= 0.5


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own internals
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor: TF32 available but off (float32 here)
def test_compiled_backbone_pads_short_batches(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    """--compile: the backbone runs at one batch size; a short last batch is padded and cut back,
    and the results match the eager engine's."""
    plain = engine_for(tiny_model, images, tmp_path / "plain", ("roof",), device="cuda", batch_size=2)
    fast = engine_for(
        tiny_model, images, tmp_path / "fast", ("roof",), device="cuda", batch_size=2, compile=True
    )
    shutil.copy(images / "a.png", images / "c.png")
    todo = items("a.png", "sub/b.jpg", "c.png")  # batches of 2, then 1 (padded)
    for x, y in zip(written(fast, todo), written(plain, todo), strict=True):
        check_consistent(x, tmp_path / "fast")
        _same_detections(x, y, "roof")  # the decoders are compiled too: a sliver may differ


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own internals
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor: TF32 available but off (float32 here)
@pytest.mark.parametrize(
    "device, prompts",
    [
        # One prompt: its DETR encoder compiled again at the first full sub-batch. 45 s of CPU
        # compilation on 2 cores, so only with -m slow on a CPU.
        pytest.param("cpu", ("roof",), marks=pytest.mark.slow),
        pytest.param("cuda", ("roof",), marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")),
        pytest.param(
            "cuda", ("roof", "car"), marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
        ),
    ],
)
def test_compiled_decoders_compile_in_the_warm_up_and_match_the_eager_ones(
    tiny_model: Path, images: Path, tmp_path: Path, device: str, prompts: tuple[str, ...]
) -> None:
    """--compile also compiles the prompts' decoders (on a GPU; here on the CPU too, by hand):
    after the warm-up, every sub-batch size a task can bring (a full one, 3 of a batch of 4, one
    image) runs on code compiled in the load, and the results match the eager engine's."""
    import torch._dynamo.utils

    plain = engine_for(tiny_model, images, tmp_path / "plain", prompts, device=device, batch_size=4)
    fast = engine_for(
        tiny_model, images, tmp_path / "fast", prompts, device=device, batch_size=4, compile=True
    )
    if device == "cpu":  # speed_up compiles them on CUDA only; the warm-up is the engine's own
        compile_decoders(fast.model)
        fast.warm_up()
    assert decoders_compiled(fast.model) and warm_sizes(fast.model, 4) == [4, 2, 1, 4]
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i in range(3):
        save_noise_image(images / f"more{i}.png", 90 + 7 * i, 60 + 5 * i, seed=20 + i)
    for todo in (
        items("a.png", "sub/b.jpg", "more0.png", "more1.png"),
        items("a.png", "sub/b.jpg", "more2.png"),
        items("more1.png"),
    ):
        for x, y in zip(written(fast, todo), written(plain, todo), strict=True):
            check_consistent(x, tmp_path / "fast")
            for prompt in prompts:
                _same_detections(x, y, prompt)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled  # nothing compiled since


def _scores(results: list[ItemResult]) -> list[list[float]]:
    return [[d.score for d in r.detections] for r in results]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_backbone_matches_launching_its_kernels(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    """The backbone replayed as a CUDA graph gives the eager results: for full and short batches
    (a short one padded to the full batch the first time, then replaying a graph of its own size
    in the same memory pool), with sub-batch k-1 still waiting to be decoded while k replays (the
    graph's output is overwritten then), and captured again after CUDA out-of-memory halves the
    batch."""
    for i in range(5):
        save_noise_image(images / f"more{i}.png", 90 + 7 * i, 60 + 5 * i, seed=10 + i)
    todo = items("a.png", "sub/b.jpg", *[f"more{i}.png" for i in range(5)])  # 2, 2, 2, then 1
    prompts = ("roof", "car")
    plain = engine_for(
        tiny_model, images, tmp_path / "plain", prompts, device="cuda", batch_size=2, cuda_graphs=False
    )
    graphed = engine_for(tiny_model, images, tmp_path / "graph", prompts, device="cuda", batch_size=2)
    assert graphed._backbone is not None and graphed._backbone._captured is not None  # captured at load
    expected = written(plain, todo)
    # The short last sub-batch: padded to the full batch the first time its size comes
    # (``Sam3Engine.pad_rows``), replayed from a graph of its own size from the second time.
    for graphs in ([2], [1, 2]):
        got = written(graphed, todo)  # each run's files checked before the next overwrites them
        assert sorted(graphed._backbone._graphs) == graphs
        for result in got:
            check_consistent(result, tmp_path / "graph")
        for x, y in zip(_scores(got), _scores(expected), strict=True):
            assert np.allclose(x, y, atol=1e-4)
    with pytest.warns(RuntimeWarning, match="batch 1"):
        graphed.ladder.halve(2)
    assert graphed._backbone._captured is None
    again = written(graphed, todo)
    assert graphed._backbone._captured is not None and graphed._backbone.batch == 1
    assert sorted(graphed._backbone._graphs) == [1]
    # Against the eager backbone at the same batch: a product over 1 image and over 2 may round
    # differently, and at threshold 0 a mask a few pixels apart can be covered or not.
    single = engine_for(
        tiny_model, images, tmp_path / "single", prompts, device="cuda", batch_size=1, cuda_graphs=False
    )
    for x, y in zip(_scores(again), _scores(written(single, todo)), strict=True):
        assert np.allclose(x, y, atol=1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_failed_graph_capture_warns_and_launches_as_usual(
    tiny_model: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that fails (here: CUDA graphs refused) is not fatal: a warning, then the plain path."""

    class Refused:
        def __init__(self) -> None:
            raise RuntimeError("graphs not supported here")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Refused)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the vision backbone failed"):
        engine = engine_for(tiny_model, images, tmp_path / "out", ("roof",), device="cuda", batch_size=2)
    assert engine._backbone is not None and not engine._backbone.graph
    for result in written(engine, items("a.png", "sub/b.jpg")):
        check_consistent(result, tmp_path / "out")
