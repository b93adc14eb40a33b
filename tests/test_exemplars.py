"""Exemplar boxes, a class and a threshold per prompt, and one object under one prompt, through real
runs of the colour engine (``batchseg.engines.threshold``), which reads exemplars exactly: a
positive box's median colour is a colour to find, a negative box's colour is excluded. Every
expected mask is the drawn one, pixel for pixel: on a PNG (boxes in pixels), a GeoTIFF (boxes in
map coordinates of another CRS, reprojected) and the same GeoTIFF run in tiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchseg.cli import cli
from batchseg.config import RunConfig
from batchseg.errors import BadValueError, ConfigError
from batchseg.exemplars import ExemplarsKind, load_exemplars, unplaced, within
from batchseg.imageio import read_label_map
from batchseg.options import by_name
from batchseg.prompting import fold_duplicates
from batchseg.runner import run

ENGINE = "batchseg.engines.threshold:load"
GREY = (128, 128, 128)
RED, NEAR_RED, FAR_RED = (200, 40, 40), (206, 40, 40), (212, 40, 40)  # NEAR within 8 of both others
GREEN, BLUE = (40, 200, 40), (40, 40, 200)
#: Patches (x0, y0, x1, y1, pixel edges) of the 120 x 80 picture and their colours.
PATCHES = {
    "red_a": ((10, 10, 30, 30), RED),
    "red_b": ((70, 50, 90, 70), RED),
    "near": ((40, 10, 55, 25), NEAR_RED),
    "far": ((95, 10, 110, 25), FAR_RED),
    "green": ((40, 45, 60, 65), GREEN),
    "blue": ((5, 50, 25, 70), BLUE),
}


def picture(names: tuple[str, ...] = tuple(PATCHES)) -> np.ndarray:
    pixels = np.full((80, 120, 3), GREY, np.uint8)
    for name in names:
        (x0, y0, x1, y1), colour = PATCHES[name]
        pixels[y0:y1, x0:x1] = colour
    return pixels


def mask_of(*names: str) -> np.ndarray:
    mask = np.zeros((80, 120), bool)
    for name in names:
        x0, y0, x1, y1 = PATCHES[name][0]
        mask[y0:y1, x0:x1] = True
    return mask


def write_csv(path: Path, rows: list[str], header: str = "path,x0,y0,x1,y1,label,prompt") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def config_for(folder: Path, exemplars: Path | None, **changes: Any) -> RunConfig:
    given = ExemplarsKind().from_text(str(exemplars)) if exemplars is not None else None
    return RunConfig(input=folder, engine=ENGINE, workers=1, exemplars=given, **changes)


def found(output: Path) -> dict[str, list[dict[str, Any]]]:
    """detections.parquet's rows per image."""
    rows = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    return by_path


def painted(output: Path, rel: str, suffix: str = ".png") -> np.ndarray:
    return read_label_map(output / "masks" / f"{rel}{suffix}")


def test_a_positive_box_finds_exactly_its_colour_in_its_own_image(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "a.png")
    Image.fromarray(picture()).save(folder / "b.png")  # the same colours, no box: nothing found
    boxes = write_csv(tmp_path / "boxes.csv", ["a.png,14,14,20,20,1,roof", "gone.png,1,1,5,5,1,roof"])
    config = config_for(folder, boxes, output=tmp_path / "out", classes=(("roof", "building"),))
    summary = run(config)
    assert summary.exit_code == 0
    rows = found(summary.output_dir)
    assert "b.png" not in rows
    assert [(r["prompt"], r["class"], r["box_x0"], r["box_y0"]) for r in rows["a.png"]] == [
        ("roof", "building", 10.0, 10.0),
        ("roof", "building", 40.0, 10.0),  # NEAR_RED is within the tolerance of the box's colour
        ("roof", "building", 70.0, 50.0),
    ]
    labels = painted(summary.output_dir, "a.png")
    assert np.array_equal(labels > 0, mask_of("red_a", "near", "red_b"))
    log = next((summary.output_dir / "logs").glob("*.log")).read_text(encoding="utf-8")
    assert "1 of 2 exemplar box(es) in boxes.csv fall in no image" in log
    assert "boxes.csv line 3 (gone.png): its image is not an input, or does not hold it whole" in log


