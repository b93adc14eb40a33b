"""RunConfig: the settings of one run, resolved as CLI flags > BATCHSEG_* > job file > defaults.

Its fields and defaults are the run options declared in :mod:`batchseg.options`; this module adds
what a run does with them: the output folder, the fingerprint, the stored form. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .options import (
    DEFAULT_ENGINE,
    DEFAULT_MODEL,
    FINGERPRINT_UPGRADES,
    OPTIONS,
    RunOptions,
    fingerprint_options,
)
from .records import OUTPUT_FORMAT_VERSION

__all__ = ["RunConfig", "DEFAULT_MODEL", "DEFAULT_ENGINE", "FINGERPRINT_UPGRADES", "upgrade_fingerprint"]


@dataclass(frozen=True, kw_only=True)
class RunConfig(RunOptions):
    """All settings of one run. Frozen and picklable: it travels to the worker processes."""

    @property
    def output_dir(self) -> Path:
        if self.output is not None:
            return self.output
        return Path("output") / Path(self.input).resolve().name

    def with_changes(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the content of the outputs (the fingerprint options): a change needs --new-run."""
        values = {o.name: o.kind.to_fingerprint(getattr(self, o.name)) for o in fingerprint_options()}
        unset = {o.name for o in fingerprint_options() if o.quiet and getattr(self, o.name) == o.upgrade}
        return {**{k: v for k, v in values.items() if k not in unset}, "output_format": OUTPUT_FORMAT_VERSION}

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Every option in its stored (JSON) form."""
        return {o.name: o.kind.to_json(getattr(self, o.name)) for o in OPTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of ``to_dict`` (a stored configuration); unknown keys (``extra``, which earlier
        versions stored) are ignored."""
        known = {o.name: o.kind.from_json(data[o.name]) for o in OPTIONS if o.name in data}
        return cls(**known)


def upgrade_fingerprint(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored fingerprint with the fields later versions added, as the version that wrote it behaved."""
    return {**FINGERPRINT_UPGRADES, **stored}
