"""Exemplar boxes reach SAM3: the engine's detections on the tiny model (which has the geometry
encoder) are those of the library's own forward with the processor's ``input_boxes``, and not those
of the text alone; an image without boxes is not changed by a neighbour with some; a prompt of boxes
alone finds nothing where it has no box. threshold 0, float32 on CPU: exact and reproducible."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _sam3 import save_noise_image
from _writing import written
from PIL import Image

from batchseg.config import RunConfig
from batchseg.engines.sam3.engine import load_engine
from batchseg.engines.sam3.exemplar_boxes import EXEMPLARS_KEY, Placer
from batchseg.engines.sam3.pipeline import Sam3Engine
from batchseg.exemplars import load_exemplars
from batchseg.prompt_values import ExemplarsKind
from batchseg.records import Item, ItemResult, Status
from batchseg.worker.contract import EngineSpec

KEPT = 5
BOX = (20.0, 10.0, 70.0, 50.0)  # on a.png (131 x 77)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    save_noise_image(root / "a.png", 131, 77, seed=1)
    save_noise_image(root / "c.png", 90, 60, seed=3)
    return root


def boxes_file(folder: Path, rows: list[str], header: str = "path,x0,y0,x1,y1,label,prompt") -> Path:
    path = folder / "boxes.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def engine_for(
    model: Path, images: Path, prompts: tuple[str, ...], boxes: Path | None, **more: Any
) -> Sam3Engine:
    exemplars = ExemplarsKind().from_text(str(boxes)) if boxes is not None else None
    settings: dict[str, Any] = {"device": "cpu", "dtype": "float32", "threshold": 0.0, "threads": 1}
    config = RunConfig(
        input=images,
        prompts=prompts,
        exemplars=exemplars,
        model=str(model),
        output=images.parent / "out",
        max_detections=KEPT,
        **{**settings, **more},
    )
    return load_engine(EngineSpec(config), slot=0)


def reference_scores(
    engine: Sam3Engine, image: Image.Image, text: str, boxes: list[tuple[Any, int]]
) -> list[float]:
    """The library's forward (processor with input_boxes, model from pixels and token ids): the
    best ``KEPT`` scores, sigmoid(logit) * sigmoid(presence) as the library computes them."""
    given: dict[str, Any] = {}
    if boxes:
        given = {
            "input_boxes": [[list(b) for b, _ in boxes]],
            "input_boxes_labels": [[label for _, label in boxes]],
        }
    inputs = engine.processor(images=image, text=text, return_tensors="pt", **given)
    extra = {k: inputs[k] for k in ("input_boxes", "input_boxes_labels") if k in inputs}
    with torch.inference_mode():
        out = engine.model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            **extra,
        )
    scores = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
    return sorted(scores.tolist(), reverse=True)[:KEPT]


def scores_of(result: ItemResult, prompt: str) -> list[float]:
    assert result.status is Status.OK, result.traceback
    return sorted((d.score for d in result.detections if d.prompt == prompt), reverse=True)


def kept_from(found: list[float], reference: list[float]) -> bool:
    """The engine's scores are the reference's best (some may be covered entirely by better ones
    and so be no detection), to float32 round-off."""
    return bool(found) and all(any(abs(s - r) < 1e-5 for r in reference) for s in found)


def test_positive_and_negative_boxes_reach_the_model_with_the_text(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    boxes = boxes_file(tmp_path, ["a.png,20,10,70,50,1,roof", "a.png,90,40,120,70,0,roof"])
    engine = engine_for(tiny_model, images, ("roof",), boxes)
    [result] = written(engine, [Item("a.png", 0, 0)])
    image = Image.open(images / "a.png").convert("RGB")
    with_boxes = reference_scores(engine, image, "roof", [(BOX, 1), ((90.0, 40.0, 120.0, 70.0), 0)])
    text_only = reference_scores(engine, image, "roof", [])
    found = scores_of(result, "roof")
    assert kept_from(found, with_boxes)
    assert not kept_from(found, text_only)  # fails when the boxes do not reach the model
    assert with_boxes != reference_scores(engine, image, "roof", [(BOX, 1)])  # the negative counts too


def test_an_image_without_boxes_is_not_changed_by_a_neighbour_with_some(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    boxes = boxes_file(tmp_path, ["a.png,20,10,70,50,1,roof"])
    batched = engine_for(tiny_model, images, ("roof",), boxes, batch_size=2)
    a, c = written(batched, [Item("a.png", 0, 0), Item("c.png", 0, 0)])
    plain = engine_for(tiny_model, images, ("roof",), None)
    [c_alone] = written(plain, [Item("c.png", 0, 0)])
    assert scores_of(c, "roof") == scores_of(c_alone, "roof")
    [a_alone] = written(engine_for(tiny_model, images, ("roof",), boxes), [Item("a.png", 0, 0)])
    assert scores_of(a, "roof") == scores_of(a_alone, "roof")


def test_boxes_alone_are_the_prompt_where_they_are(tiny_model: Path, images: Path, tmp_path: Path) -> None:
    boxes = boxes_file(tmp_path, ["a.png,20,10,70,50,1"], "path,x0,y0,x1,y1,label")
    engine = engine_for(tiny_model, images, (), boxes, batch_size=2)
    a, c = written(engine, [Item("a.png", 0, 0), Item("c.png", 0, 0)])
    image = Image.open(images / "a.png").convert("RGB")
    assert kept_from(scores_of(a, "exemplar"), reference_scores(engine, image, "visual", [(BOX, 1)]))
    assert c.status is Status.OK and c.detections == []  # no box on c: the prompt does not run there


def test_a_prompt_named_only_by_boxes_runs_where_they_are_beside_a_text_prompt(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    boxes = boxes_file(tmp_path, ["a.png,20,10,70,50,1,lawn"])
    engine = engine_for(tiny_model, images, ("roof",), boxes, batch_size=1)  # c: a sub-batch without
    a, c = written(engine, [Item("a.png", 0, 0), Item("c.png", 0, 0)])
    image = Image.open(images / "a.png").convert("RGB")
    assert kept_from(scores_of(a, "lawn"), reference_scores(engine, image, "lawn", [(BOX, 1)]))
    assert scores_of(a, "roof") and {d.prompt for d in c.detections} == {"roof"}
    [c_alone] = written(engine_for(tiny_model, images, ("roof",), None), [Item("c.png", 0, 0)])
    assert scores_of(c, "roof") == scores_of(c_alone, "roof")


def test_a_tile_gets_the_boxes_it_holds_whole_in_its_own_frame(tmp_path: Path) -> None:
    boxes = boxes_file(tmp_path, ["a.png,20,10,70,50,1,roof", "a.png,100,5,125,30,0,roof"])
    exemplars = load_exemplars(
        RunConfig(input=tmp_path, prompts=("roof",), exemplars=ExemplarsKind().from_text(str(boxes)))
    )
    assert exemplars is not None
    placer = Placer(exemplars, ["roof"], ["roof"], tmp_path)
    window = Image.new("RGB", (64, 64))
    tile = placer.boxes(Item("a.png", 0, 0, window=(16, 0, 80, 64)), window, (131, 77))
    assert tile == {0: [((4.0, 10.0, 54.0, 50.0), True)]}  # the negative box lies outside it
    other = placer.boxes(Item("a.png", 0, 0, window=(67, 0, 131, 64)), window, (131, 77))
    assert other == {0: [((33.0, 5.0, 58.0, 30.0), False)]}
    whole = placer.boxes(Item("a.png", 0, 0), Image.new("RGB", (131, 77)), None)
    assert whole == {0: [(BOX, True), ((100.0, 5.0, 125.0, 30.0), False)]}
    assert EXEMPLARS_KEY.startswith("batchseg")


def test_a_prompt_threshold_is_that_prompts_least_score(tiny_model: Path, images: Path) -> None:
    everything = engine_for(tiny_model, images, ("roof", "tree"), None)
    [before] = written(everything, [Item("a.png", 0, 0)])
    cut = sorted(scores_of(before, "roof"))[len(scores_of(before, "roof")) // 2]  # half of roof's
    engine = engine_for(tiny_model, images, ("roof", "tree"), None, prompt_thresholds=(("roof", cut),))
    [after] = written(engine, [Item("a.png", 0, 0)])
    assert scores_of(after, "roof") and min(scores_of(after, "roof")) > cut
    assert len(scores_of(after, "roof")) < len(scores_of(before, "roof"))
    assert scores_of(after, "tree") == scores_of(before, "tree")  # --threshold (0) for the other


def test_one_object_under_two_prompts_is_one_detection(tiny_model: Path, images: Path) -> None:
    """With --suppress-iou 0 a detection whose mask meets a better one of the other prompt goes into
    it, and the better one names the folded prompt (the random model's masks overlap widely)."""
    plain = engine_for(tiny_model, images, ("roof", "tree"), None)
    [before] = written(plain, [Item("a.png", 0, 0)])
    engine = engine_for(tiny_model, images, ("roof", "tree"), None, suppress_iou=0.0)
    [after] = written(engine, [Item("a.png", 0, 0)])
    assert len(after.detections) < len(before.detections)
    folded = [d for d in after.detections if d.folded]
    assert folded and all(d.folded == ("tree" if d.prompt == "roof" else "roof",) for d in folded)
    kept = {(d.prompt, d.score) for d in after.detections}
    best = max(before.detections, key=lambda d: d.score)
    assert (best.prompt, best.score) in kept  # the best score always keeps its object


def test_fold_keeps_the_better_score_and_names_the_folded_prompts() -> None:
    from batchseg.engines.sam3.postprocess import Candidates, fold
    from batchseg.engines.sam3.postprocess import Instance as Found

    masks = torch.full((4, 8, 8), -10.0)
    masks[0, :4, :4] = 10  # prompt 0, best
    masks[1, :4, :3] = 10  # prompt 1: IoU 12/16 = 0.75 with the first
    masks[2, :4, :4] = 10  # prompt 0 again: the same prompt is never folded
    masks[3, 4:, 4:] = 10  # prompt 1 elsewhere
    found = [
        Found(p, k, s, (0.0, 0.0, 1.0, 1.0))
        for k, (p, s) in enumerate([(0, 0.9), (1, 0.8), (0, 0.7), (1, 0.6)])
    ]
    kept = fold(Candidates(found, masks), 0.75, 0.5)
    assert [(i.query, i.folded) for i in kept.instances] == [(0, (1,)), (2, ()), (3, ())]
    assert torch.equal(kept.masks, masks[[0, 2, 3]])
    assert [i.query for i in fold(Candidates(found, masks), 0.76, 0.5).instances] == [0, 1, 2, 3]


def test_a_tiled_run_through_the_pool_gives_each_tile_its_boxes(tiny_model: Path, tmp_path: Path) -> None:
    """python -m batchseg's own path: the pool, the tiler, the worker's writer, a merged label map."""
    import pyarrow.parquet as pq

    from batchseg.runner import run

    folder = tmp_path / "in"
    save_noise_image(folder / "big.png", 200, 140, seed=5)  # 6 tiles of 128
    boxes = boxes_file(tmp_path, ["big.png,10,10,50,50,1,roof"])

    def scores(exemplars: Path | None, out: str) -> list[float]:
        config = RunConfig(
            input=folder, output=tmp_path / out, prompts=("roof",), model=str(tiny_model), device="cpu",
            dtype="float32", threshold=0.0, max_detections=KEPT, workers=1, tile="128", tile_overlap=64,
            exemplars=ExemplarsKind().from_text(str(exemplars)) if exemplars else None,
        )  # fmt: skip
        assert run(config).exit_code == 0
        table = pq.read_table(tmp_path / out / "manifest" / "detections.parquet").to_pylist()
        assert table and {r["path"] for r in table} == {"big.png"}
        return sorted(r["score"] for r in table)

    assert scores(boxes, "boxed") != scores(None, "text")


def test_a_padded_sub_batch_gives_its_images_their_own_boxes(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    """A short sub-batch padded to the full batch (``Sam3Engine.pad_rows``, on by default on a
    GPU) repeats its last image, boxes included; its images' results are those of a run without
    padding."""
    boxes = boxes_file(tmp_path, ["a.png,20,10,70,50,1,roof"])
    todo = [Item("c.png", 0, 0), Item("a.png", 0, 0)]
    padded = engine_for(tiny_model, images, ("roof",), boxes, batch_size=3)
    padded.pad_short = True
    rows: list[int] = []
    forward = padded.model.forward

    def counted(**kwargs: Any) -> Any:  # the decoders' calls: rows of vision features each
        rows.append(kwargs["vision_embeds"].fpn_hidden_states[0].shape[0])
        return forward(**kwargs)

    padded.model.forward = counted
    got = written(padded, todo)
    # The rows with boxes first (a and the padding row, its copy), then those without (c).
    assert rows == [2, 1]
    want = written(engine_for(tiny_model, images, ("roof",), boxes, batch_size=3), todo)
    for x, y in zip(got, want, strict=True):
        assert kept_from(scores_of(x, "roof"), scores_of(y, "roof"))
        assert len(x.detections) == len(y.detections)
