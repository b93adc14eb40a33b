"""batchseg: unattended SAM3 segmentation of image folders.

The package's public API; the CLI (``batchseg.cli``) is one client of it. Importing batchseg never
imports torch (only the worker processes do), and names are loaded on first use so that a worker
process importing ``batchseg.engines.sam3.engine`` does not load the parent's machinery.

    from batchseg import RunConfig, run
    summary = run(RunConfig(input=Path("aerial"), prompts=("roof",), model="models/sam3"))
    print(summary.counts, summary.exit_code)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "RunConfig": "batchseg.config",
    "RunSummary": "batchseg.runner",
    "run": "batchseg.runner",
    "retry": "batchseg.runner",
    "Item": "batchseg.records",
    "ItemResult": "batchseg.records",
    "Detection": "batchseg.records",
    "Status": "batchseg.records",
    "BatchsegError": "batchseg.errors",
    "ConfigError": "batchseg.errors",
    "ConfigMismatchError": "batchseg.errors",
    "ModelLoadError": "batchseg.errors",
    "OutputError": "batchseg.errors",
    "RunLockedError": "batchseg.errors",
    "StoppedEarly": "batchseg.errors",
    "collect_status": "batchseg.status",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'batchseg' has no attribute {name!r}")
