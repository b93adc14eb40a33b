"""Atomic file writes: a temp file in the destination folder, fsynced, ``os.replace``d into place,
then the folder fsynced (where the OS allows it), so a finished file survives a power cut.

Temp names carry the writing process's pid (``.NAME.RANDOM.PID.batchseg-tmp``): when a worker dies
mid-write, its supervisor removes that worker's files (:func:`remove_temp_files_of`).

On Windows a file held open by another program (an image viewer, a preview pane, an antivirus)
makes the rename fail with a sharing violation for a while: it is retried with back-off (see
:func:`backoff_delays`) before :class:`FileHeldError` says which file and for how long.

A finished file has the mode any new file of the process gets (``0o666`` less the umask, see
:data:`FILE_MODE`), not the private ``0o600`` of its temp file: colleagues who can open the report
on a share can open the masks and manifests it links to.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

__all__ = [
    "FILE_MODE",
    "FileHeldError",
    "HELD_FILE_PATIENCE_S",
    "TEMP_SUFFIX",
    "atomic_path",
    "atomic_write_bytes",
    "backoff_delays",
    "held_file_patience",
    "remove_temp_files_of",
    "replace_with_retry",
]

TEMP_SUFFIX = ".batchseg-tmp"
#: How long a rename onto a held file is retried, in seconds, unless held_file_patience() says
#: otherwise (a worker's mask writes use this; the runner chooses its own for the manifest). Well
#: inside the default per-image --timeout, so a held mask fails its image, not its worker.
HELD_FILE_PATIENCE_S = 30.0
#: Back-off: the first wait, the factor between waits, the longest single wait.
FIRST_DELAY_S = 0.05
BACKOFF_FACTOR = 2.0
MAX_DELAY_S = 2.0
#: Windows errors of a rename onto a file another process holds: access denied (the usual one for
#: a target opened without delete sharing), sharing violation, lock violation.
HELD_WINERRORS = frozenset({5, 32, 33})


def _read_umask() -> int:
    """The process's umask. Linux shows it in /proc (read without changing it); elsewhere it is
    set and put back at once, at import, before this process writes a file."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The mode of every finished file: what ``open(path, "w")`` would have given it (0o644 under the
#: usual umask 022, 0o640 under 027).
FILE_MODE = 0o666 & ~_read_umask()

#: The rename hook: os.replace, swapped by tests to simulate a sharing violation.
_rename: Callable[[str | os.PathLike[str], str | os.PathLike[str]], None] = os.replace
_patience: ContextVar[float | None] = ContextVar("batchseg_held_file_patience", default=None)


class FileHeldError(OutputError):
    """A finished file could not replace its target: another program held the target all along.

    Not an ``OSError`` on purpose: an engine that turns OSError into a fatal OutputError lets this
    one through, so a held mask fails its image (``error``), and the run goes on.
    """


def backoff_delays(patience: float) -> list[float]:
    """The waits between rename attempts: 0.05 s doubling up to 2 s each, until ``patience`` seconds
    in all. 30 s: 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, then 2 s thirteen times (29.15 s, 20 attempts)."""
    delays: list[float] = []
    delay, total = FIRST_DELAY_S, 0.0
    while total + delay <= patience + 1e-9:
        delays.append(delay)
        total += delay
        delay = min(delay * BACKOFF_FACTOR, MAX_DELAY_S)
    return delays


@contextlib.contextmanager
def held_file_patience(seconds: float) -> Iterator[None]:
    """Within the block, a rename onto a held file is retried for ``seconds`` (this thread only)."""
    token = _patience.set(seconds)
    try:
        yield
    finally:
        _patience.reset(token)


def is_held(exc: OSError) -> bool:
    """The error Windows gives a rename onto a file that another process has open."""
    return isinstance(exc, PermissionError) and getattr(exc, "winerror", None) in HELD_WINERRORS


def replace_with_retry(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace(src, dst)``; while ``dst`` is held by another program, retried with back-off.

    Raises FileHeldError when it is still held after the patience; any other OSError at once (on
    POSIX a PermissionError means a folder that cannot be written, which waiting does not change).
    """
    patience = _patience.get()
    delays = backoff_delays(HELD_FILE_PATIENCE_S if patience is None else patience)
    started = time.monotonic()
    for attempt in range(len(delays) + 1):
        try:
            _rename(src, dst)
            return
        except PermissionError as exc:
            if not is_held(exc):
                raise
            if attempt == len(delays):
                waited = time.monotonic() - started
                raise FileHeldError(
                    f"cannot replace {dst}: another program keeps it open (an image viewer, a preview "
                    f"pane, an antivirus?); tried {attempt + 1} times over {waited:.1f} s ({exc})"
                ) from exc
            time.sleep(delays[attempt])


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; it replaces ``dst`` only if the block ends without error.

    The temp file is removed whenever it does not become ``dst`` (the block raised, or the rename
    failed), so a held target leaves nothing behind.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=f".{os.getpid()}{TEMP_SUFFIX}", dir=dst.parent)
    try:
        # mkstemp's 0o600 would survive the rename. POSIX only (Windows has no such modes); a
        # share that refuses modes keeps its own.
        if hasattr(os, "fchmod"):
            with contextlib.suppress(OSError):
                os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        replace_with_retry(tmp_path, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise
    fsync_folder(dst.parent)


def atomic_write_bytes(dst: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dst) as tmp, open(tmp, "wb") as fh:
        _write_all(fh, data)


def _write_all(fh: BinaryIO, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable. POSIX only: Windows cannot open a folder for this, and
    some file systems (network shares) refuse it; both are left as they are."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temp_files_of(pid: int, folders: Iterable[str | os.PathLike[str]]) -> int:
    """Delete the unfinished temp files that process ``pid`` left in ``folders`` (not below them).

    For the supervisor, once that worker is dead: a write cut by a crash or a watchdog kill. Files
    that cannot be deleted (held, gone) are left to the start-up cleanup. Returns how many went.
    """
    ending = f".{pid}{TEMP_SUFFIX}"
    removed = 0
    for folder in {os.fspath(f) for f in folders}:
        try:
            names = [e.name for e in os.scandir(folder) if e.name.endswith(ending)]
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed
