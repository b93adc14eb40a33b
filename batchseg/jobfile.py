"""Job files: the options of ``batchseg run`` kept in a TOML file, for nightly and repeated runs.

A job file holds the run options as top-level keys, spelled like the long option with ``-`` or ``_``
(``max-attempts`` or ``max_attempts``). ``prompt`` (or ``prompts``) takes a string or a list.
:func:`load_job_file` checks every key and value and returns a dict keyed by
:class:`~batchseg.config.RunConfig` field names, ready to be the CLI's defaults, so that command-line
flags > environment variables > job file > built-in defaults.

Paths in a job file
    ``input``, ``output`` and ``model`` may be relative: they are relative to the job file's folder,
    not to the folder the scheduler happens to start in. A path written for Windows (a drive letter
    such as ``D:\\aerial`` or any backslash) is kept exactly as written on every OS: joining it to a
    POSIX folder would only mangle it. ``~`` is expanded.

``model``: local folder or hub id
    A hub id is ``owner/name``: exactly one ``/`` and nothing else path-like. ``model`` is a local
    folder when it is not of that shape (absolute; starts with ``.``, ``~`` or ``\\``; has a drive
    letter, a backslash, no ``/`` or several: the rule of
    :func:`batchseg.engines.sam3.model.looks_like_path`), or
    when it names a folder that exists relative to the job file (``models/sam3``). Anything else
    (``facebook/sam3``) is kept as written. Write ``./models/sam3`` to mean a local folder for sure.

Time values
    ``timeout``, ``load-timeout``, ``max-runtime``, ``progress-interval`` and ``manifest-interval``
    take seconds (a number) or a duration string (``"90m"``, ``"1h30m"``); ``deadline`` takes
    ``"HH:MM"`` or a TOML local time (``06:30:00``). ``workers``, ``threads`` and ``batch-size``
    also take ``"auto"``.

This module is imported by the parent process: it never imports torch.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "JOB_OPTIONS",
    "duration_seconds",
    "is_local_model_path",
    "load_job_file",
    "parse_hhmm",
]

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

_DURATION_RE = re.compile(
    r"^(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?"
    r"(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)
_HHMM_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_WINDOWS_PATH_HINT = (
    "in TOML, write Windows paths in single quotes ('D:\\aerial\\incoming') "
    'or double every backslash ("D:\\\\aerial\\\\incoming")'
)


# --------------------------------------------------------------------------------------- durations


def duration_seconds(text: str) -> float:
    """Seconds in a duration such as ``"6h"``, ``"90m"``, ``"45s"``, ``"1h30m"``, ``"2d"`` or ``"3600"``.

    Raises ConfigError for anything else, and for a duration of zero.
    """
    cleaned = str(text).strip().lower().replace(" ", "")
    seconds: float | None = None
    try:
        seconds = float(cleaned)
    except ValueError:
        match = _DURATION_RE.match(cleaned)
        if match and cleaned:
            parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
            seconds = (
                parts.get("d", 0.0) * 86400
                + parts.get("h", 0.0) * 3600
                + parts.get("m", 0.0) * 60
                + parts.get("s", 0.0)
            )
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"expected a duration like 6h, 90m, 45s or 1h30m (more than zero), got {_show(text)}"
        )
    return seconds


def parse_hhmm(text: str) -> tuple[int, int]:
    """``"02:00"`` -> ``(2, 0)``: a time of day on the 24-hour clock. ConfigError if it is not one."""
    match = _HHMM_RE.match(str(text).strip())
    if match:
        hour, minute = int(match.group(1)), int(match.group(2))
        if hour <= 23 and minute <= 59:
            return hour, minute
    raise ConfigError(f"expected a time of day HH:MM on the 24-hour clock (e.g. 02:00), got {_show(text)}")


# --------------------------------------------------------------------------------------- paths


def _is_windows_style(value: str) -> bool:
    return bool(_DRIVE_RE.match(value)) or "\\" in value


def _is_absolute(value: str) -> bool:
    return PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def is_local_model_path(value: str, base: Path | None = None) -> bool:
    """Whether a ``model`` value names a local folder rather than a hub id (rule in the module doc)."""
    from .engines.sam3.model import looks_like_path  # the loader's own rule, so both agree

    if looks_like_path(value):
        return True
    candidate = (base / value) if base is not None else Path(value)
    return candidate.is_dir()


def _resolve_path(value: str, base: Path) -> str:
    """A path from the job file, made absolute against the job file's folder where that is safe."""
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if os.name != "nt" and _is_windows_style(value):
        return value  # a Windows path read on POSIX: keep it intact, joining would mangle it
    if _is_absolute(value):
        return value
    return str((base / value).resolve())