def test_a_negative_box_excludes_its_colour_and_text_prompts_keep_theirs(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "a.png")
    # No prompt column: the boxes go with every text prompt (here the one colour, blue).
    boxes = write_csv(
        tmp_path / "boxes.csv", ["a.png,14,14,20,20,1", "a.png,100,15,105,20,0"], "path,x0,y0,x1,y1,label"
    )
    summary = run(config_for(folder, boxes, output=tmp_path / "out", prompts=("#2828c8",)))
    rows = found(summary.output_dir)["a.png"]
    # In the order of their first pixel, row by row.
    assert [(r["prompt"], r["box_x0"]) for r in rows] == [
        ("#2828c8", 10.0),
        ("#2828c8", 5.0),
        ("#2828c8", 70.0),
    ]
    assert [r["class"] for r in rows] == ["#2828c8"] * 3  # no --class: the prompt is the class
    labels = painted(summary.output_dir, "a.png")
    assert np.array_equal(labels > 0, mask_of("red_a", "red_b", "blue"))  # NEAR_RED excluded


# -- map coordinates -------------------------------------------------------------------------------


def write_geotiff(path: Path, pixels: np.ndarray, **extra: Any) -> None:
    import rasterio
    from affine import Affine

    grid = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)  # UTM 33N, 0.5 m pixels
    profile = dict(driver="GTiff", width=pixels.shape[1], height=pixels.shape[0], count=3, dtype="uint8")
    with rasterio.open(path, "w", crs="EPSG:32633", transform=grid, **profile, **extra) as dst:
        dst.write(pixels.transpose(2, 0, 1))


def geojson_box(path: Path, pixel_box: tuple[float, float, float, float], label: int = 1) -> Path:
    """A GeoJSON (WGS 84) polygon around ``pixel_box`` of the GeoTIFF's grid, as a GIS user draws it."""
    from pyproj import Transformer

    to_wgs84 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    x0, y0, x1, y1 = pixel_box
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    ring = [list(to_wgs84.transform(500000.0 + 0.5 * c, 4100000.0 - 0.5 * r)) for c, r in corners]
    feature = {
        "type": "Feature",
        "properties": {"label": label, "prompt": "roof"},
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}), encoding="utf-8")
    return path


@pytest.mark.parametrize("tiling", [{}, {"tile": "64", "tile_overlap": 16}], ids=["whole", "tiled"])
def test_a_box_in_map_coordinates_finds_its_colour_on_a_geotiff(
    tmp_path: Path, tiling: dict[str, Any]
) -> None:
    pytest.importorskip("pyogrio")
    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(
        folder / "ortho.tif",
        picture(),
        **({"tiled": True, "blockxsize": 16, "blockysize": 16} if tiling else {}),
    )
    boxes = geojson_box(tmp_path / "roofs.geojson", (73, 53, 86, 66))  # inside red_b, reprojected
    summary = run(config_for(folder, boxes, output=tmp_path / "out", **tiling))
    assert summary.exit_code == 0
    rows = found(summary.output_dir)["ortho.tif"]
    assert sorted((r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]) for r in rows) == [
        (10.0, 10.0, 30.0, 30.0),
        (40.0, 10.0, 55.0, 25.0),
        (70.0, 50.0, 90.0, 70.0),
    ]
    assert {r["prompt"] for r in rows} == {"roof"}
    import rasterio

    mask = next((summary.output_dir / "masks").glob("ortho.tif*"))
    with rasterio.open(mask) as src:
        assert np.array_equal(src.read(1) > 0, mask_of("red_a", "near", "red_b"))


