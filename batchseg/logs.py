"""The run log (OUTPUT/logs/<YYYYmmdd-HHMMSS>.log) and console output that survives any filename.

Every run writes one plain-text, UTF-8 log file, whatever the console's code page. File names come
from the disk and can hold anything: carriage returns, ANSI escape sequences, right-to-left overrides,
undecodable bytes (as lone surrogates). :func:`clean` escapes all of those, so one record is exactly
one line and nothing in a log file can rewrite the terminal that later shows it. Records that other
batchseg modules send to the ``batchseg`` logger while a :class:`RunLog` is open land in the same file.

What libraries say (tifffile's and rasterio's log records, warnings, libtiff's messages) goes to the
run log too, naming the image being read (:func:`about_image`), never to the console, where a folder
of odd files printed thousands of lines over the progress: :func:`capture_library_output` in a
worker, the :class:`RunLog` itself in the parent.

This module is imported by the parent process: it never imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
import os
import platform
import re
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from . import __version__
from .errors import BatchsegError, OutputError

__all__ = [
    "LOG_NAME_RE",
    "RunLog",
    "about_image",
    "capture_library_output",
    "clean",
    "prune_logs",
    "safe_echo",
]

#: Names of run log files: a local timestamp, then -N when two runs start in the same second.
LOG_NAME_RE = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?\.log$")
#: The logger other modules log to; a RunLog copies its records into the run's file.
PACKAGE_LOGGER = "batchseg"
#: The image the current thread (or task) is reading, named in what libraries say meanwhile.
_IMAGE: ContextVar[str | None] = ContextVar("batchseg_image", default=None)


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


@contextlib.contextmanager
def about_image(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, what libraries say in this thread names ``path`` (the readers of
    ``imageio`` and ``tiles.windows`` open one around every read)."""
    token = _IMAGE.set(os.fspath(path))
    try:
        yield
    finally:
        _IMAGE.reset(token)
        if not _GDAL_ROUTED and "rasterio" in sys.modules:  # the first image read with GDAL
            _route_gdal_messages()


def _about(text: str) -> str:
    image = _IMAGE.get()
    return f"{image}: {text}" if image else text


class _LibraryHandler(logging.Handler):
    """Log records of libraries (tifffile; rasterio, which passes on GDAL's messages) handed to
    ``sink`` as one line naming the image; on the root logger it also keeps Python's last-resort
    handler from printing them on the console. ``skip_own``: not batchseg's records (a RunLog has a
    handler of its own for those)."""

    def __init__(self, sink: Callable[[str], None], skip_own: bool) -> None:
        super().__init__(logging.WARNING)
        self.sink, self.skip_own = sink, skip_own

    def emit(self, record: logging.LogRecord) -> None:
        if self.skip_own and (record.name == PACKAGE_LOGGER or record.name.startswith(PACKAGE_LOGGER + ".")):
            return
        try:
            self.sink(_about(f"{record.name} {record.levelname.lower()}: {record.getMessage()}"))
        except Exception:  # noqa: BLE001 - logging never raises into the code that logged
            self.handleError(record)


def capture_library_output(sink: Callable[[str], None]) -> Callable[[], None]:
    """For a worker: from now on warnings (any thread) and log records reach ``sink`` as lines
    naming the image being read, instead of the console (the worker sends them to the run log).
    Returns what puts things back."""
    undo_warnings = _warnings_to(sink)
    handler = _LibraryHandler(sink, skip_own=False)
    root = logging.getLogger()
    root.addHandler(handler)
    undo_libtiff = _libtiff_errors_to(sink)

    def undo() -> None:
        undo_libtiff()
        root.removeHandler(handler)
        undo_warnings()

    return undo


def _warnings_to(sink: Callable[[str], None]) -> Callable[[], None]:
    """Python warnings (any thread) to ``sink`` as one line naming the image being read, instead of
    the console; the warning filters still decide what is shown. Returns what puts things back."""

    def show(message: Warning | str, category: type[Warning], *_where: object, **_kw: object) -> None:
        sink(_about(f"{category.__name__}: {message}"))

    previous = warnings.showwarning
    warnings.showwarning = show

    def undo() -> None:
        if warnings.showwarning is show:
            warnings.showwarning = previous

    return undo


#: The ctypes callbacks given to libtiff and GDAL, kept for the life of the process: the library
#: holds a pointer, and an undo may hand an earlier one back.
_C_CALLBACKS: list[Any] = []


