"""``batchseg doctor``: check the installation once, before a night of unattended work.

Each check gives a :class:`Check` with level ``ok``, ``warning`` or ``fail`` and one line of detail a
user can act on. A check that breaks unexpectedly is reported as a failed check, never as a crash:
the doctor must still print its list when the installation is badly broken.

torch and transformers are imported inside the check functions only.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Check", "FAIL", "OK", "WARNING", "doctor_exit_code", "format_checks", "gpu_check", "run_doctor"]

OK = "ok"
WARNING = "warning"
FAIL = "fail"

#: Below this much free GPU memory, SAM3 runs only in float16 with batch size 1, if at all.
LOW_VRAM_BYTES = 4 * 1024**3
_GIB = 1024**3


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    level: str  # ok | warning | fail
    detail: str


def run_doctor(model: str | None) -> list[Check]:
    """Run every check; ``model`` (a folder or hub id) is also validated and loaded when given."""
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("python", _python),
        ("torch", _torch),
        ("transformers", _transformers),
        ("torchvision", _torchvision),
        ("cuda", _cuda),
        ("dtype", _dtype_auto),
        ("threads", _threads),
        ("geo", _geo),
        ("model", lambda: _model(model)),
    ]
    checks: list[Check] = []
    for name, step in steps:
        try:
            checks.extend(step())
        except Exception as exc:  # a broken install must still get its whole report
            checks.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return checks


def format_checks(checks: list[Check]) -> str:
    """The report as aligned plain-ASCII lines, then a one-line verdict."""
    marks = {OK: "[ok]  ", WARNING: "[warn]", FAIL: "[FAIL]"}
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{marks.get(c.level, '[?]   ')} {c.name:<{width}}  {c.detail}" for c in checks]
    n_fail = sum(c.level == FAIL for c in checks)
    n_warn = sum(c.level == WARNING for c in checks)
    if n_fail:
        lines.append(f"{n_fail} check(s) failed, {n_warn} warning(s): fix the failures before a run")
    else:
        lines.append(f"all checks passed ({n_warn} warning(s))")
    return "\n".join(lines)


def doctor_exit_code(checks: list[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail the doctor)."""
    return 1 if any(c.level == FAIL for c in checks) else 0


# ------------------------------------------------------------------------------ versions


def _python() -> list[Check]:
    version = platform.python_version()
    where = f"{version} ({sys.executable}, {platform.system()} {platform.machine()})"
    return [Check("python", OK, where)]  # older Pythons cannot install batchseg at all


def _torch() -> list[Check]:
    try:
        import torch
    except Exception as exc:  # ImportError, or an OSError from a broken CUDA DLL on Windows
        return [Check("torch", FAIL, f"cannot import torch: {type(exc).__name__}: {exc}")]
    cuda = torch.version.cuda
    build = f"CUDA {cuda} build" if cuda else "CPU-only build"
    return [Check("torch", OK, f"{torch.__version__} ({build})")]


def _transformers() -> list[Check]:
    try:
        import transformers
    except Exception as exc:
        return [Check("transformers", FAIL, f"cannot import transformers: {type(exc).__name__}: {exc}")]
    version = transformers.__version__
    try:
        from transformers import Sam3Model, Sam3Processor  # noqa: F401
    except ImportError:
        return [
            Check("transformers", FAIL, f"{version} has no Sam3Model/Sam3Processor: install transformers 5.x")
        ]
    return [Check("transformers", OK, f"{version} (Sam3Model and Sam3Processor present)")]


def _torchvision() -> list[Check]:
    try:
        import torch
        import torchvision
        from torchvision.ops import batched_nms
    except Exception as exc:
        return [
            Check(
                "torchvision",
                FAIL,
                f"cannot import torchvision ({type(exc).__name__}: {exc}); SAM3's image processor needs it: "
                "install the torchvision release that matches your torch",
            )
        ]
    # A torchvision built for another torch imports but fails on its compiled operators.
    try:
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.5)
    except Exception as exc:
        return [
            Check(
                "torchvision",
                FAIL,
                f"{torchvision.__version__} imports but its operators fail ({type(exc).__name__}: {exc}): "
                f"it does not match torch {torch.__version__}",
            )
        ]
    return [Check("torchvision", OK, f"{torchvision.__version__} (operators work)")]


# ------------------------------------------------------------------------------ hardware