def test_placement_whole_image_and_tiles(tmp_path: Path) -> None:
    """A box applies to the image that holds it whole, and to each tile that holds it whole."""
    (tmp_path / "a.png").parent.mkdir(exist_ok=True)
    Image.fromarray(picture()).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a PNG")  # unreadable: its own status says so
    rows = ["a.png,10,10,20,20,1,x", "a.png,110,70,121,80,1,x", "broken.png,1,1,2,2,1,x"]
    boxes = write_csv(tmp_path / "b.csv", rows)
    config = config_for(tmp_path, boxes)
    exemplars = load_exemplars(config)
    assert exemplars is not None
    placed = exemplars.place("a.png", 120, 80, None)
    assert [p.box for p in placed] == [(10.0, 10.0, 20.0, 20.0)]  # the second crosses the edge
    assert [e.where for e in unplaced(exemplars, tmp_path, ["a.png", "broken.png"])] == ["b.csv line 3"]
    assert [e.where for e in unplaced(exemplars, tmp_path, ["a.png"])] == ["b.csv line 3", "b.csv line 4"]
    assert within((10.0, 10.0, 20.0, 20.0), (0, 0, 64, 64)) == (10.0, 10.0, 20.0, 20.0)
    assert within((10.0, 10.0, 20.0, 20.0), (8, 8, 72, 72)) == (2.0, 2.0, 12.0, 12.0)
    assert within((10.0, 10.0, 20.0, 20.0), (16, 0, 80, 64)) is None  # cut by the tile's edge


def test_the_file_is_part_of_the_fingerprint_by_content(tmp_path: Path) -> None:
    one = write_csv(tmp_path / "one.csv", ["a.png,1,1,5,5,1,x"])
    two = write_csv(tmp_path / "two.csv", ["a.png,1,1,5,5,1,x"])
    first, second = (config_for(tmp_path, p) for p in (one, two))
    assert first.fingerprint() == second.fingerprint()  # another path, the same boxes
    write_csv(two, ["a.png,1,1,6,5,1,x"])
    assert config_for(tmp_path, two).fingerprint() != first.fingerprint()
    with pytest.raises(ConfigError, match="changed since"):
        load_exemplars(second)  # the file changed after its configuration was made
    stored = RunConfig.from_dict(first.to_dict())
    assert stored.exemplars == first.exemplars
    unset = RunConfig(input=tmp_path, prompts=("x",)).fingerprint_fields()
    assert not {"exemplars", "classes", "prompt_thresholds", "suppress_iou"} & set(unset)  # as before them


def test_a_bad_exemplar_file_is_refused_before_any_image(tmp_path: Path) -> None:
    with pytest.raises(BadValueError, match="no exemplar file"):
        ExemplarsKind().from_text(str(tmp_path / "nothing.csv"))
    bad = write_csv(tmp_path / "bad.csv", ["a.png,5,1,2,5,1"])
    with pytest.raises(ConfigError, match="line 2: a box needs x0 < x1"):
        load_exemplars(config_for(tmp_path, bad))
    lacking = write_csv(tmp_path / "lacking.csv", ["a.png,1,1,2"], "path,x0,y0,x1")
    with pytest.raises(ConfigError, match="lacks the column"):
        load_exemplars(config_for(tmp_path, lacking))


# -- a class and a threshold per prompt; one object under one prompt ---------------------------------


def test_job_file_classes_thresholds_and_exemplars_through_the_cli(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "a.png")
    write_csv(tmp_path / "boxes.csv", ["a.png,44,49,56,61,1,lawn"])
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "in"\noutput = "out"\nengine = "{ENGINE}"\nworkers = 1\nprompt = ["#c82828", "#2828c8"]\n'
        'exemplars = "boxes.csv"\nclass = { "#c82828" = "roof", "#2828c8" = "roof", lawn = "grass" }\n'
        'prompt-threshold = ["#2828c8=0.5"]\nreport = true\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["run", "--job", str(job)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = found(tmp_path / "out")["a.png"]
    assert sorted((r["prompt"], r["class"]) for r in rows) == [
        ("#2828c8", "roof"),
        ("#c82828", "roof"),
        ("#c82828", "roof"),
        ("#c82828", "roof"),  # NEAR_RED is within the tolerance of #c82828
        ("lawn", "grass"),
    ]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert '<tr class="class-row"><th>roof</th><td class="n">4</td>' in page
    bad = CliRunner().invoke(
        cli, ["run", str(folder), "--engine", ENGINE, "--prompt", "red", "--class", "rooof=building"]
    )
    assert bad.exit_code == 2 and '--class "rooof": no such prompt' in bad.output