# --------------------------------------------------------------------------------------- messages


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return "date/time"
    return type(value).__name__


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, escaped and shortened for one line of message."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "{...}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value[:5]) + (", ...]" if len(value) > 5 else "]")
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: object) -> str:
    return f"got {_show(value)} ({_toml_type(value)})"


class _Bad(Exception):
    """A value failed its check; the message says what was expected. Becomes a ConfigError."""


# --------------------------------------------------------------------------------------- value checks

Checker = Callable[[Any, Path], Any]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_min(minimum: int, auto: bool = False) -> Checker:
    def check(value: Any, base: Path) -> int | None:
        if auto and value == "auto":
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        extra = ' or "auto"' if auto else ""
        raise _Bad(f"expected an integer >= {minimum}{extra}, {_got(value)}")

    return check


def _fraction(value: Any, base: Path) -> float:
    if _is_number(value) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise _Bad(f"expected a number from 0 to 1, {_got(value)}")


def _seconds(value: Any, base: Path) -> float:
    if _is_number(value) and math.isfinite(value) and value > 0:
        return float(value)
    if isinstance(value, str):
        try:
            return duration_seconds(value)
        except ConfigError:
            pass
    raise _Bad(f'expected seconds > 0 or a duration like "90m" or "1h30m", {_got(value)}')


def _deadline(value: Any, base: Path) -> str:
    if isinstance(value, _dt.time) and value.second == 0 and value.microsecond == 0:
        return f"{value.hour:02d}:{value.minute:02d}"
    if isinstance(value, str):
        try:
            hour, minute = parse_hhmm(value)
            return f"{hour:02d}:{minute:02d}"
        except ConfigError:
            pass
    raise _Bad(f'expected a time of day "HH:MM" on the 24-hour clock (e.g. "06:30"), {_got(value)}')


def _boolean(value: Any, base: Path) -> bool:
    if isinstance(value, bool):
        return value
    raise _Bad(f"expected true or false, {_got(value)}")


def _device(value: Any, base: Path) -> str:
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    hint = ""
    if isinstance(value, str):
        # "gpu" is closest to "cpu" by spelling, but the user wants the GPU.
        wants_gpu = "gpu" in value.lower()
        hint = "; did you mean 'cuda'?" if wants_gpu else _did_you_mean(value, ["auto", "cpu", "cuda"])
    raise _Bad(f"expected one of auto, cpu, cuda, cuda:N (N = 0, 1, ...), {_got(value)}{hint}")


def _backend(value: Any, base: Path) -> str:
    if value in ("local", "ray"):
        return str(value)
    raise _Bad(f"expected local or ray, {_got(value)}")


def _ray_address(value: Any, base: Path) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _Bad(f"expected auto or HOST:PORT, {_got(value)}")


def _engine(value: Any, base: Path) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value.strip()):
        return value.strip()
    raise _Bad(f"expected MODULE:FUNCTION (e.g. batchseg.engines.threshold:load), {_got(value)}")


def _dtype(value: Any, base: Path) -> str:
    if isinstance(value, str) and value in DTYPE_CHOICES:
        return value
    hint = _did_you_mean(value, list(DTYPE_CHOICES)) if isinstance(value, str) else ""
    raise _Bad(f"expected one of {', '.join(DTYPE_CHOICES)}, {_got(value)}{hint}")


