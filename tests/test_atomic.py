"""Atomic writes on real files; a file held open on Windows simulated with the rename hook
(``batchseg.atomic._rename``), which is the only thing Linux cannot do for real."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from misbehaving_engines import SharingViolation
from PIL import Image, ImageDraw

from batchseg import atomic
from batchseg.atomic import (
    TEMP_SUFFIX,
    FileHeldError,
    atomic_write_bytes,
    backoff_delays,
    held_file_patience,
    remove_temp_files_of,
)
from batchseg.errors import OutputError
from batchseg.runner import remove_stale_temp_files


def test_backoff_doubles_up_to_two_seconds_within_the_patience() -> None:
    delays = backoff_delays(30.0)
    assert delays[:7] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert set(delays[6:]) == {2.0}
    assert 28.0 < sum(delays) <= 30.0
    assert backoff_delays(0.0) == []


def test_a_briefly_held_file_is_replaced_after_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "flaky.png"
    target.write_bytes(b"old")
    hook = SharingViolation(os.replace)
    monkeypatch.setattr(atomic, "_rename", hook)
    started = time.monotonic()
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert hook.refused == {"flaky.png": 2}
    assert time.monotonic() - started >= 0.15  # waited 0.05 + 0.1
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


def test_a_file_held_all_along_is_file_held_error_and_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "bad.png"
    target.write_bytes(b"old")
    hook = SharingViolation(os.replace)
    monkeypatch.setattr(atomic, "_rename", hook)
    with held_file_patience(0.4), pytest.raises(FileHeldError, match="another program keeps it open") as info:
        atomic_write_bytes(target, b"new")
    assert hook.refused["bad.png"] == len(backoff_delays(0.4)) + 1 == 4
    assert isinstance(info.value, OutputError) and not isinstance(info.value, OSError)
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}")), "the temp file is removed"


def test_a_posix_permission_error_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def refuse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(str(dst))
        raise PermissionError(13, "Permission denied", str(dst))  # no winerror: not a held file

    monkeypatch.setattr(atomic, "_rename", refuse)
    with pytest.raises(PermissionError):
        atomic_write_bytes(tmp_path / "x.png", b"x")
    assert len(calls) == 1


def test_the_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(tmp_path / "m.png", b"x")
    assert synced == [False, True], "the file's data, then the folder holding the new name"


def test_temp_names_carry_the_pid_and_only_that_process_files_are_removed(tmp_path: Path) -> None:
    with atomic.atomic_path(tmp_path / "a.png") as tmp:
        assert tmp.name.startswith(".a.png.") and tmp.name.endswith(f".{os.getpid()}{TEMP_SUFFIX}")
        tmp.write_bytes(b"x")
    other = tmp_path / f".b.png.abcd1234.{os.getpid() + 1}{TEMP_SUFFIX}"
    mine = [
        tmp_path / f".c.png.k2j3h4g5.4242{TEMP_SUFFIX}",
        tmp_path / "sub" / f".d.png.zz.4242{TEMP_SUFFIX}",
    ]
    for path in [other, *mine]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    assert remove_temp_files_of(4242, [tmp_path, tmp_path / "sub", tmp_path / "gone"]) == 2
    assert other.exists() and not any(p.exists() for p in mine)
    assert (tmp_path / "a.png").read_bytes() == b"x"


def test_start_up_cleanup_survives_a_held_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = tmp_path / "masks" / f".a.png.x.1{TEMP_SUFFIX}"
    free = tmp_path / "masks" / f".b.png.y.1{TEMP_SUFFIX}"
    held.parent.mkdir()
    held.write_bytes(b"")
    free.write_bytes(b"")
    real_unlink = os.unlink

    def unlink(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if Path(path) == held:
            raise PermissionError(13, "The process cannot access the file", str(path))
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    assert remove_stale_temp_files(tmp_path) == 1
    assert held.exists() and not free.exists()


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no POSIX modes")
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """A run started under a umask writes every file (masks, the tiled label map, manifests,
    checkpoint, log, previews, report) with the mode any other program would: 0o666 less the
    umask, never the 0o600 of a temp file. Workers inherit the umask, so their files too."""
    folder = tmp_path / "in"
    folder.mkdir()
    big = Image.new("RGB", (1200, 1000))
    ImageDraw.Draw(big).rectangle([300, 300, 800, 700], fill=(255, 0, 0))
    big.save(folder / "big.png")  # tiled at 512: a TIFF label map written by window
    big.resize((120, 100)).save(folder / "small.png")
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "batchseg", "run", str(folder), "--output", str(output), "--tile", "512",
        "--engine", "batchseg.engines.threshold:load", "--prompt", "red", "--workers", "1", "--previews",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(umask)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    modes = {
        str(p.relative_to(output)): stat.S_IMODE(p.stat().st_mode) for p in output.rglob("*") if p.is_file()
    }
    for name in ("masks/big.png.tif", "masks/small.png.png", "manifest/images.parquet", "report.html"):
        assert name in modes, sorted(modes)
    assert "checkpoint.sqlite" in modes and "previews/big.png.jpg" in modes
    assert {name: m for name, m in modes.items() if m != mode} == {}, oct(mode)