def _libtiff_errors_to(sink: Callable[[str], None]) -> Callable[[], None]:
    """Pillow's libtiff prints its errors on stderr itself ("Using code not yet in table" for a
    damaged LZW strip, after which Pillow raises a bare "decoder error"): its error handler is
    pointed at ``sink``, naming the image. Where the library is not found (Windows links it into
    Pillow), nothing changes; its warnings Pillow handles itself."""
    try:
        import ctypes

        library = _pillow_libtiff()
        if library is None:
            return lambda: None
        lib, libc = ctypes.CDLL(library), ctypes.CDLL(None)
        handler = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)

        def on_error(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
            try:
                text = ctypes.create_string_buffer(1024)
                # The va_list is passed on as the pointer it arrives as (x86-64 and arm64 ABIs).
                libc.vsnprintf(text, ctypes.c_size_t(len(text)), fmt, ctypes.c_void_p(args))
                sink(_about(f"libtiff error: {text.value.decode('utf-8', 'replace')}"))
            except Exception:  # noqa: BLE001, S110 - a C callback must never raise
                pass

        _C_CALLBACKS.append(handler(on_error))
        lib.TIFFSetErrorHandler.restype = ctypes.c_void_p
        lib.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
        previous = lib.TIFFSetErrorHandler(ctypes.cast(_C_CALLBACKS[-1], ctypes.c_void_p))
    except Exception:  # noqa: BLE001 - best effort: libtiff keeps printing on stderr
        return lambda: None
    return lambda: lib.TIFFSetErrorHandler(previous)


#: GDAL's messages were pointed at Python's logging (once per process).
_GDAL_ROUTED = False


def _route_gdal_messages() -> None:
    """GDAL prints what it says outside a rasterio environment (reading a window of an open
    dataset, for instance: "Warning 1: TIFFFetchNormalTag: ...") on stderr itself: its default
    handler is pointed at the ``gdal`` logger, which the handlers above take, naming the image.
    rasterio's own handler, inside its environments, still comes first."""
    global _GDAL_ROUTED
    _GDAL_ROUTED = True
    try:
        import ctypes

        library = _loaded_library("libgdal", "rasterio")
        if library is None:
            return
        gdal = ctypes.CDLL(library)
        handler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
        levels = {2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}  # 1: debug, dropped

        def on_message(kind: int, number: int, message: bytes | None) -> None:
            try:
                if kind in levels:
                    text = (message or b"").decode("utf-8", "replace")
                    logging.getLogger("gdal").log(levels[kind], "CPLE %d: %s", number, text)
            except Exception:  # noqa: BLE001, S110 - a C callback must never raise
                pass

        _C_CALLBACKS.append(handler(on_message))
        gdal.CPLSetErrorHandler.restype = ctypes.c_void_p
        gdal.CPLSetErrorHandler.argtypes = [ctypes.c_void_p]
        gdal.CPLSetErrorHandler(ctypes.cast(_C_CALLBACKS[-1], ctypes.c_void_p))
    except Exception:  # noqa: BLE001, S110 - best effort: GDAL keeps printing on stderr
        pass


def _pillow_libtiff() -> str | None:
    return _loaded_library("libtiff", "PIL")


def _loaded_library(name: str, package: str) -> str | None:
    """The shared library ``name`` that ``package`` loaded: from the process's memory map (Linux),
    else the copy its macOS wheel ships; None when not found (not loaded yet, linked in)."""
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            fields = [line.split(maxsplit=5) for line in fh]
        found = sorted(
            {f[5].strip() for f in fields if len(f) == 6 and name in f[5].rsplit("/", 1)[-1]},
            key=lambda path: package.lower() not in path.lower(),  # the package's own copy first
        )
        return found[0] if found else None
    if sys.platform == "darwin":
        import glob
        import importlib

        folder = os.path.dirname(importlib.import_module(package).__file__ or "")
        dylibs = glob.glob(os.path.join(folder, ".dylibs", f"{name}*.dylib"))
        return dylibs[0] if dylibs else None
    return None


class _CleanFormatter(logging.Formatter):
    """One record = one line with escaped controls; a traceback follows as indented ``|`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        # Milliseconds: the report's rate of a short run is measured between two of these stamps.
        stamp = _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
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
        self._library: _LibraryHandler | None = None
        self._undo_libtiff: Callable[[], None] = lambda: None
        self._undo_warnings: Callable[[], None] = lambda: None

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
        # Libraries read images in this process too (previews, planning): their words go here.
        self._library = _LibraryHandler(self._logger.warning, skip_own=True)
        logging.getLogger().addHandler(self._library)
        self._undo_libtiff = _libtiff_errors_to(self._logger.warning)
        self._undo_warnings = _warnings_to(self._logger.warning)  # a night's record is its log
        prune_logs(log_dir, self.keep, protect=self.path)
        return self

    def close(self) -> None:
        """Stop writing and detach the handler; safe to call twice."""
        handler, self._handler = self._handler, None
        if handler is None:
            return
        if self._library is not None:
            self._undo_warnings()
            self._undo_libtiff()
            logging.getLogger().removeHandler(self._library)
            self._library = None
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
