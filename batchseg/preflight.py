"""Every check of a run's configuration, made in the parent before anything is written.

A run refused for its configuration leaves the output folder as it found it (no checkpoint, lock,
log or folder of its own), so the corrected command just runs. What is read here is read without
a trace: the stored run of an existing output folder is peeked at, never opened for writing.
Torch-free: an engine's ``check`` hook runs here, in the parent.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .discover import check_input_folder
from .errors import BatchsegError
from .sources import check_geo_extra
from .store.checkpoint import CHECKPOINT_NAME, RunInfo, connect_readonly, read_run_info
from .store.db import check_fingerprint
from .store.manifest import read_manifest_run
from .supervise.contract import check_in_parent
from .supervise.settings import PoolSettings
from .supervise.tiling import Tiler

__all__ = ["Preflight", "preflight", "stored_run"]


@dataclass(frozen=True)
class Preflight:
    """A configuration that passed every check: ``config`` with ``--tile`` resolved, and the notes
    for the run's log (which does not exist yet)."""

    config: RunConfig
    notes: tuple[str, ...] = ()


def preflight(config: RunConfig, factory: str) -> Preflight:
    """Check ``config`` (paths already absolute) for a run of the engine ``factory``; raises the
    BatchsegError that ends the run: BadValueError (exit 2) for options that cannot go together,
    ConfigError for what the input or the engine refuses, ConfigMismatchError for another run's
    folder."""
    check_input_folder(config.input)  # before anything is stored for a folder that is not there
    stored = None if config.new_run else stored_run(config.output_dir)
    config, notes = _resolve_tile(config, stored)
    Tiler.check_options(config)
    PoolSettings.from_config(config)
    check_geo_extra(config, ())  # --vectors without the extra; georeferenced images once planned
    check_in_parent(factory, config)  # a value the engine cannot use is said before a mere change
    if stored is not None:
        check_fingerprint(config.output_dir, stored.fingerprint, config)
    return Preflight(config, notes)


def stored_run(output_dir: Path) -> RunInfo | None:
    """The run ``output_dir`` holds (its checkpoint's, else its manifest's), or None; read without
    creating a file. An unreadable checkpoint is left to the run, which says what is wrong."""
    path = output_dir / CHECKPOINT_NAME
    if path.is_file():
        try:
            conn = _peek(path)
        except (BatchsegError, sqlite3.Error):
            return None
        try:
            found = read_run_info(conn, path)
        except BatchsegError:
            return None
        finally:
            conn.close()
        if found is not None:
            return found
    return read_manifest_run(output_dir)


def _peek(path: Path) -> sqlite3.Connection:
    """A read-only connection that writes nothing. Without a write-ahead log beside it the file is
    whole and no run writes it (a writer keeps its log until it closes), so SQLite may read it as
    immutable; a plain read-only connection would leave an empty log and an index file behind.
    With a log (a live or killed run) the log holds committed pages: read it as usual."""
    if Path(f"{path}-wal").exists():
        return connect_readonly(path)
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None)


def _resolve_tile(config: RunConfig, stored: RunInfo | None) -> tuple[RunConfig, tuple[str, ...]]:
    """``--tile`` not given: ``auto`` for a new output folder, the stored value for an existing
    one, and ``off`` for a folder made before tiling existed (so it resumes as it was made)."""
    if config.tile is not None:
        return config, ()
    if stored is None:
        return config.with_changes(tile="auto"), ()
    tile = stored.config.get("tile")
    if tile is None:
        note = (
            "--tile not given: off, as in the run this output folder holds (made before tiling); "
            "pass --tile auto with --new-run to tile large images"
        )
        return config.with_changes(tile="off"), (note,)
    return config.with_changes(tile=str(tile)), ()
