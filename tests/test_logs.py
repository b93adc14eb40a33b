"""Run logs: names, UTF-8 text with every control character escaped, pruning, handler cleanup, safe_echo."""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile

from batchseg.errors import OutputError, StoppedEarly
from batchseg.logs import RunLog, clean, prune_logs, safe_echo

NOW = dt.datetime(2025, 3, 1, 2, 0, 5)
LINE_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (INFO |WARNING|ERROR) ")

NASTY_NAMES = [
    "carriage\rreturn.jpg",
    "new\nline 2025-01-01T00:00:00+00:00 INFO    forged.jpg",
    "\x1b[2J\x1b[31mansi.jpg",
    "bell\x07nul\x00del\x7f.jpg",
    "c1\x85\x9bcontrols.jpg",
    "rlo_\u202egpj.exe",
    "line\u2028sep\u2029par.jpg",
    "undecodable_\udcff\udcfe.jpg",  # what os.listdir gives for non-UTF-8 bytes on Linux
    "tab\there.jpg",
]


def read_log(log: RunLog) -> str:
    assert log.path is not None
    return log.path.read_bytes().decode("utf-8")  # strict: the file must be valid UTF-8


def test_log_file_name_and_collision_suffix(tmp_path: Path) -> None:
    with RunLog(tmp_path / "logs", now=NOW) as first, RunLog(tmp_path / "logs", now=NOW) as second:
        assert first.path == tmp_path / "logs" / "20250301-020005.log"
        assert second.path == tmp_path / "logs" / "20250301-020005-1.log"
    with RunLog(tmp_path / "logs", now=NOW) as third:
        assert third.path == tmp_path / "logs" / "20250301-020005-2.log"


def test_no_control_character_reaches_the_file(tmp_path: Path) -> None:
    with RunLog(tmp_path / "logs", now=NOW) as log:
        log.start({"input": "in\rput", "prompts": ["ro\x1bof"]}, {"device": "cuda\n0"})
        for name in NASTY_NAMES:
            traceback = f"Traceback\n  File {name}\nValueError"
            log.failure(name, "error", f"ValueError: bad {name}", detail=traceback)
            log.info(f"read {name}")
            log.warning(name)
            log.progress(name)
        log.error(f"fatal {NASTY_NAMES[0]}", detail="one\rtwo\nthree")
        log.summary({"ok": 1}, 2.0, 3)
    content = read_log(log)
    bad = [c for c in content if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0]
    assert bad == []
    for forbidden in ("\u202e", "\u2028", "\u2029", "\x1b"):
        assert forbidden not in content
    for line in content.split("\n")[:-1]:
        # Every line is a record of its own or an indented traceback line: no forged records.
        assert LINE_START.match(line) or line.startswith("    | "), repr(line)
    assert content.endswith("\n")
    assert "carriage\\rreturn.jpg" in content
    assert "\\x1b[2J\\x1b[31mansi.jpg" in content
    assert "rlo_\\u202egpj.exe" in content
    assert "undecodable_\\udcff\\udcfe.jpg" in content
    assert "new\\nline 2025-01-01T00:00:00+00:00 INFO    forged.jpg" in content
    assert "    |   File tab\\there.jpg" in content


def test_non_ascii_names_are_kept_as_utf8(tmp_path: Path) -> None:
    name = "Dächer/屋根_Ω_𝔸_👍🏽‍.jpg"
    with RunLog(tmp_path / "logs", now=NOW) as log:
        log.failure(name, "invalid_input", "cannot identify image file")
    assert log.path is not None
    assert f"invalid_input {name}: cannot identify image file".encode() in log.path.read_bytes()


def test_start_failure_progress_summary_lines(tmp_path: Path) -> None:
    with RunLog(tmp_path / "logs", now=NOW) as log:
        log.start({"threshold": 0.3, "prompts": ["roof", "solar panel"], "output": "out"}, {"device": "cpu"})
        log.progress("10/100 images, 0.5 img/s, ETA 3m00s")
        log.failure("a/b.jpg", "timeout", "no result after 300 s", detail=None)
        log.summary({"ok": 97, "error": 2, "timeout": 1}, 3725.4, 3)
    messages = [line.split(" ", 1)[1] for line in read_log(log).splitlines()]
    assert messages[0].startswith("INFO    batchseg ") and " run started; Python " in messages[0]
    assert messages[1:] == [
        "INFO    config output = out",
        "INFO    config prompts = ['roof', 'solar panel']",
        "INFO    config threshold = 0.3",
        "INFO    device device = cpu",
        "INFO    progress 10/100 images, 0.5 img/s, ETA 3m00s",
        "WARNING timeout a/b.jpg: no result after 300 s",
        "INFO    summary ok 97, error 2, timeout 1; 1h02m05s elapsed; exit code 3",
    ]


