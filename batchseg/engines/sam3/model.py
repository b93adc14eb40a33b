"""Finding, checking and loading a SAM3 model: device, dtype, threads and prompt limits.

Importing this module is cheap and never imports torch: ``validate_model_folder`` and
``looks_like_path`` are usable in the parent process. Everything that touches torch or transformers
imports it inside the function, and is meant for worker processes (or a short-lived helper process).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ...errors import ConfigError, ModelLoadError
from ...values import looks_like_path

__all__ = [
    "DTYPES",
    "load_model",
    "looks_like_path",
    "max_prompt_tokens",
    "resolve_device",
    "resolve_dtype",
    "validate_model_folder",
]

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def validate_model_folder(path: Path) -> None:
    """Check that ``path`` holds a complete safetensors SAM3 checkpoint; raise ModelLoadError naming
    every missing piece. Catches what transformers would otherwise accept silently (a missing
    config.json falls back to full-size defaults; a missing tokenizer.json gives a 2-token vocabulary).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {path} is not a folder (expected a folder with config.json, "
            "model.safetensors and tokenizer files)"
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    missing.extend(_missing_weights(path))
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        missing.append(" or ".join(_TOKENIZER_FILES))
    if not any((path / name).is_file() for name in _PROCESSOR_FILES):
        missing.append(" or ".join(_PROCESSOR_FILES))
    if missing:
        raise ModelLoadError(f"model folder {path} is incomplete: missing {', '.join(missing)}")


def _missing_weights(path: Path) -> list[str]:
    if (path / "model.safetensors").is_file():
        return []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"model folder {path}: cannot read {index.name}: {exc}") from exc
        return sorted(str(s) for s in shards if not (path / s).is_file())
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ModelLoadError(
            f"model folder {path} holds only PyTorch pickle weights (.bin/.pt); batchseg loads safetensors "
            "only, because pickle files can run code when loaded. Convert them with "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    return ["model.safetensors (or model.safetensors.index.json with its shards)"]


def resolve_device(device: str) -> str:
    """Turn ``auto|cpu|cuda|cuda:N`` into a device torch accepts. ``auto`` picks ``cuda`` when a GPU
    is usable, else ``cpu``. Asking for CUDA where there is none raises ConfigError: never a silent
    CPU run."""
    match = _DEVICE_RE.match(device.strip().lower())
    if match is None:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index is not None:
            raise ConfigError(f"unknown device {device!r}: use cpu without an index")
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if kind == "auto":
        if index is not None:
            raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
        return "cuda" if available else "cpu"
    if not available:
        raise ConfigError(
            f"device {device!r} was asked for but no CUDA GPU is usable here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "use --device cpu or --device auto"
        )
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return f"cuda:{index}" if index is not None else "cuda"


def resolve_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Pick the compute dtype for ``device``; returns (dtype name, one-line reason).

    ``auto``: bfloat16 on CUDA GPUs of compute capability 8.0 or newer; float16 on older ones
    (Pascal, Volta, Turing have no fast bfloat16); on CPU bfloat16 where the processor has native
    bfloat16 instructions (AVX512-BF16 or AMX), else float32 (docs/performance.md has the
    comparison). An explicit dtype the device cannot run raises ConfigError.
    """
    dtype = dtype.strip().lower()
    if dtype not in (*DTYPES, "auto"):
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    device = resolve_device(device)
    if device == "cpu":
        return _cpu_dtype(dtype)
    return _cuda_dtype(device, dtype)


def _cpu_dtype(dtype: str) -> tuple[str, str]:
    if dtype == "float16":
        raise ConfigError("dtype float16 is not supported on CPU: use bfloat16 or float32")
    native = _cpu_has_native_bf16()
    if dtype != "auto":
        return dtype, f"{dtype} asked for"
    if native:
        return "bfloat16", "auto: native bfloat16 on this CPU (3x faster than float32, half the memory)"
    return "float32", "auto: this CPU has no native bfloat16 instructions, float32 is faster"


def _cpu_has_native_bf16() -> bool:
    import torch

    # torch.cpu's probes are private; a missing probe means an unknown CPU, so stay on float32.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def _cuda_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    capability = f"compute capability {major}.{minor}"
    if dtype == "bfloat16" and major < 8:
        raise ConfigError(
            f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer ({device} has "
            f"{capability}): use float16 or float32"
        )
    if dtype != "auto":
        return dtype, f"{dtype} asked for"
    if major >= 8:
        return "bfloat16", f"auto: {capability} runs bfloat16 natively"
    return "float16", f"auto: {capability} has no fast bfloat16; float16 halves memory and time"


def load_model(model_id: str, device: str, dtype: str) -> tuple[Any, Any]:
    """Load ``Sam3Model`` and ``Sam3Processor`` onto ``device`` in ``dtype`` (``auto`` allowed for both).

    A local folder is validated first and loaded offline (``local_files_only``); a hub id goes to the
    hub. Safetensors only, never ``trust_remote_code``. Every failure becomes ModelLoadError.
    """
    device = resolve_device(device)
    dtype_name, _ = resolve_dtype(device, dtype)
    source, local = _model_source(model_id)
    import torch
    import transformers
    from transformers import Sam3Model, Sam3Processor

    # Progress bars in worker logs are noise: one line per shard per worker.
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    options: dict[str, Any] = {"use_safetensors": True, "local_files_only": local}
    try:
        model: Any = Sam3Model.from_pretrained(source, dtype=getattr(torch, dtype_name), **options)
        model = model.to(device).eval()
        processor = Sam3Processor.from_pretrained(source, local_files_only=local)
    except Exception as exc:  # any transformers/torch/OS error: the caller needs one error type
        raise ModelLoadError(
            f"cannot load SAM3 model {_describe(model_id, local)}: {type(exc).__name__}: {exc}"
        ) from exc
    _check_sizes_agree(model, processor, model_id)
    return model, processor


def _model_source(model_id: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    path = Path(os.path.expanduser(model_id))
    if path.exists() or looks_like_path(model_id):
        validate_model_folder(path)
        return str(path), True
    return model_id, False


def _describe(model_id: str, local: bool) -> str:
    if local:
        return f"from folder {model_id!r}"
    return f"{model_id!r} from the Hugging Face hub (no local folder of that name exists)"


def _check_sizes_agree(model: Any, processor: Any, model_id: str) -> None:
    # A processor resizing to another size than the model's crashes deep in the RoPE code.
    model_size = int(model.config.vision_config.backbone_config.image_size)
    size = processor.image_processor.size
    proc_size = (int(size["height"]), int(size["width"]))
    if proc_size != (model_size, model_size):
        raise ModelLoadError(
            f"model {model_id!r}: the processor resizes images to {proc_size[0]}x{proc_size[1]} "
            f"but the model takes {model_size}x{model_size}; fix 'size' in its processor_config.json"
        )


def max_prompt_tokens(model_or_config: Any) -> int:
    """How many tokens (start and end tokens included) the model's text encoder reads at most.

    Accepts a Sam3Model, a Sam3Config, or config.json's content as a dict."""
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, dict):
        return int(config.get("text_config", {}).get("max_position_embeddings", 32))
    return int(config.text_config.max_position_embeddings)
