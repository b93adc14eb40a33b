"""The whole product through the CLI on the tiny random SAM3: real workers, real files, real Parquet.

Set up through the library (fixtures), run through the CLI, check through pyarrow, pycocotools and
the mask files on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import make_image
from pycocotools import mask as mask_utils

from batchseg.cli import cli
from batchseg.imageio import read_label_map

# Every run a test here starts (its workers and merge helpers too) is gone when the test ends.
pytestmark = pytest.mark.usefixtures("no_process_left")


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_args(folder: Path, output: Path, model: Path, *extra: str) -> list[str | Path]:
    return [
        "run",
        folder,
        "--model",
        model,
        "--output",
        output,
        "--device",
        "cpu",
        "--threshold",
        "0",
        "--max-detections",
        "4",
        "--timeout",
        "60",
        *extra,
    ]


def read_manifests(output: Path) -> tuple[list[dict], list[dict]]:
    images = pq.read_table(output / "manifest" / "images.parquet").to_pylist()
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    return images, detections


def check_masks_match_detections(output: Path, images: list[dict], detections: list[dict]) -> None:
    """Every ok image: its label map holds exactly labels 1..n, each equal to its detection's RLE."""
    by_path: dict[str, list[dict]] = {}
    for det in detections:
        by_path.setdefault(det["path"], []).append(det)
    for row in images:
        if row["status"] != "ok":
            continue
        labels = read_label_map(output / row["mask_path"])
        assert labels.shape == (row["height"], row["width"])
        dets = sorted(by_path.get(row["path"], []), key=lambda d: d["index"])
        assert len(dets) == row["n_detections"]
        assert [d["index"] for d in dets] == list(range(1, len(dets) + 1))
        assert set(np.unique(labels)) <= set(range(len(dets) + 1))
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True), "labels are numbered by descending score"
        for det in dets:
            rle = {"size": [det["mask_height"], det["mask_width"]], "counts": det["mask_rle"].encode()}
            decoded = mask_utils.decode(rle).astype(bool)
            assert np.array_equal(decoded, labels == det["index"]), det
            assert det["area_px"] == int(decoded.sum()) > 0
            assert 0 <= det["box_x0"] <= det["box_x1"] <= row["width"]
            assert 0 <= det["box_y0"] <= det["box_y1"] <= row["height"]


def test_run_writes_masks_and_manifests(image_folder: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = invoke(
        *run_args(image_folder, output, tiny_model, "--prompt", "roof", "--prompt", "solar panel")
    )
    assert result.exit_code == 0, result.output
    images, detections = read_manifests(output)
    assert [r["path"] for r in images] == ["a.jpg", "b.png", "sub/c.jpg", "sub/d.png", "sub/deeper/e.jpg"]
    assert {r["status"] for r in images} == {"ok"}
    assert all(r["attempts"] == 1 for r in images)
    assert all(r["mask_path"] == f"masks/{r['path']}.png" for r in images)
    # The tiny random model paints both prompts' masks alike, so the better-scored roofs may take
    # every pixel of the solar panels: a detection left without a pixel is no detection.
    assert "roof" in {d["prompt"] for d in detections} <= {"roof", "solar panel"}
    assert len(detections) == sum(r["n_detections"] for r in images) > 0
    check_masks_match_detections(output, images, detections)
    assert not list(output.rglob("*.batchseg-tmp")), "no temp files left behind"

    # The same command again resumes: nothing left to do, nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (output / "masks").rglob("*.png")}
    again = invoke(*run_args(image_folder, output, tiny_model, "--prompt", "roof", "--prompt", "solar panel"))
    assert again.exit_code == 0, again.output
    assert "processed 0 images" in again.output
    assert mtimes == {p: p.stat().st_mtime_ns for p in (output / "masks").rglob("*.png")}

    # Another prompt in the same folder is refused, naming what changed; --new-run starts afresh.
    refused = invoke(*run_args(image_folder, output, tiny_model, "--prompt", "tree"))
    assert refused.exit_code == 1
    assert "--prompt: " in refused.output and "--new-run" in refused.output


def test_bad_inputs_get_a_status_and_the_run_finishes(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    make_image(folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    good = (folder / "good.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    make_image(folder / "huge.png", (400, 300))
    output = tmp_path / "out"
    result = invoke(*run_args(folder, output, tiny_model, "--prompt", "roof", "--max-pixels", "100000"))
    assert result.exit_code == 3, result.output
    images, detections = read_manifests(output)
    status = {r["path"]: r["status"] for r in images}
    assert status == {
        "cut.jpg": "invalid_input",
        "empty.jpg": "invalid_input",
        "good.jpg": "ok",
        "huge.png": "invalid_input",
        "notes.png": "invalid_input",
    }
    messages = {r["path"]: r["error_message"] for r in images}
    assert "empty" in messages["empty.jpg"].lower() or "0 bytes" in messages["empty.jpg"]
    assert "100000" in messages["huge.png"].replace(",", "")
    check_masks_match_detections(output, images, detections)
    assert "batchseg retry" in result.output


@pytest.mark.parametrize("case", ["missing_input", "no_prompt", "bad_model"])
def test_fatal_errors_exit_1_or_2(case: str, image_folder: Path, tmp_path: Path) -> None:
    if case == "missing_input":
        result = invoke("run", tmp_path / "nowhere", "--prompt", "roof", "--output", tmp_path / "o")
        assert result.exit_code == 1 and "nowhere" in result.output
    elif case == "no_prompt":
        result = invoke("run", image_folder, "--output", tmp_path / "o")
        assert result.exit_code == 2 and "--prompt" in result.output
    else:
        broken = tmp_path / "broken-model"
        broken.mkdir()
        (broken / "model.safetensors").write_bytes(b"")
        result = invoke(
            "run",
            image_folder,
            "--prompt",
            "roof",
            "--output",
            tmp_path / "o",
            "--model",
            broken,
            "--device",
            "cpu",
            "--load-timeout",
            "60",
        )
        assert result.exit_code == 1
        assert "config.json" in result.output


def test_filtered_images_are_listed_as_skipped(image_folder: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = invoke(*run_args(image_folder, output, tiny_model, "--prompt", "roof", "--exclude", "sub/**"))
    assert result.exit_code == 0, result.output
    images, _ = read_manifests(output)
    status = {r["path"]: r["status"] for r in images}
    assert status == {
        "a.jpg": "ok",
        "b.png": "ok",
        "sub/c.jpg": "skipped",
        "sub/d.png": "skipped",
        "sub/deeper/e.jpg": "skipped",
    }
    assert not (output / "masks" / "sub").exists()