def test_package_logger_records_land_in_the_file_while_open(tmp_path: Path) -> None:
    package = logging.getLogger("batchseg")
    handlers_before = list(package.handlers)
    root_handlers_before = list(logging.getLogger().handlers)
    level_before = package.level
    with RunLog(tmp_path / "logs", now=NOW) as log:
        logging.getLogger("batchseg.supervise.pool").info("worker %d started on %s", 3, "x\ry.jpg")
    logging.getLogger("batchseg.supervise.pool").warning("after close")
    content = read_log(log)
    assert "worker 3 started on x\\ry.jpg" in content
    assert "after close" not in content
    assert package.handlers == handlers_before and package.level == level_before
    assert logging.getLogger().handlers == root_handlers_before  # no basicConfig, nothing global left


def test_warnings_in_the_parent_go_to_the_log_naming_their_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning the parent meets during a run (a library reading an image for a preview, say)
    is in the run log, not only on a console nobody reads at night; put back after the run."""
    import warnings

    from batchseg.logs import about_image

    before = warnings.showwarning
    with RunLog(tmp_path / "logs", now=NOW) as log, warnings.catch_warnings():
        warnings.simplefilter("always")
        with about_image(tmp_path / "odd.png"):
            warnings.warn("palette with transparency", UserWarning, stacklevel=1)
    assert warnings.showwarning is before
    content = read_log(log)
    assert f"{tmp_path / 'odd.png'}: UserWarning: palette with transparency" in content
    assert "palette" not in capsys.readouterr().err


def test_exception_in_block_is_logged_with_traceback_and_reraised(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), RunLog(tmp_path / "logs", now=NOW) as log:
        raise RuntimeError("boom\x1b[0m")
    content = read_log(log)
    assert "ERROR   run ended by RuntimeError: boom\\x1b[0m" in content
    assert "    | Traceback (most recent call last):" in content


def test_expected_errors_and_interrupts_get_one_line_without_traceback(tmp_path: Path) -> None:
    with pytest.raises(StoppedEarly), RunLog(tmp_path / "a", now=NOW) as stopped:
        raise StoppedEarly("deadline reached")
    assert read_log(stopped) == ""  # the caller reports its own errors: no duplicate, no traceback
    with pytest.raises(KeyboardInterrupt), RunLog(tmp_path / "b", now=NOW) as interrupted:
        raise KeyboardInterrupt
    content = read_log(interrupted)
    assert content.count("\n") == 1
    assert "WARNING run interrupted (Ctrl-C or a stop request); running it again resumes" in content


def test_close_twice_and_writes_after_close_are_dropped(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "logs", now=NOW).open()
    log.info("kept")
    log.close()
    log.close()
    log.info("dropped")  # no handler: nothing is written, nothing raises
    assert "kept" in read_log(log) and "dropped" not in read_log(log)


def make_logs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("old\n", encoding="utf-8")


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    old = [f"202401{day:02d}-010000.log" for day in range(1, 29)]
    same_second = ["20250101-000000.log", "20250101-000000-1.log", "20250101-000000-2.log"]
    others = ["notes.txt", "20240101-010000.log.bak", "keep-me.log"]
    make_logs(logs, old + same_second + others)
    with RunLog(logs, keep=5, now=NOW) as log:
        pass
    remaining = sorted(p.name for p in logs.iterdir())
    assert remaining == sorted(
        ["20240127-010000.log", "20240128-010000.log", *same_second, "20250301-020005.log"][-5:] + others
    )
    assert log.path is not None and log.path.exists()


def test_prune_logs_protects_the_current_file(tmp_path: Path) -> None:
    make_logs(tmp_path, ["20990101-000000.log", "20000101-000000.log"])
    deleted = prune_logs(tmp_path, keep=1, protect=tmp_path / "20000101-000000.log")
    assert deleted == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20000101-000000.log", "20990101-000000.log"]


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        RunLog(tmp_path, keep=0)


def test_unwritable_log_folder_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("a file where the folder should be", encoding="utf-8")
    with pytest.raises(OutputError, match="cannot create a log file in"):
        RunLog(tmp_path / "logs").open()


# ----------------------------------------------------------------------------- clean and safe_echo


def test_clean() -> None:
    assert clean("plain Dächer 屋根") == "plain Dächer 屋根"
    assert clean("a\rb\nc\td\x00\x1b\x9b\u202e\udcff") == "a\\rb\\nc\\td\\x00\\x1b\\x9b\\u202e\\udcff"
    assert clean("a\nb\tc\r", keep="\n\t") == "a\nb\tc\\r"
    assert clean("👍🏽\u200d") == "👍🏽\u200d"  # zero-width joiner of emoji sequences is harmless


def cp1252_stream() -> io.TextIOWrapper:
    # What a scheduled task's redirected stdout looks like on a Western Windows machine.
    return io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict", newline="\n")


def test_a_plain_write_of_such_a_name_would_crash() -> None:
    with pytest.raises(UnicodeEncodeError):
        cp1252_stream().write("dach_𝔸.jpg")


@pytest.mark.parametrize("err", [False, True])
def test_safe_echo_to_cp1252_never_crashes(monkeypatch: pytest.MonkeyPatch, err: bool) -> None:
    stream = cp1252_stream()
    monkeypatch.setattr(sys, "stderr" if err else "stdout", stream)
    safe_echo("dach_𝔸.jpg Dächer 屋根 \x1b[31m\udcff", err=err)
    safe_echo("two\nlines", err=err)
    stream.flush()
    written = stream.buffer.getvalue()  # type: ignore[attr-defined]
    assert written == "dach_?.jpg Dächer ?? \\x1b[31m\\udcff\ntwo\nlines\n".encode("cp1252")


def test_safe_echo_without_a_stream_or_with_an_unknown_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)  # pythonw.exe
    safe_echo("nothing to print to")

    class OddStream(io.StringIO):
        encoding = "no-such-codec"  # type: ignore[assignment]

    odd = OddStream()
    monkeypatch.setattr(sys, "stdout", odd)
    safe_echo("dach_𝔸.jpg", nl=False)
    assert odd.getvalue() == "dach_?.jpg"


def _odd_tiff(path: Path) -> Path:
    """A tiled TIFF whose ImageDescription has an invalid data type (99): tifffile logs a message
    each time it opens it, and reads the pixels."""
    pixels = np.zeros((300, 300, 3), np.uint8)
    pixels[10:130, 10:130] = (255, 0, 0)
    tifffile.imwrite(path, pixels, photometric="rgb", description="a note", metadata=None, tile=(64, 64))
    data = path.read_bytes()
    entry = struct.pack("<HH", 270, 2)  # ImageDescription, ASCII
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, struct.pack("<HH", 270, 99)))
    return path


def _damaged_lzw_tiff(path: Path) -> Path:
    """Deflate data under an LZW tag: Pillow's libtiff prints "Using code not yet in table"."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(32, 32), compression="zlib")
    deflate, lzw = b"\x03\x01\x03\x00\x01\x00\x00\x00\x08\x00", b"\x03\x01\x03\x00\x01\x00\x00\x00\x05\x00"
    path.write_bytes(path.read_bytes().replace(deflate, lzw))
    return path


