"""The run log (OUTPUT/logs/<YYYYmmdd-HHMMSS>.log) and console output that survives any filename.

Every run writes one plain-text, UTF-8 log file, whatever the console's code page. File names come
from the disk and can hold anything: carriage returns, ANSI escape sequences, right-to-left overrides,
undecodable bytes (as lone surrogates). :func:`clean` escapes all of those, so one record is exactly
one line and nothing in a log file can rewrite the terminal that later shows it. Records that other
batchseg modules send to the ``batchseg`` logger while a :class:`RunLog` is open land in the same file.

This module is imported by the parent process: it never imports torch.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import platform
import re
import sys
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from . import __version__
from .errors import BatchsegError, OutputError

__all__ = ["LOG_NAME_RE", "RunLog", "clean", "prune_logs", "safe_echo"]

#: Names of run log files: a local timestamp, then -N when two runs start in the same second.
LOG_NAME_RE = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?\.log$")
#: The logger other modules log to; a RunLog copies its records into the run's file.
PACKAGE_LOGGER = "batchseg"


def _needs_escape(ch: str, keep: str) -> bool:
    if ch in keep:
        return False
    # Cc: C0/C1 controls and DEL; Cf: bidi overrides and other invisible format characters
    # (a right-to-left override makes "gpj.exe" read as "exe.jpg"); Cs: lone surrogates left by
    # undecodable file names, which UTF-8 cannot encode; Zl/Zp: Unicode line breaks.
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and ch != "\u200d"


def clean(text: object, keep: str = "") -> str:
    """``text`` with control, format and surrogate characters escaped (``\\r``, ``\\x1b``, ``\\u202e``).

    ``keep`` names characters left as they are (``"\\n\\t"`` for multi-line console text).
    """
    text = str(text)
    if not any(_needs_escape(ch, keep) for ch in text):
        return text
    return "".join(_escape(ch) if _needs_escape(ch, keep) else ch for ch in text)


def _escape(ch: str) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if ch in named:
        return named[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_echo(text: str, err: bool = False, nl: bool = True) -> None:
    """Print to stdout (stderr with ``err``) without ever failing on a character the stream can't encode.

    A scheduled task's output redirected to a file on Windows is encoded with the ANSI code page
    (cp1252): a name like ``dach_𝔸.jpg`` would raise UnicodeEncodeError and end the run. Here it
    prints as ``dach_?.jpg``. Control characters other than newline and tab are escaped.
    """
    stream: TextIO | None = sys.stderr if err else sys.stdout
    if stream is None:  # pythonw.exe and some service hosts have no console streams
        return
    encoding = getattr(stream, "encoding", None) or "utf-8"
    line = clean(text, keep="\n\t") + ("\n" if nl else "")
    try:
        line = line.encode(encoding, errors="replace").decode(encoding, errors="replace")
    except LookupError:  # a stream reporting an encoding Python does not know
        line = line.encode("ascii", errors="replace").decode("ascii")
    stream.write(line)
    stream.flush()


class _CleanFormatter(logging.Formatter):
    """One record = one line with escaped controls; a traceback follows as indented ``|`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="seconds")
        line = f"{stamp} {record.levelname:<7} {clean(record.getMessage())}"
        detail = getattr(record, "detail", None)
        if record.exc_info and not detail:
            detail = self.formatException(record.exc_info)
        if detail:
            line += "".join(f"\n    | {clean(part)}" for part in str(detail).rstrip().splitlines())
        return line


def prune_logs(log_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest run logs in ``log_dir`` so that ``keep`` remain; return what was deleted.

    Only files named like run logs are touched; ``protect`` (the current log) is never deleted.
    A log another process still holds open (Windows) is left for next time.
    """
    logs = []
    for entry in Path(log_dir).iterdir():
        match = LOG_NAME_RE.match(entry.name)
        if match and entry.is_file():
            logs.append(((match.group(1), int(match.group(2) or 0)), entry))
    logs.sort()
    deleted = []
    for _, entry in logs[: max(0, len(logs) - keep)]:
        if protect is not None and entry == protect:
            continue
        try:
            entry.unlink()
            deleted.append(entry)
        except OSError:
            pass
    return deleted


def _create_log_file(log_dir: Path, now: _dt.datetime) -> Path:
    stamp = now.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        path = log_dir / (f"{stamp}.log" if n == 0 else f"{stamp}-{n}.log")
        try:
            # Exclusive create: two runs starting in the same second never share a file.
            with open(path, "x", encoding="utf-8"):
                return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class RunLog:
    """The log file of one run (``RunLog(output_dir / "logs")``), open for the life of a ``with`` block.

    Built on its own :class:`logging.Logger` and FileHandler (no global logging configuration is
    touched, except that records of the ``batchseg`` logger are copied into the file while it is open).
    Opening it creates ``log_dir``, claims a fresh file name and prunes the logs past ``keep``. ``now``
    fixes the timestamp in the file name (tests).
    """

    def __init__(self, log_dir: Path, keep: int = 30, now: _dt.datetime | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.log_dir = Path(log_dir)
        self.keep = keep
        self._now = now
        self.path: Path | None = None
        self._handler: logging.FileHandler | None = None
        self._logger = logging.Logger(f"{PACKAGE_LOGGER}.run-log.{id(self)}", logging.INFO)
        self._package_level: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> RunLog:
        """Create the log file and start writing to it. Raises OutputError if it cannot be created."""
        log_dir = self.log_dir
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.path = _create_log_file(log_dir, self._now or _dt.datetime.now())
            handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot create a log file in {log_dir}: {exc.strerror or exc}") from exc
        handler.setFormatter(_CleanFormatter())
        handler.setLevel(logging.INFO)
        self._handler = handler
        self._logger.addHandler(handler)
        package = logging.getLogger(PACKAGE_LOGGER)
        package.addHandler(handler)
        if package.getEffectiveLevel() > logging.INFO:
            self._package_level = package.level
            package.setLevel(logging.INFO)
        prune_logs(log_dir, self.keep, protect=self.path)
        return self

    def close(self) -> None:
        """Stop writing and detach the handler; safe to call twice."""
        handler, self._handler = self._handler, None
        if handler is None:
            return
        package = logging.getLogger(PACKAGE_LOGGER)
        package.removeHandler(handler)
        if self._package_level is not None:
            package.setLevel(self._package_level)
            self._package_level = None
        self._logger.removeHandler(handler)
        handler.close()

    def __enter__(self) -> RunLog:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, KeyboardInterrupt):
            self._logger.warning("run interrupted (Ctrl-C or a stop request); running it again resumes")
        elif exc is not None and not isinstance(exc, (BatchsegError, SystemExit)):
            # An unexpected exception is a bug: keep its traceback. BatchsegErrors are expected
            # outcomes with a message of their own, which the caller reports.
            self._logger.error("run ended by %s: %s", type(exc).__name__, exc, exc_info=exc)
        self.close()

    # ------------------------------------------------------------------ records

    def start(self, config_dict: Mapping[str, Any], device_info: Mapping[str, Any]) -> None:
        """Header of the run: versions, host, process, then every option and the device, one per line."""
        self._logger.info(
            "batchseg %s run started; Python %s on %s; pid %d",
            __version__,
            platform.python_version(),
            platform.platform(),
            os.getpid(),
        )
        for key in sorted(config_dict):
            self._logger.info("config %s = %s", key, _value(config_dict[key]))
        for key in sorted(device_info):
            self._logger.info("device %s = %s", key, _value(device_info[key]))

    def failure(self, result_path: str, status: str, reason: str, detail: str | None = None) -> None:
        """One image that did not end ok; ``detail`` (a traceback) goes below it as indented lines."""
        self._logger.warning("%s %s: %s", status, result_path, reason, extra={"detail": detail})

    def progress(self, line: str) -> None:
        """A periodic progress line (counts, rate, ETA)."""
        self._logger.info("progress %s", line)

    def summary(self, counts: Mapping[str, int], elapsed: float, exit_code: int) -> None:
        """The last line of a run: how many images ended in each status, the time taken, the exit code."""
        parts = ", ".join(f"{status} {n}" for status, n in counts.items()) or "no images"
        self._logger.info("summary %s; %s elapsed; exit code %d", parts, _format_duration(elapsed), exit_code)

    def info(self, msg: str) -> None:
        """A line at level INFO."""
        self._logger.info("%s", msg)

    def warning(self, msg: str) -> None:
        """A line at level WARNING."""
        self._logger.warning("%s", msg)

    def error(self, msg: str, detail: str | None = None) -> None:
        """A line at level ERROR (a fatal problem), with an optional traceback below it."""
        self._logger.error("%s", msg, extra={"detail": detail})


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(str(v)) if isinstance(v, str) else str(v) for v in value) + "]"
    return str(value)
