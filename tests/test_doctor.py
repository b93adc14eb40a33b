"""batchseg doctor: real checks on a good tiny model folder and on broken ones, plus the report format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchseg.doctor import FAIL, OK, WARNING, Check, doctor_exit_code, format_checks, gpu_check

GIB = 1024**3


def doctor_reports(models: list[str | None]) -> list[list[dict[str, Any]]]:
    """Run run_doctor on each model in one child process and return its checks as dicts.

    A child process because the doctor imports torch, and this test process is the parent of
    runs that must never hold torch; one child for all models pays the torch import once.
    """
    code = (
        "import json, sys, dataclasses\n"
        "from batchseg.doctor import run_doctor\n"
        "models = json.loads(sys.argv[1])\n"
        "print(json.dumps([[dataclasses.asdict(c) for c in run_doctor(m)] for m in models]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(models)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    reports: list[list[dict[str, Any]]] = json.loads(done.stdout.strip().splitlines()[-1])
    return reports


def by_name(report: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report}


@pytest.fixture(scope="module")
def reports(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("doctor-models")
    broken: dict[str, Path] = {}
    for case, remove in (("no-config", ["config.json"]), ("no-tokenizer", ["tokenizer.json"])):
        folder = shutil.copytree(tiny_model, base / case)
        for name in remove:
            (folder / name).unlink()
        broken[case] = folder
    corrupt = shutil.copytree(tiny_model, base / "corrupt-weights")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    broken["corrupt-weights"] = corrupt
    cases: dict[str, str | None] = {
        "none": None,
        "good": str(tiny_model),
        "missing-folder": str(base / "does-not-exist"),
        "hub-not-cached": "someone/not-a-cached-model",
        **{case: str(folder) for case, folder in broken.items()},
    }
    results = doctor_reports(list(cases.values()))
    return dict(zip(cases, results, strict=True))


def test_environment_checks_pass_here(reports: dict[str, list[dict[str, Any]]]) -> None:
    checks = by_name(reports["none"])
    for name in ("python", "torch", "transformers", "torchvision", "dtype", "threads"):
        assert checks[name]["level"] == OK, checks[name]
    assert checks["transformers"]["detail"].endswith("(Sam3Model and Sam3Processor present)")
    assert checks["torchvision"]["detail"].endswith("(operators work)")
    assert checks["dtype"]["detail"].startswith("--dtype auto picks ")
    assert " thread(s); " in checks["threads"]["detail"]
    assert checks["cuda"]["level"] in (OK, WARNING)
    assert checks["model"]["level"] == WARNING and checks["model"]["detail"].startswith("not checked")


def test_good_model_folder_is_complete_and_loads(
    reports: dict[str, list[dict[str, Any]]], tiny_model: Path
) -> None:
    checks = by_name(reports["good"])
    assert checks["model folder"] == {
        "name": "model folder",
        "level": OK,
        "detail": f"{tiny_model.resolve()} is complete",
    }
    assert checks["model load"]["level"] == OK
    assert checks["model load"]["detail"].startswith("loaded on cpu in float32 in ")
    assert doctor_exit_code([Check(**c) for c in reports["good"]]) == 0


@pytest.mark.parametrize(
    "case, missing",
    [("no-config", "config.json"), ("no-tokenizer", "tokenizer.json or vocab.json + merges.txt")],
)
def test_incomplete_model_folder_fails_naming_the_file(
    reports: dict[str, list[dict[str, Any]]], case: str, missing: str
) -> None:
    checks = by_name(reports[case])
    assert checks["model folder"]["level"] == FAIL
    assert checks["model folder"]["detail"].endswith(f"is incomplete: missing {missing}")
    assert "model load" not in checks  # an incomplete folder is not loaded: the failure would mislead
    report = [Check(**c) for c in reports[case]]
    assert doctor_exit_code(report) == 1
    assert "[FAIL] model folder" in format_checks(report)


def test_missing_folder_and_corrupt_weights_fail(reports: dict[str, list[dict[str, Any]]]) -> None:
    missing = by_name(reports["missing-folder"])["model folder"]
    assert missing["level"] == FAIL and missing["detail"].endswith("does-not-exist does not exist")
    corrupt = by_name(reports["corrupt-weights"])
    assert corrupt["model folder"]["level"] == OK
    assert corrupt["model load"]["level"] == FAIL
    assert corrupt["model load"]["detail"].startswith("cannot load SAM3 model from folder ")


def test_uncached_hub_id_is_a_warning_not_a_download(reports: dict[str, list[dict[str, Any]]]) -> None:
    check = by_name(reports["hub-not-cached"])["model"]
    assert check["level"] == WARNING
    assert check["detail"].startswith(
        "'someone/not-a-cached-model' is a hub id and is not in the local hub cache"
    )


# ----------------------------------------------------------------------------- pure parts


def test_low_free_vram_warns_for_fp16_batch_1() -> None:
    low = gpu_check(0, "NVIDIA GeForce GTX 1650", (7, 5), int(3.2 * GIB), 4 * GIB)
    assert low == Check(
        "gpu cuda:0",
        WARNING,
        "NVIDIA GeForce GTX 1650, compute capability 7.5, 3.2 of 4.0 GiB free: under 4 GiB free, use "
        "--dtype float16 --batch-size 1 (SAM3 may still not fit; close other programs using the GPU)",
    )
    roomy = gpu_check(1, "NVIDIA RTX A6000", (8, 6), 40 * GIB, 48 * GIB)
    assert roomy == Check("gpu cuda:1", OK, "NVIDIA RTX A6000, compute capability 8.6, 40.0 of 48.0 GiB free")


def test_format_and_exit_code() -> None:
    checks = [
        Check("python", OK, "3.11.7"),
        Check("cuda", WARNING, "no CUDA GPU"),
        Check("model folder", FAIL, "model folder x is incomplete: missing config.json"),
    ]
    assert format_checks(checks) == (
        "[ok]   python        3.11.7\n"
        "[warn] cuda          no CUDA GPU\n"
        "[FAIL] model folder  model folder x is incomplete: missing config.json\n"
        "1 check(s) failed, 1 warning(s): fix the failures before a run"
    )
    assert doctor_exit_code(checks) == 1
    assert doctor_exit_code(checks[:2]) == 0
    assert format_checks(checks[:2]).endswith("\nall checks passed (1 warning(s))")
    assert format_checks(checks).isascii()  # cp1252 consoles and redirected task output
