"""Engines by name: the built-in names, a name another package registers, and resuming across the
name and its ``MODULE:FUNCTION``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from PIL import Image, ImageDraw

from batchseg.cli import cli
from batchseg.config import RunConfig
from batchseg.engine_names import BUILT_IN_ENGINES, ENTRY_POINT_GROUP, engine_target, known_engines
from batchseg.errors import BadValueError, ExitCode
from batchseg.runner import resolve_config
from batchseg.store.checkpoint import Checkpoint

THRESHOLD = "batchseg.engines.threshold:load"
#: The columns of images.parquet that two runs of the same images share (not times, pids, run ids).
KEPT = ("path", "width", "height", "status", "n_detections", "mask_path", "config_hash", "model_id")


def picture(path: Path, seed: int) -> Path:
    image = Image.new("RGB", (64, 48), (90, 90, 90))
    pen = ImageDraw.Draw(image)
    pen.rectangle([4 + seed, 6, 20 + seed, 30], fill=(255, 0, 0))
    pen.ellipse([30, 10 + seed, 50, 30 + seed], fill=(0, 0, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run(folder: Path, output: Path, engine: str) -> Result:
    args = ("--engine", engine, "--prompt", "red", "--prompt", "blue", "--workers", "1")
    return invoke("run", folder, "--output", output, *args)


def rows(output: Path, table: str = "images") -> list[dict[str, Any]]:
    found = pq.read_table(output / "manifest" / f"{table}.parquet").to_pylist()
    kept = [{k: v for k, v in r.items() if k in KEPT or (table != "images" and k != "run_id")} for r in found]
    return sorted(kept, key=str)


def stored_engine(output: Path) -> str:
    with Checkpoint.open_existing(output, read_only=True) as checkpoint:
        return str(checkpoint.stored_config()["engine"])


def test_a_built_in_name_runs_like_its_module_function(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for seed in range(2):
        picture(folder / f"p{seed}.png", seed)
    by_name, by_target = tmp_path / "by-name", tmp_path / "by-target"
    assert run(folder, by_name, "threshold").exit_code == ExitCode.OK
    assert run(folder, by_target, THRESHOLD).exit_code == ExitCode.OK
    assert stored_engine(by_name) == stored_engine(by_target) == THRESHOLD
    assert rows(by_name) == rows(by_target) and len(rows(by_name)) == 2
    assert all(r["status"] == "ok" and r["n_detections"] == 2 for r in rows(by_name))
    assert rows(by_name, "detections") == rows(by_target, "detections") != []
    named = RunConfig(input=folder, prompts=("red",), engine="threshold")  # the library, as the CLI
    assert resolve_config(named).engine == THRESHOLD
    for mask in (by_target / "masks").rglob("*.png"):
        assert (by_name / mask.relative_to(by_target)).read_bytes() == mask.read_bytes()


@pytest.mark.parametrize("first, then", [(THRESHOLD, "threshold"), ("threshold", THRESHOLD)])
def test_a_folder_resumes_under_the_other_spelling(tmp_path: Path, first: str, then: str) -> None:
    folder, output = tmp_path / "in", tmp_path / "out"
    picture(folder / "a.png", 0)
    assert run(folder, output, first).exit_code == ExitCode.OK
    done = rows(output)
    picture(folder / "b.png", 3)
    resumed = run(folder, output, then)
    assert resumed.exit_code == ExitCode.OK, resumed.output
    after = rows(output)
    assert len(after) == 2 and [r for r in after if r["path"] == "a.png"] == done
    assert stored_engine(output) == THRESHOLD


def test_an_unknown_name_is_refused_with_the_known_names(tmp_path: Path) -> None:
    picture(tmp_path / "in" / "a.png", 0)
    result = invoke("run", tmp_path / "in", "--engine", "treshold", "--prompt", "red")
    assert result.exit_code == ExitCode.USAGE
    assert 'no engine is named "treshold"; the known names are sam3, threshold' in result.output
    assert "did you mean 'threshold'?" in result.output
    with pytest.raises(BadValueError, match="known names"):
        engine_target("nothing-here")
    assert engine_target(" sam3 ") == BUILT_IN_ENGINES["sam3"] and engine_target("a.b:c") == "a.b:c"


ENGINE_MODULE = '''"""A third-party engine: the colour engine under another name."""
from batchseg.engines.threshold import load as load


class Plugin:
    """Entry points may name a class's function (``colour_plugin:Plugin.load``)."""

    @staticmethod
    def load(spec, slot):
        return load(spec, slot)
'''


def registered_package(site: Path) -> Path:
    """A package installed the way pip leaves one: its module and a dist-info folder whose
    entry_points.txt registers ``colours`` in the engines group."""
    site.mkdir(parents=True)
    (site / "colour_plugin.py").write_text(ENGINE_MODULE, encoding="utf-8")
    info = site / "colour_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: colour-plugin\nVersion: 1.0\n", encoding="utf-8"
    )
    points = (
        f"[{ENTRY_POINT_GROUP}]\ncolours = colour_plugin:load\nsam3 = colour_plugin:load\n"
        "colour-class = colour_plugin:Plugin.load\n"
    )
    (info / "entry_points.txt").write_text(points, encoding="utf-8")
    return site


def test_an_engine_registered_by_a_package_runs_by_name(tmp_path: Path) -> None:
    # A subprocess: the package is seen through PYTHONPATH, as an installed one would be, by the
    # parent and by its workers alike.
    site = registered_package(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    folder, output = tmp_path / "in", tmp_path / "out"
    picture(folder / "a.png", 0)

    def batchseg(*args: str | Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "batchseg", *map(str, args)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)

    done = batchseg(
        "run", folder, "--output", output, "--engine", "colours", "--prompt", "red", "--workers", "1"
    )
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert stored_engine(output) == "colour_plugin:load"
    assert [(r["status"], r["n_detections"]) for r in rows(output)] == [("ok", 1)]
    refused = batchseg("run", folder, "--output", tmp_path / "other", "--engine", "colour", "--prompt", "red")
    assert refused.returncode == ExitCode.USAGE
    assert "the known names are colour-class, colours, sam3, threshold" in refused.stderr
    assert "did you mean 'colours'?" in refused.stderr and not (tmp_path / "other").exists()
    by_method = batchseg(
        "run", folder, "--output", tmp_path / "m", "--engine", "colour-class", "--prompt", "red"
    )
    assert by_method.returncode == ExitCode.OK, by_method.stdout + by_method.stderr
    assert stored_engine(tmp_path / "m") == "colour_plugin:Plugin.load"
    # A package cannot take a built-in name: "sam3" stays batchseg's own.
    names = "from batchseg.engine_names import known_engines as k; print(k()['colours'], k()['sam3'])"
    seen = subprocess.run([sys.executable, "-c", names], env=env, capture_output=True, text=True, check=True)
    assert seen.stdout.split() == ["colour_plugin:load", BUILT_IN_ENGINES["sam3"]]
    assert "colours" not in known_engines()  # this process never saw the package