def _odd_geotiff(path: Path) -> Path:
    """A tiled GeoTIFF whose PhotometricInterpretation has an invalid data type: GDAL's messages
    about it come through rasterio's logger ("rasterio._env"), tifffile's through its own."""
    from affine import Affine

    pixels = np.zeros((3, 300, 300), np.uint8)
    pixels[0, 10:130, 10:130] = 255
    profile = {"driver": "GTiff", "width": 300, "height": 300, "count": 3, "dtype": "uint8"}
    profile |= {"crs": "EPSG:32633", "transform": Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 5000000.0)}
    with rasterio.open(path, "w", tiled=True, blockxsize=64, blockysize=64, **profile) as dst:
        dst.write(pixels)
    data = path.read_bytes()
    entry = struct.pack("<HH", 262, 3)  # PhotometricInterpretation, SHORT
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, struct.pack("<HH", 262, 99)))
    return path


def test_library_messages_go_to_the_log_with_their_image_not_to_the_console(tmp_path: Path) -> None:
    """``python -m batchseg run`` on odd TIFFs, tiled, with previews (so the parent reads them too):
    tifffile's log records, GDAL's messages through rasterio and libtiff's error lines never reach
    the console; the run log has each, naming the image it concerns."""
    folder = tmp_path / "in"
    folder.mkdir()
    _odd_tiff(folder / "odd.tif")
    _odd_tiff(folder / "odd2.tif")
    _damaged_lzw_tiff(folder / "lzw.tif")
    _odd_geotiff(folder / "geo.tif")
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "batchseg", "run", str(folder), "--output", str(output), "--tile", "128",
        "--engine", "batchseg.engines.threshold:load", "--prompt", "red", "--workers", "1", "--previews",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr  # lzw.tif is invalid_input
    console = done.stdout + done.stderr
    for said in ("TiffTag", "not yet in table", "CPLE_", "TIFFFetch", "Warning"):
        assert said not in console, console
    assert "progress: 4/4" in console
    log = "".join(p.read_text(encoding="utf-8") for p in (output / "logs").glob("*.log"))
    for name in ("odd.tif", "odd2.tif"):
        assert f"{folder / name}: tifffile error: <TiffTag.fromfile> raised" in log, log
    assert f"{folder / 'lzw.tif'}: libtiff error: Using code not yet in table" in log, log
    assert f"{folder / 'geo.tif'}: gdal warning: CPLE 1: TIFFFetchNormalTag" in log, log
    # The parent's too (the previews sample the images by window): every library line names one.
    library = [line for line in log.splitlines() if "gdal warning" in line or "tifffile error" in line]
    assert all(f"{folder}{os.sep}" in line for line in library), library
    from_workers = [line for line in log.splitlines() if "worker_warning" in line]
    assert from_workers and all(f"{folder}{os.sep}" in line for line in from_workers), from_workers
