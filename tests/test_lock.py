"""RunLock: a real second process holds (and dies holding) the output folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from _storage import python

from batchseg import lock
from batchseg.errors import RunLockedError
from batchseg.lock import INFO_NAME, RunLock, is_locked, read_info

HOLDER = """
import sys, time
from pathlib import Path
from batchseg.lock import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_child(output_dir: Path) -> subprocess.Popen[str]:
    """A child process that takes the lock and sleeps holding it."""
    child = python(HOLDER.replace("sys.argv[1]", repr(str(output_dir))))
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err, RunLock(tmp_path):
            pass
        assert f"output folder {tmp_path} is in use by batchseg pid {child.pid} started at" in str(err.value)
        info = is_locked(tmp_path)
        assert info is not None and info.pid == child.pid and info.hostname == socket.gethostname()
    finally:
        child.kill()
        child.communicate(timeout=30)


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)
    stale = read_info(tmp_path)
    assert stale is not None and stale.pid == child.pid  # the dead holder's note is still there
    assert is_locked(tmp_path) is None
    with RunLock(tmp_path) as lock:
        assert lock.info is not None and lock.info.pid == os.getpid()
        assert read_info(tmp_path) == lock.info
        assert is_locked(tmp_path) == lock.info  # a probe from elsewhere sees the live holder


def test_release_clears_the_info_and_frees_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError), RunLock(tmp_path):
        raise ValueError("the run failed")
    assert not (tmp_path / INFO_NAME).exists()
    assert is_locked(tmp_path) is None
    with RunLock(tmp_path) as again:
        assert again.is_held
    assert not again.is_held


def test_is_locked_on_a_folder_never_used(tmp_path: Path) -> None:
    assert is_locked(tmp_path) is None
    assert not any(tmp_path.iterdir())  # probing creates nothing


@pytest.mark.parametrize("kernel_table", [True, False], ids=["proc-locks", "info-file"])
def test_is_locked_reads_the_lock_without_taking_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_table: bool
) -> None:
    if not kernel_table:  # as on macOS and Windows, which have no /proc/locks
        monkeypatch.setattr(lock, "_kernel_lock_holders", lambda inode: None)
    child = hold_in_child(tmp_path)
    try:
        info = is_locked(tmp_path)
        assert info is not None and info.pid == child.pid
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert read_info(tmp_path) is not None  # the dead holder's note is still there
    assert is_locked(tmp_path) is None