def _cuda() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = (
                f"torch {torch.__version__} is a CPU-only build; for a GPU install the CUDA build "
                "from pytorch.org"
            )
        else:
            why = f"torch has CUDA {torch.version.cuda} but sees no usable GPU (driver missing or too old?)"
        return [Check("cuda", WARNING, f"no CUDA GPU: runs on the CPU, many seconds per image; {why}")]
    count = torch.cuda.device_count()
    checks = [Check("cuda", OK, f"{count} GPU(s) visible, CUDA {torch.version.cuda}")]
    for index in range(count):
        checks.append(_gpu(index))
    return checks


def _gpu(index: int) -> Check:
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return gpu_check(
        index, torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), free, total
    )


def gpu_check(index: int, name: str, capability: tuple[int, int], free: int, total: int) -> Check:
    """The verdict on one GPU from what torch reports (bytes of free and total memory)."""
    major, minor = capability
    detail = f"{name}, compute capability {major}.{minor}, {free / _GIB:.1f} of {total / _GIB:.1f} GiB free"
    if free < LOW_VRAM_BYTES:
        return Check(
            f"gpu cuda:{index}",
            WARNING,
            f"{detail}: under 4 GiB free, use --dtype float16 --batch-size 1 (SAM3 may still not fit; "
            "close other programs using the GPU)",
        )
    return Check(f"gpu cuda:{index}", OK, detail)


def _dtype_auto() -> list[Check]:
    from .engines.sam3.model import resolve_device, resolve_dtype

    device = resolve_device("auto")
    dtype, reason = resolve_dtype(device, "auto")
    return [Check("dtype", OK, f"--dtype auto picks {dtype} on {device}: {reason.removeprefix('auto: ')}")]


def _threads() -> list[Check]:
    import torch

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    detail = f"torch uses {torch.get_num_threads()} thread(s); {cores} logical core(s)"
    if usable != cores:
        detail += f", {usable} usable by this process"
    return [Check("threads", OK, detail)]


def _geo() -> list[Check]:
    """The optional batchseg[geo] extra: GeoTIFF/world-file inputs, --vectors and export need it."""
    from .geo import GeoExtraMissing, geo_versions

    try:
        v = geo_versions()
    except GeoExtraMissing as exc:
        return [Check("geo", WARNING, f"not installed (georeferenced inputs and polygons need it): {exc}")]
    detail = f"GDAL {v['gdal']} (rasterio {v['rasterio']}), shapely {v['shapely']}, pyproj {v['pyproj']}"
    return [Check("geo", OK, f"{detail}, pyogrio {v['pyogrio']} (GDAL {v['gdal_pyogrio']})")]


# ------------------------------------------------------------------------------ model


def _model(model: str | None) -> list[Check]:
    from .config import DEFAULT_MODEL
    from .engines.sam3.model import looks_like_path

    if model is None:
        return [
            Check(
                "model",
                WARNING,
                f"not checked: give --model FOLDER (the default {DEFAULT_MODEL} is a gated hub model)",
            )
        ]
    folder = Path(os.path.expanduser(model))
    if folder.exists() or looks_like_path(model):
        return _local_model(model, folder)
    return _hub_model(model)


def _local_model(model: str, folder: Path) -> list[Check]:
    from .engines.sam3.model import validate_model_folder
    from .errors import ModelLoadError

    try:
        validate_model_folder(folder)
    except ModelLoadError as exc:
        return [Check("model folder", FAIL, str(exc))]
    checks = [Check("model folder", OK, f"{folder.resolve()} is complete")]
    checks.append(_load(model))
    return checks


def _hub_model(model: str) -> list[Check]:
    cached = _hub_cache_has(model)
    if not cached:
        return [
            Check(
                "model",
                WARNING,
                f"{model!r} is a hub id and is not in the local hub cache: the first run downloads it "
                "(gated models need access and `hf auth login`); a local folder is the usual choice",
            )
        ]
    return [Check("model", OK, f"{model!r} found in the local hub cache"), _load(model)]


def _hub_cache_has(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found: Any = try_to_load_from_cache(model, "config.json")
    return isinstance(found, str)


def _load(model: str) -> Check:
    """Load the model for real (CPU, float32): the only check that proves the weights are usable."""
    from .engines.sam3.model import load_model
    from .errors import BatchsegError

    started = time.perf_counter()
    try:
        loaded, _processor = load_model(model, "cpu", "float32")
    except BatchsegError as exc:
        return Check("model load", FAIL, str(exc))
    elapsed = time.perf_counter() - started
    n_params = sum(p.numel() for p in loaded.parameters())
    detail = f"loaded on cpu in float32 in {elapsed:.1f} s ({n_params / 1e6:.1f}M parameters)"
    return Check("model load", OK, detail)
