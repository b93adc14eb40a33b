"""Every check of a run's configuration, made in the parent before anything is written.

A run refused for its configuration leaves the output folder as it found it (no checkpoint, lock,
log or folder of its own), so the corrected command just runs. What is read here is read without
a trace: the stored run of an existing output folder is peeked at, never opened for writing.
``FreshFolder`` covers what only a loaded engine can refuse. Torch-free: an engine's ``check``
hook runs here, in the parent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .config import RunConfig
from .discover import check_input_folder
from .errors import BatchsegError, ConfigError
from .exemplars import run_prompts
from .geo.detect import check_geo_extra
from .prompting import check_prompt_maps
from .remote import check_input, is_remote
from .store.checkpoint import CHECKPOINT_NAME, RunInfo, connect_readonly, read_run_info
from .store.db import check_fingerprint, resolve_tile
from .store.manifest import read_manifest_run
from .store.tables import MANIFEST_DIR
from .supervise.settings import PoolSettings
from .worker.contract import check_in_parent
from .worker.tiling import Tiler

__all__ = ["FreshFolder", "Preflight", "preflight", "stored_run"]

#: What makes a folder hold a run: a configuration error never removes a thing from one.
RUN_MARKERS = frozenset({CHECKPOINT_NAME, MANIFEST_DIR})


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
    # before anything is stored for a folder (or an S3 bucket) that is not there
    (check_input if is_remote(config.input) else check_input_folder)(config.input)
    stored = None if config.new_run else stored_run(config.output_dir)
    config, notes = _resolve_tile(config, stored)
    Tiler.check_options(config)
    PoolSettings.from_config(config)
    check_geo_extra(config, ())  # --vectors without the extra; georeferenced images once planned
    check_in_parent(factory, config)  # a value the engine cannot use is said before a mere change
    check_prompt_maps(config, run_prompts(config))  # --class / --prompt-threshold name prompts, any engine
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
    """``--tile`` not given: resolved as ``Checkpoint.open`` resolves it (``store.db.resolve_tile``)."""
    config, note = resolve_tile(config, stored)
    return config, (note,) if note else ()


class FreshFolder:
    """Undoes a run in a folder that held none when a ConfigError ends it before any image was
    done. The errors only a loaded engine finds (an overlap past half its input size, a prompt its
    processor refuses) come after the run began writing: what it made goes again, so the corrected
    command just runs. A folder that holds a run keeps everything (its configuration passed this
    engine before), and so does a run once an image is done (``work_done``)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.before = _top_level_names(output_dir)
        self.undo = self.before is None or not self.before & RUN_MARKERS

    def work_done(self) -> None:
        self.undo = False

    def __enter__(self) -> FreshFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.undo or exc_type is None or not issubclass(exc_type, ConfigError):
            return
        if self.before is None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for name in (_top_level_names(self.output_dir) or set()) - self.before:
            _remove(self.output_dir / name)


def _top_level_names(folder: Path) -> set[str] | None:
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
