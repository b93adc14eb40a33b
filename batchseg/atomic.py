"""Atomic file writes: a temp file in the destination folder, then os.replace.

On Windows another process (an antivirus, a thumbnail viewer) can hold the target for a moment:
os.replace is retried briefly on PermissionError before giving up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_path", "atomic_write_bytes", "replace_with_retry", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".batchseg-tmp"


def replace_with_retry(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    attempts: int = 10,
    delay: float = 0.05,
    _replace: Callable[[str | os.PathLike[str], str | os.PathLike[str]], None] = os.replace,
) -> None:
    for attempt in range(attempts):
        try:
            _replace(src, dst)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay * (attempt + 1))


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; it replaces ``dst`` only if the block ends without error."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=TEMP_SUFFIX, dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    replace_with_retry(tmp_path, dst)


def atomic_write_bytes(dst: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dst) as tmp, open(tmp, "wb") as fh:
        _write_all(fh, data)


def _write_all(fh: BinaryIO, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())
