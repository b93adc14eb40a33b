"""RunConfig: every option of ``batchseg run``, resolved as CLI flags > job file > defaults.

This module is imported by the parent process: it must never import torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .records import OUTPUT_FORMAT_VERSION

__all__ = ["RunConfig", "DEFAULT_MODEL", "DEFAULT_ENGINE", "upgrade_fingerprint"]

DEFAULT_MODEL = "facebook/sam3"
#: The engine factory (``MODULE:FUNCTION``) a run uses unless ``--engine`` names another.
DEFAULT_ENGINE = "batchseg.engines.sam3.engine:load_engine"

#: Fingerprint fields added after the first release, with the value that means what earlier
#: versions did: a stored fingerprint that lacks one reads as this, so old output folders resume.
FINGERPRINT_UPGRADES: dict[str, Any] = {"engine": DEFAULT_ENGINE}


@dataclass(frozen=True)
class RunConfig:
    """All settings of one run. Frozen and picklable: it travels to the worker processes."""

    input: Path
    prompts: tuple[str, ...]
    model: str = DEFAULT_MODEL
    engine: str = DEFAULT_ENGINE  # MODULE:FUNCTION that loads the engine in each worker
    output: Path | None = None  # None: output/<input folder name>/
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    threshold: float = 0.3
    mask_threshold: float = 0.5
    max_detections: int = 100  # per prompt, after the score filter
    max_pixels: int = 250_000_000  # larger images are refused as invalid_input (decompression bombs)
    workers: int | None = None  # None: one per GPU on CUDA, measured best on CPU
    threads: int | None = None  # torch threads per worker; None: cores / workers
    batch_size: int | None = None  # None: chosen from the device
    compile: bool = False  # torch.compile the ViT backbone on CUDA (faster after ~1 min per worker)
    cuda_graphs: bool = True  # replay the ViT backbone as a CUDA graph on CUDA (no launch cost)
    fuse_rope: bool = True  # CUDA: the ViT's rotary embedding as one fused kernel (torch.compile)
    timeout: float = 300.0  # seconds per image, from the worker's acknowledgement
    load_timeout: float = 600.0  # seconds for a worker to load the model
    max_attempts: int = 2
    max_images_per_worker: int | None = None  # recycle workers after this many images
    max_consecutive_failures: int = 20  # same error type this many times in a row stops the run
    deadline: str | None = None  # HH:MM local time: no new image starts after it
    max_runtime: float | None = None  # seconds
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    hash: bool = False  # detect changed inputs by content hash, not only size and mtime
    new_run: bool = False
    log_keep: int = 30  # log files kept in OUTPUT/logs
    progress_interval: float = 60.0  # seconds between plain progress lines when not on a TTY
    manifest_interval: float = 300.0  # seconds between manifest exports during a run
    backend: str = "local"  # local: worker processes here; ray: Ray actors (batchseg[ray])
    ray_address: str | None = None  # --backend ray: auto, HOST:PORT; None starts a local Ray
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def output_dir(self) -> Path:
        if self.output is not None:
            return self.output
        return Path("output") / Path(self.input).resolve().name

    def with_changes(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the content of the outputs: a change here needs --new-run."""
        return {
            "model": self.model,
            "engine": self.engine,
            "prompts": list(self.prompts),
            "threshold": self.threshold,
            "mask_threshold": self.mask_threshold,
            "max_detections": self.max_detections,
            "dtype": self.dtype,
            "max_pixels": self.max_pixels,
            "output_format": OUTPUT_FORMAT_VERSION,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of ``to_dict`` (a stored configuration); unknown keys are ignored."""
        known = {k: v for k, v in data.items() if k in cls.option_names()}
        for key in ("input", "output"):
            if known.get(key) is not None:
                known[key] = Path(known[key])
        for key in ("prompts", "include", "exclude"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]


def upgrade_fingerprint(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored fingerprint with the fields later versions added, as the version that wrote it behaved."""
    return {**FINGERPRINT_UPGRADES, **stored}
