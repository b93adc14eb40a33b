"""One run per output folder: an OS file lock on ``OUTPUT/.batchseg.lock``.

The lock itself is the operating system's (flock on Unix, LockFileEx on Windows, through the filelock
package), so it dies with its process: a lock left by a killed run is simply taken over. Beside it,
``OUTPUT/.batchseg.lock.json`` tells who holds it (pid, host, start time) for error messages and
``batchseg status``; a stale one is overwritten by the next holder. ``is_locked`` (status) reads who
holds the lock without ever taking it, so it can never refuse a run that is starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import psutil
from filelock import FileLock, Timeout

from .atomic import FileHeldError, atomic_write_bytes
from .errors import OutputError, RunLockedError

__all__ = ["LOCK_NAME", "LockInfo", "RunLock", "is_locked"]

LOCK_NAME = ".batchseg.lock"
INFO_NAME = ".batchseg.lock.json"


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or last held) an output folder."""

    pid: int
    hostname: str
    started_at: float  # epoch seconds

    @property
    def started_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))

    def describe(self) -> str:
        return f"pid {self.pid} started at {self.started_text} on {self.hostname}"


class RunLock:
    """Context manager holding the output folder for one run; never waits.

    ``with RunLock(output_dir): ...`` raises RunLockedError at once when another live process holds
    the folder.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._lock = FileLock(self.output_dir / LOCK_NAME, blocking=False)
        self.info: LockInfo | None = None

    def acquire(self) -> LockInfo:
        """Take the lock or raise RunLockedError naming the holder."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(blocking=False)
        except Timeout:
            raise RunLockedError(_locked_message(self.output_dir)) from None
        except OSError as exc:
            raise OutputError(f"cannot create the lock file in {self.output_dir}: {exc}") from exc
        info = LockInfo(os.getpid(), socket.gethostname(), time.time())
        try:
            atomic_write_bytes(self.output_dir / INFO_NAME, json.dumps(asdict(info)).encode())
        except (OSError, FileHeldError) as exc:  # held by a scanner past every retry: still let go
            self._lock.release()
            raise OutputError(f"cannot write {self.output_dir / INFO_NAME}: {exc}") from exc
        self.info = info
        return info

    def release(self) -> None:
        """Let go; the info file goes first so it never names a process that no longer holds it."""
        if not self._lock.is_locked:
            return
        (self.output_dir / INFO_NAME).unlink(missing_ok=True)
        self._lock.release()
        self.info = None

    @property
    def is_held(self) -> bool:
        return bool(self._lock.is_locked)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def read_info(output_dir: Path) -> LockInfo | None:
    """The info file's content, or None when absent or unreadable."""
    try:
        data = json.loads((Path(output_dir) / INFO_NAME).read_text(encoding="utf-8"))
        return LockInfo(int(data["pid"]), str(data["hostname"]), float(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_locked(output_dir: Path) -> LockInfo | None:
    """Who holds the folder now, or None when no live process does; never takes the lock.

    A probe that took the lock, even for a moment, would refuse a run starting at that moment, so
    the lock is only read: on Linux from ``/proc/locks`` (the kernel's table of held locks), elsewhere
    from the info file with a check that its process is alive (a holder on another host, seen over
    a network share, is taken at its word). When the holder has not written its info file yet, the
    returned info has the kernel's pid for it and start time 0.
    """
    output_dir = Path(output_dir)
    try:
        inode = os.stat(output_dir / LOCK_NAME).st_ino
    except OSError:
        return None
    info = read_info(output_dir)
    holders = _kernel_lock_holders(inode)
    if holders is None:  # no kernel table to read: trust a live process named by the info file
        if info is None:
            return None
        if info.hostname == socket.gethostname() and not psutil.pid_exists(info.pid):
            return None
        return info
    if not holders:
        # /proc/locks lists the locks of this machine only: a holder elsewhere, on a share
        return info if info is not None and info.hostname != socket.gethostname() else None
    # Someone holds it: the info file names them (the kernel's pid may be another namespace's).
    return info or LockInfo(min(holders), socket.gethostname(), 0.0)


def _kernel_lock_holders(inode: int) -> set[int] | None:
    """Pids holding a lock on the file with this inode, from /proc/locks; None where there is none."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    pids: set[int] = set()
    for line in lines:
        fields = line.split()
        # Only flock locks (filelock's on Unix; SQLite's are POSIX), not "->" lines (waiters). The
        # inode alone identifies the file: overlay filesystems report another device number here.
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError, IndexError):
            if int(fields[5].rsplit(":", 1)[1]) == inode:
                pids.add(int(fields[4]))
    return pids


def _locked_message(output_dir: Path) -> str:
    info = read_info(output_dir)
    holder = f"batchseg {info.describe()}" if info is not None else "another batchseg process"
    return (
        f"output folder {output_dir} is in use by {holder}; wait for it to finish, stop it, or use"
        " another --output"
    )