def _text(value: Any) -> str:
    """A non-empty one-line string; control characters usually mean a mangled backslash escape."""
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a non-empty string, {_got(value)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise _Bad(
            f"the value contains a control character (tab, newline, ...), {_got(value)}; "
            f"a backslash escape in a double-quoted string? {_WINDOWS_PATH_HINT}"
        )
    return value


def _path(value: Any, base: Path) -> str:
    return _resolve_path(_text(value), base)


def _model(value: Any, base: Path) -> str:
    text = _text(value)
    return _resolve_path(text, base) if is_local_model_path(text, base) else text


def _string_list(what: str) -> Checker:
    def check(value: Any, base: Path) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and items and all(isinstance(v, str) and v.strip() for v in items):
            return tuple(items)
        raise _Bad(f"expected a non-empty string or a list of non-empty strings ({what}), {_got(value)}")

    return check


#: RunConfig field -> check that returns the converted value or raises _Bad.
_CHECKS: dict[str, Checker] = {
    "input": _path,
    "prompts": _string_list("prompts"),
    "model": _model,
    "engine": _engine,
    "output": _path,
    "device": _device,
    "dtype": _dtype,
    "threshold": _fraction,
    "mask_threshold": _fraction,
    "max_detections": _int_min(1),
    "max_pixels": _int_min(1),
    "workers": _int_min(1, auto=True),
    "threads": _int_min(1, auto=True),
    "batch_size": _int_min(1, auto=True),
    "timeout": _seconds,
    "load_timeout": _seconds,
    "max_attempts": _int_min(1),
    "max_images_per_worker": _int_min(1),
    "max_consecutive_failures": _int_min(1),
    "deadline": _deadline,
    "max_runtime": _seconds,
    "include": _string_list("glob patterns"),
    "exclude": _string_list("glob patterns"),
    "hash": _boolean,
    "compile": _boolean,
    "cuda_graphs": _boolean,
    "fuse_rope": _boolean,
    "new_run": _boolean,
    "log_keep": _int_min(1),
    "progress_interval": _seconds,
    "manifest_interval": _seconds,
    "backend": _backend,
    "ray_address": _ray_address,
}
#: Keys a job file may spell differently from the RunConfig field.
_ALIASES = {"prompt": "prompts"}
#: The RunConfig fields a job file can set.
JOB_OPTIONS: tuple[str, ...] = tuple(_CHECKS)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _field_for(key: str) -> str | None:
    name = key.replace("-", "_")
    name = _ALIASES.get(name, name)
    return name if name in _CHECKS else None


def _unknown_key_message(key: str) -> str:
    if key.replace("-", "_") == "job":
        return f"key {key!r}: a job file cannot name another job file"
    spellings = sorted(set(_CHECKS) | set(_ALIASES))
    if "-" in key:
        spellings = [s.replace("_", "-") for s in spellings]
    return f"unknown key {key!r}{_did_you_mean(key, spellings)}"


# --------------------------------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job file: {exc.strerror or exc}") from exc
    try:
        text = _decode(raw)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the job file is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {_syntax_message(exc)}") from exc


def _decode(raw: bytes) -> str:
    # Notepad may add a UTF-8 BOM, or save as "Unicode" (UTF-16): accept both rather than fail at 2 am.
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def _syntax_message(exc: Exception) -> str:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    where = "TOML syntax error"
    if match:
        where = f"line {match.group(1)}, column {match.group(2)}: TOML syntax error"
        message = message[: match.start()]
    elif message.endswith("(at end of document)"):
        where = "at the end of the file: TOML syntax error"
        message = message[: -len("(at end of document)")].rstrip()
    if message == "Cannot overwrite a value":
        message = "a key is set twice"
    hint = f" ({_WINDOWS_PATH_HINT})" if "escape" in message.lower() else ""
    return f"{where}: {message[:1].lower()}{message[1:]}{hint}"


def load_job_file(path: Path) -> dict[str, Any]:
    """Read and check a job file; return its options keyed by RunConfig field name.

    Values come back converted: paths as absolute strings (see the module doc for the rules),
    ``prompts``/``include``/``exclude`` as tuples of strings, durations as float seconds, ``deadline``
    as ``"HH:MM"``, ``"auto"`` as None. Raises ConfigError naming the file, the key and what was
    expected.
    """
    path = Path(path)
    data = _read_toml(path)
    base = path.parent.resolve()
    options: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        name = _field_for(key)
        if name is None:
            raise ConfigError(f"{path}: {_unknown_key_message(key)}")
        if name in spelled:
            raise ConfigError(f"{path}: keys {spelled[name]!r} and {key!r} set the same option")
        spelled[name] = key
        try:
            options[name] = _CHECKS[name](value, base)
        except _Bad as exc:
            raise ConfigError(f"{path}: key {key!r}: {exc}") from None
    return options
