"""The output folder's life: is it writable, temp files an interrupted run left, mask files no row
names, and moving an earlier run aside to ``previous-runs/<run id>/`` for ``--new-run``.

Everything that deletes or moves files here runs under the run lock and never enters a nested
output folder that holds a run of its own (its lock or checkpoint): that run may be live.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import TEMP_SUFFIX, replace_with_retry
from ..discover import IMAGE_EXTENSIONS
from ..errors import OutputError
from ..lock import LOCK_NAME
from .tables import CHECKPOINT_NAME, MASKS_DIR, PREVIOUS_RUNS, path_text

__all__ = [
    "archive_previous_run",
    "check_output_writable",
    "MaskCheck",
    "check_masks",
    "remove_orphan_masks",
    "remove_stale_temp_files",
]

_RUN_MARKERS = (LOCK_NAME, CHECKPOINT_NAME)


def check_output_writable(output_dir: Path) -> None:
    """Create the output folder if needed and prove a file can be written there; OutputError if not."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {output_dir} is not writable: {exc.strerror or exc}") from exc


def _holds_a_run(folder: str) -> bool:
    return any(os.path.lexists(os.path.join(folder, name)) for name in _RUN_MARKERS)


def _walk_own(top: Path, skip_top: tuple[str, ...] = ()) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of ``top`` and below, leaving out nested folders that hold a run."""
    for folder, dirs, files in os.walk(top):
        if folder == str(top):
            dirs[:] = [d for d in dirs if d not in skip_top]
        dirs[:] = [d for d in dirs if not _holds_a_run(os.path.join(folder, d))]
        yield folder, files


def remove_stale_temp_files(output_dir: Path) -> int:
    """Delete the temp files an interrupted run left (a killed mask write or manifest export).

    Safe only while holding the run lock. Earlier runs in previous-runs/ and nested output folders
    with a run of their own are left as they are.
    """
    removed = 0
    for folder, files in _walk_own(output_dir, skip_top=(PREVIOUS_RUNS,)):
        for name in files:
            if name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):  # gone, or held (Windows): the next start tries again
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


@dataclass
class MaskCheck:
    """The files under masks/ against the mask paths the rows name, in stored form (``path_text`` of
    the path relative to the output folder, forward slashes): ``gone``, named by a row but not
    there; ``orphans``, there but named by no row, as (stored form, name on disk)."""

    gone: set[str]
    orphans: list[tuple[str, str]]


def check_masks(output_dir: Path, named: Iterator[str]) -> MaskCheck:
    """One walk of masks/ merged with ``named`` (the rows' mask paths, ascending in code point
    order: SQLite's ``ORDER BY``), much cheaper than a stat per image on large folders and network
    disks. The walk goes in the same order, one folder's listing at a time, so a million masks are
    never all in memory. Temp files and nested folders that hold a run are left out."""
    check = MaskCheck(set(), [])
    wanted = next(named, None)
    for text, real in _sorted_files(output_dir, MASKS_DIR):
        while wanted is not None and wanted < text:
            check.gone.add(wanted)
            wanted = next(named, None)
        if wanted == text:
            while wanted == text:  # two rows naming one file (never written so) find it both
                wanted = next(named, None)
        else:
            check.orphans.append((text, real))
    while wanted is not None:
        check.gone.add(wanted)
        wanted = next(named, None)
    return check


def _sorted_files(output_dir: Path, rel: str) -> Iterator[tuple[str, str]]:
    """(stored form, name on disk) of the files under ``output_dir/rel`` but temp files, ascending
    by stored form: a folder's entries sort with ``/`` after a folder's name, so that each comes
    where its paths do. Symbolic links to folders and folders that hold a run are not entered (as
    ``_walk_own``)."""
    folder = os.path.join(output_dir, rel)
    entries: list[tuple[str, str, bool]] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                is_dir = entry.is_dir()
                if is_dir and (entry.is_symlink() or _holds_a_run(entry.path)):
                    continue
                if not is_dir and entry.name.endswith(TEMP_SUFFIX):
                    continue
                entries.append((path_text(entry.name) + ("/" if is_dir else ""), entry.name, is_dir))
    except OSError:
        return
    entries.sort()
    prefix = path_text(rel) + "/"
    for key, name, is_dir in entries:
        if is_dir:
            yield from _sorted_files(output_dir, f"{rel}/{name}")
        else:
            yield prefix + key, f"{rel}/{name}"


def remove_orphan_masks(output_dir: Path, orphans: list[tuple[str, str]]) -> int:
    """Delete the mask files that no row names (``MaskCheck.orphans``): written by a worker whose
    result was not committed when the process died. Their image is pending and is redone, writing
    it again. Only names batchseg gives a mask (``<image name>.png`` or ``.tif``) are touched: any
    other file was put there by someone else."""
    removed = 0
    for text, real in sorted(orphans):
        if _is_mask_name(text):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(output_dir / real)
                removed += 1
    return removed


def _is_mask_name(rel: str) -> bool:
    """A label map batchseg writes: ``<image name>.png``, or ``.tif`` for a tiled or georeferenced one."""
    lower = rel.lower()
    stem = lower.removesuffix(".png").removesuffix(".tif")
    return stem != lower and stem.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def archive_previous_run(output_dir: Path, manifest_run_id: Callable[[Path], str | None]) -> Path | None:
    """Move checkpoint, manifest/ and masks/ of the earlier run to previous-runs/<run id>/.

    ``manifest_run_id`` names the run from its manifest when the checkpoint cannot.
    """
    path = output_dir / CHECKPOINT_NAME
    names = [n for n in (MASKS_DIR, "manifest", "tiles-in-progress") if (output_dir / n).exists()]
    if not path.exists() and not names:
        return None
    run_id = _settle_checkpoint(path) if path.exists() else None
    if run_id is None:
        run_id = manifest_run_id(output_dir) or "unknown-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = output_dir / PREVIOUS_RUNS / run_id
    target.mkdir(parents=True, exist_ok=True)
    # The checkpoint goes last: a crash half-way leaves it with rows whose masks moved, which the
    # next plan() redoes, rather than masks without the rows that explain them.
    db_files = [
        n
        for n in (CHECKPOINT_NAME + "-wal", CHECKPOINT_NAME + "-shm", CHECKPOINT_NAME)
        if (output_dir / n).exists()
    ]
    for name in names + db_files:
        dst = target / name
        if dst.exists():
            raise OutputError(f"cannot move {output_dir / name} aside: {dst} already exists")
        try:
            replace_with_retry(output_dir / name, dst)
        except OSError as exc:
            raise OutputError(f"cannot move {output_dir / name} to {dst}: {exc}") from exc
    return target


def _settle_checkpoint(path: Path) -> str | None:
    """Fold a crashed run's log into the file, so the file moves alone; its run id, or None if damaged."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT run_id FROM run LIMIT 1").fetchone()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


#: Overlay previews (batchseg.report) live here, one JPEG per image.
PREVIEWS_DIR = "previews"


def preview_relpath(rel: str) -> str:
    """Where the preview of input ``rel`` goes, relative to the output folder."""
    return f"{PREVIEWS_DIR}/{rel}.jpg"


def existing_previews(output_dir: Path) -> set[str]:
    """Relative paths of the previews there (one listing per folder: few round trips on a share)."""
    found: set[str] = set()
    for folder, _, files in os.walk(output_dir / PREVIEWS_DIR):
        rel = Path(folder).relative_to(output_dir).as_posix()
        found.update(f"{rel}/{name}" for name in files)
    return found