def test_a_prompt_threshold_keeps_only_the_better_scored(tmp_path: Path) -> None:
    """The scored colour engine (tests/scored_engine.py) scores a patch at x = 64 0.25, x = 128 0.5."""
    from fault_engine import write_settings

    folder = tmp_path / "in"
    folder.mkdir()
    pixels = np.zeros((24, 256, 3), np.uint8)
    pixels[10:14, 64:68] = (255, 0, 0)
    pixels[10:14, 128:132] = (255, 0, 0)
    pixels[10:14, 192:196] = (0, 0, 255)
    Image.fromarray(pixels).save(folder / "a.png")
    write_settings(folder, load_s=0)
    config = RunConfig(
        input=folder,
        output=tmp_path / "out",
        engine="scored_engine:load",
        workers=1,
        prompts=("red", "blue"),
        prompt_thresholds=(("red", 0.4),),
    )
    assert run(config).exit_code == 0
    rows = found(tmp_path / "out")["a.png"]
    assert [(r["prompt"], r["score"]) for r in rows] == [("red", 0.5), ("blue", 0.75)]
    assert np.count_nonzero(painted(tmp_path / "out", "a.png")) == 32


def test_one_object_under_two_prompts_is_folded_into_one(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture(("red_a", "red_b", "blue"))).save(folder / "a.png")
    prompts = ("#c82828", "#cc2828", "#2828c8")  # the first two both match every red patch
    config = RunConfig(
        input=folder, output=tmp_path / "out", engine=ENGINE, workers=1, prompts=prompts, suppress_iou=0.5
    )
    assert run(config).exit_code == 0
    rows = found(tmp_path / "out")["a.png"]
    assert [(r["prompt"], r["folded"]) for r in rows] == [
        ("#c82828", ["#cc2828"]),
        ("#c82828", ["#cc2828"]),
        ("#2828c8", None),
    ]
    assert np.array_equal(painted(tmp_path / "out", "a.png") > 0, mask_of("red_a", "red_b", "blue"))


