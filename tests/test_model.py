"""Model folders, devices, dtypes, threads and prompt limits, on the real tiny checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchseg.engines.sam3.model import (
    load_model,
    looks_like_path,
    max_prompt_tokens,
    resolve_device,
    resolve_dtype,
    validate_model_folder,
)
from batchseg.errors import ConfigError, ModelLoadError
from batchseg.worker.process import set_torch_threads

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def copy_of_tiny(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


# --- folder validation -----------------------------------------------------------------------


def test_complete_folder_is_valid(tiny_model: Path) -> None:
    validate_model_folder(tiny_model)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        (["config.json"], "config.json"),
        (["tokenizer.json"], "tokenizer.json"),
        (["model.safetensors"], "model.safetensors"),
        (["processor_config.json"], "processor_config.json"),
    ],
)
def test_missing_piece_is_named(copy_of_tiny: Path, remove: list[str], named: str) -> None:
    for name in remove:
        (copy_of_tiny / name).unlink()
    with pytest.raises(ModelLoadError, match=f"missing .*{named}"):
        validate_model_folder(copy_of_tiny)


def test_every_missing_piece_is_named_at_once(copy_of_tiny: Path) -> None:
    (copy_of_tiny / "config.json").unlink()
    (copy_of_tiny / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as info:
        validate_model_folder(copy_of_tiny)
    assert "config.json" in str(info.value) and "tokenizer.json" in str(info.value)


def test_bin_only_folder_is_refused(copy_of_tiny: Path) -> None:
    (copy_of_tiny / "model.safetensors").rename(copy_of_tiny / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        validate_model_folder(copy_of_tiny)


def test_sharded_index_with_a_missing_shard(copy_of_tiny: Path) -> None:
    (copy_of_tiny / "model.safetensors").rename(copy_of_tiny / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (copy_of_tiny / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        validate_model_folder(copy_of_tiny)


def test_absent_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        validate_model_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        validate_model_folder(tmp_path / "file")


@pytest.mark.parametrize(
    ("model_id", "is_path"),
    [
        ("facebook/sam3", False),
        ("./sam3", True),
        ("../models/sam3", True),
        ("/opt/models/sam3", True),
        ("~/sam3", True),
        ("models/facebook/sam3", True),
        ("C:\\models\\sam3", True),
        ("sam3", True),
        ("facebook/sam3/", True),
    ],
)
def test_looks_like_path(model_id: str, is_path: bool) -> None:
    assert looks_like_path(model_id) is is_path


# --- device and dtype ------------------------------------------------------------------------


def test_cpu_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU behaviour")
def test_auto_is_cpu_without_gpu_and_cuda_is_refused() -> None:
    assert resolve_device("auto") == "cpu"
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device(device)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_devices_on_a_gpu_machine() -> None:
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    name, reason = resolve_dtype("cuda:0", "auto")
    major = torch.cuda.get_device_capability(0)[0]
    assert name == ("bfloat16" if major >= 8 else "float16") and "compute capability" in reason


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", "auto:1", ""])
def test_unknown_devices(device: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        resolve_device(device)


def test_cpu_dtypes() -> None:
    assert resolve_dtype("cpu", "float32")[0] == "float32"
    assert resolve_dtype("cpu", "bfloat16")[0] == "bfloat16"
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        resolve_dtype("cpu", "float16")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("cpu", "int8")
    name, reason = resolve_dtype("cpu", "auto")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert name == ("bfloat16" if native else "float32")
    assert reason.startswith("auto:")


# --- loading ---------------------------------------------------------------------------------


def test_load_tiny(tiny_model: Path) -> None:
    model, processor = load_model(str(tiny_model), "cpu", "float32")
    assert type(model).__name__ == "Sam3Model" and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert processor.image_processor.size["height"] == model.config.vision_config.backbone_config.image_size
    model16, _ = load_model(str(tiny_model), "cpu", "bfloat16")
    assert model16.dtype == torch.bfloat16


def test_missing_relative_folder_is_not_a_hub_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="model folder nope does not exist"):
        load_model("./nope", "cpu", "float32")


def test_incomplete_folder_is_refused_before_transformers(copy_of_tiny: Path) -> None:
    (copy_of_tiny / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(copy_of_tiny), "cpu", "float32")


def test_corrupt_weights_become_model_load_error(copy_of_tiny: Path) -> None:
    weights = copy_of_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load SAM3 model") as info:
        load_model(str(copy_of_tiny), "cpu", "float32")
    assert info.value.__cause__ is not None


def test_processor_size_must_match_the_model(copy_of_tiny: Path) -> None:
    path = copy_of_tiny / "processor_config.json"
    data = json.loads(path.read_text())
    data["image_processor"]["size"] = {"height": 1008, "width": 1008}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="1008x1008 but the model takes 112x112"):
        load_model(str(copy_of_tiny), "cpu", "float32")


def test_threads() -> None:
    before = torch.get_num_threads()
    try:
        set_torch_threads(1)
        assert torch.get_num_threads() == 1
        set_torch_threads(None)  # as they are
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- prompts ---------------------------------------------------------------------------------


def test_prompt_limit_comes_from_the_text_model(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert max_prompt_tokens(config) == 32
    model, _ = load_model(str(tiny_model), "cpu", "float32")
    assert max_prompt_tokens(model) == 32


def test_importing_model_rle_and_tiny_model_leaves_torch_out() -> None:
    # The parent process validates model folders; it must not pay for (or depend on) torch.
    code = (
        "import sys, batchseg.engines.sam3.model, batchseg.rle, batchseg.random_sam3; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