def test_folding_holds_on_a_tiled_image(tmp_path: Path) -> None:
    """The same picture in 64-pixel tiles: each tile folds its duplicates, the merge keeps what was
    folded and folds again across tiles (``tiles.merge`` rule 6); the label map is the same."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture(("red_a", "red_b", "blue"))).save(folder / "a.png")
    prompts = ("#c82828", "#cc2828", "#2828c8")
    config = RunConfig(
        input=folder,
        output=tmp_path / "out",
        engine=ENGINE,
        workers=1,
        prompts=prompts,
        suppress_iou=0.5,
        tile="64",
    )
    assert run(config).exit_code == 0
    rows = found(tmp_path / "out")["a.png"]
    assert sorted((r["prompt"], r["box_x0"], r["folded"] or []) for r in rows) == [
        ("#2828c8", 5.0, []),
        ("#c82828", 10.0, ["#cc2828"]),
        ("#c82828", 70.0, ["#cc2828"]),
    ]
    labels = painted(tmp_path / "out", "a.png", ".tif")
    assert np.array_equal(labels > 0, mask_of("red_a", "red_b", "blue"))


def test_fold_duplicates_keeps_the_better_score() -> None:
    square = np.zeros((10, 10), bool)
    square[2:6, 2:6] = True
    shifted = np.roll(square, 1, axis=1)  # IoU 12 / 20 = 0.6
    kept, folded = fold_duplicates([square, shifted, square], ["a", "b", "a"], [0.5, 0.9, 0.7], 0.6)
    assert kept == [1] and folded == {1: ("a",)}
    kept, folded = fold_duplicates([square, shifted], ["a", "b"], [0.5, 0.9], 0.61)
    assert kept == [0, 1] and folded == {}


def test_prompt_maps_read_text_and_tables() -> None:
    kind = by_name("classes").kind
    assert kind.from_text("roof=building") == (("roof", "building"),)
    assert kind.from_toml({"roof": "building", "a=b": "c"}, Path()) == (("roof", "building"), ("a=b", "c"))
    assert by_name("prompt_thresholds").kind.from_toml(["roof=0.5"], Path()) == (("roof", 0.5),)
    with pytest.raises(BadValueError):
        by_name("prompt_thresholds").kind.from_text("roof=2")
    with pytest.raises(BadValueError):
        kind.from_text("roof")


def test_retry_reuses_the_stored_boxes_and_refuses_a_changed_file(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a PNG")  # invalid_input: something to retry
    boxes = write_csv(tmp_path / "boxes.csv", ["a.png,14,14,20,20,1,roof"])
    out = tmp_path / "out"
    run_args = ["run", str(folder), "--engine", ENGINE, "--exemplars", str(boxes), "--output", str(out)]
    first = CliRunner().invoke(cli, run_args)
    assert first.exit_code == 3, first.output
    retry_args = ["retry", str(out), "--status", "invalid_input"]
    again = CliRunner().invoke(cli, retry_args, catch_exceptions=False)
    assert again.exit_code == 3, again.output  # ran with the stored exemplars; broken.png still is
    assert len(found(out)["a.png"]) == 3
    write_csv(boxes, ["a.png,44,49,56,61,1,roof"])  # edited since the run began
    changed = CliRunner().invoke(cli, retry_args)
    assert changed.exit_code == 1 and "changed since this run's configuration was made" in changed.output
    resumed = CliRunner().invoke(cli, run_args)
    assert resumed.exit_code == 1 and "--exemplars:" in resumed.output  # the fingerprint holds the content
    assert "Pass --new-run" in resumed.output


def test_the_class_reaches_polygons_and_the_gis_export(tmp_path: Path) -> None:
    pytest.importorskip("pyogrio")
    import pyogrio

    folder = tmp_path / "in"
    folder.mkdir()
    write_geotiff(folder / "ortho.tif", picture())
    boxes = geojson_box(tmp_path / "roofs.geojson", (73, 53, 86, 66))
    config = config_for(
        folder,
        boxes,
        output=tmp_path / "out",
        prompts=("#2828c8",),
        classes=(("roof", "building"),),
        vectors=True,
    )
    assert run(config).exit_code == 0
    polygons = pq.read_table(tmp_path / "out" / "manifest" / "polygons.parquet").to_pylist()
    assert (
        sorted((p["prompt"], p["class"]) for p in polygons)
        == [("#2828c8", "#2828c8")] + [("roof", "building")] * 3
    )
    exported = CliRunner().invoke(cli, ["export", str(tmp_path / "out"), "--format", "gpkg"])
    assert exported.exit_code == 0, exported.output
    _meta, _fids, _geoms, fields = pyogrio.raw.read(tmp_path / "out" / "manifest" / "polygons.gpkg")
    names = list(pyogrio.read_info(tmp_path / "out" / "manifest" / "polygons.gpkg")["fields"])
    assert sorted(fields[names.index("class")].tolist()) == ["#2828c8", "building", "building", "building"]


def test_a_class_or_threshold_for_no_prompt_is_refused_for_any_engine(tmp_path: Path) -> None:
    """tests/patch_engine.py has no check of its own: preflight refuses the typo before any file."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "a.png")
    for given in ({"classes": (("rooof", "building"),)}, {"prompt_thresholds": (("rooof", 0.5),)}):
        config = RunConfig(
            input=folder, output=tmp_path / "out", engine="patch_engine:load", prompts=("roof",), **given
        )
        with pytest.raises(BadValueError, match='"rooof": no such prompt'):
            run(config)
        assert not (tmp_path / "out").exists()
