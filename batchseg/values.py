"""The kinds of value a run option takes: one parser per kind, shared by every source of options.

A kind reads text (a command-line flag, a ``BATCHSEG_*`` variable) and a TOML value (a job file)
into the same Python value: ``--timeout 90m``, ``BATCHSEG_TIMEOUT=90m`` and ``timeout = "90m"`` are
all 5400.0 seconds. TOML values keep their types (``workers = "2"`` is refused, ``workers = 2`` is
not). A refusal is a BadValueError (exit 2) that says what was expected and what was given. Torch-free.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Generic, TypeGuard, TypeVar

from .errors import BadValueError, ConfigError

__all__ = [
    "Choice",
    "Count",
    "CountOrAuto",
    "Device",
    "Duration",
    "Flag",
    "Fraction",
    "Kind",
    "ModelRef",
    "Number",
    "PathValue",
    "Text",
    "TextList",
    "TileSide",
    "TimeOfDay",
    "SHOWN_CHARS",
    "WINDOWS_PATH_HINT",
    "duration_seconds",
    "is_local_model_path",
    "looks_like_path",
    "parse_hhmm",
    "show",
]

T_co = TypeVar("T_co", covariant=True)

WINDOWS_PATH_HINT = (
    "in TOML, write Windows paths in single quotes ('D:\\aerial\\incoming') "
    'or double every backslash ("D:\\\\aerial\\\\incoming")'
)
#: The words a boolean takes as text: click's own set, so a flag's BATCHSEG_* variable reads alike.
BOOL_WORDS = {"1": True, "true": True, "t": True, "yes": True, "y": True, "on": True}
BOOL_WORDS |= {"0": False, "false": False, "f": False, "no": False, "n": False, "off": False}

_DURATION_RE = re.compile(
    r"^(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?"
    r"(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)
_HHMM_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
#: The longest a value is echoed in a message; a longer one is cut, with its length said.
SHOWN_CHARS = 80


# --------------------------------------------------------------------------------------- messages


def toml_type(value: object) -> str:
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


def show(value: object) -> str:
    """A value as the user wrote it, escaped and cut to ``SHOWN_CHARS`` for one line of message:
    a 10,000-character prompt shows as its first characters, ``...`` and its length."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "{...}"
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v) for v in value[:5]) + (", ...]" if len(value) > 5 else "]")
    else:
        text = str(value)
    if len(text) <= SHOWN_CHARS:
        return text
    length = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return text[: SHOWN_CHARS - 3] + "..." + length


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------- the parsers


def duration_seconds(text: str) -> float:
    """Seconds in a duration such as ``"6h"``, ``"90m"``, ``"45s"``, ``"1h30m"``, ``"2d"`` or ``"3600"``.

    Raises BadValueError for anything else, and for a duration of zero.
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
        raise BadValueError(
            f"expected a duration like 6h, 90m, 45s or 1h30m (more than zero), got {show(text)}"
        )
    return seconds


def parse_hhmm(text: str) -> tuple[int, int]:
    """``"02:00"`` -> ``(2, 0)``: a time of day on the 24-hour clock. BadValueError if it is not one."""
    match = _HHMM_RE.match(str(text).strip())
    if match:
        hour, minute = int(match.group(1)), int(match.group(2))
        if hour <= 23 and minute <= 59:
            return hour, minute
    raise BadValueError(f"expected a time of day HH:MM on the 24-hour clock (e.g. 02:00), got {show(text)}")


def is_local_model_path(value: str, base: Path | None = None) -> bool:
    """Whether a ``model`` value names a local folder rather than a hub id: it looks like a path
    (the model loader's own rule), or it names a folder that exists relative to ``base``."""

    if looks_like_path(value):
        return True
    candidate = (base / value) if base is not None else Path(value)
    return candidate.is_dir()


def _resolve_path(value: str, base: Path) -> str:
    """A path from a job file, made absolute against the job file's folder where that is safe."""
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if os.name != "nt" and (_DRIVE_RE.match(value) or "\\" in value):
        return value  # a Windows path read on POSIX: keep it intact, joining would mangle it
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute():
        return value
    return str((base / value).resolve())


# --------------------------------------------------------------------------------------- kinds


class Kind(Generic[T_co]):
    """One kind of value. ``read`` does the work; ``from_toml`` may also place it (paths).

    ``expected`` completes "expected ..." in a refusal; ``metavar`` names it in ``--help``.
    """

    expected = "a value"
    metavar = "TEXT"

    def read(self, value: object, toml: bool) -> T_co:
        raise NotImplementedError

    def from_text(self, text: str) -> T_co:
        """A value written as text: a command-line flag or a ``BATCHSEG_*`` variable."""
        return self.read(text, toml=False)

    def from_toml(self, value: object, base: Path) -> T_co:
        """A value from a job file in the folder ``base``, with its TOML type."""
        return self.read(value, toml=True)

    def to_json(self, value: Any) -> Any:
        """The value as the stored configuration and the fingerprint hold it."""
        return value

    def from_json(self, value: Any) -> Any:
        """Inverse of ``to_json``."""
        return value

    def to_fingerprint(self, value: Any) -> Any:
        """The value as the fingerprint holds it (a file's content rather than its path)."""
        return self.to_json(value)

    def refuse(self, value: object, toml: bool, hint: str = "") -> BadValueError:
        got = f"{show(value)} ({toml_type(value)})" if toml else show(value)
        return BadValueError(f"expected {self.expected}, got {got}{hint}")


class Text(Kind[str]):
    """A non-empty string on one line."""

    expected = "a non-empty string"

    def read(self, value: object, toml: bool) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.refuse(value, toml)
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            # In a job file this usually is a mangled backslash escape ("C:\new" holds a newline).
            hint = f"; a backslash escape in a double-quoted string? {WINDOWS_PATH_HINT}" if toml else ""
            got = f"{show(value)} (string)" if toml else show(value)
            raise BadValueError(
                f"the value contains a control character (tab, newline, ...), got {got}{hint}"
            )
        return value


class PathValue(Kind[Path]):
    """A file or folder; in a job file, relative to the job file's folder (Windows paths kept)."""

    metavar = "PATH"

    def read(self, value: object, toml: bool) -> Path:
        return Path(Text().read(value, toml))

    def from_toml(self, value: object, base: Path) -> Path:
        return Path(_resolve_path(Text().read(value, toml=True), base))

    def to_json(self, value: Any) -> Any:
        return None if value is None else str(value)

    def from_json(self, value: Any) -> Any:
        return None if value is None else Path(value)


class ModelRef(Kind[str]):
    """A model folder or hub id; in a job file a folder is relative to the job file's folder."""

    metavar = "DIR|HUB-ID"

    def read(self, value: object, toml: bool) -> str:
        return Text().read(value, toml)

    def from_toml(self, value: object, base: Path) -> str:
        text = Text().read(value, toml=True)
        return _resolve_path(text, base) if is_local_model_path(text, base) else text


class TextList(Kind[tuple[str, ...]]):
    """One or more non-empty strings: repeat the flag, a TOML string or array, or ``a;b`` as text."""

    separator = ";"

    def __init__(self, what: str, metavar: str = "TEXT") -> None:
        self.what = what
        self.metavar = metavar
        self.expected = f"a non-empty string or a list of non-empty strings ({what})"

    def read(self, value: object, toml: bool) -> tuple[str, ...]:
        items = value.split(self.separator) if isinstance(value, str) and not toml else value
        items = [items] if isinstance(items, str) else items
        if isinstance(items, list) and items and all(isinstance(v, str) and v.strip() for v in items):
            return tuple(items)
        raise self.refuse(value, toml)

    def to_json(self, value: Any) -> Any:
        return list(value)

    def from_json(self, value: Any) -> Any:
        return tuple(value)


class Flag(Kind[bool]):
    expected = "true or false"
    metavar = "BOOLEAN"

    def read(self, value: object, toml: bool) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and not toml and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        raise self.refuse(value, toml)


def _read_int(value: object, toml: bool) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and not toml:
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


class Count(Kind[int]):
    """An integer with a minimum."""

    metavar = "N"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum
        self.expected = f"an integer >= {minimum}"

    def read(self, value: object, toml: bool) -> int:
        number = _read_int(value, toml)
        if number is None or number < self.minimum:
            raise self.refuse(value, toml)
        return number


class CountOrAuto(Kind[int | None]):
    """An integer with a minimum, or ``auto`` (None: batchseg chooses)."""

    metavar = "N|auto"

    def __init__(self, minimum: int = 1) -> None:
        self.count = Count(minimum)
        self.expected = f'an integer >= {minimum} or "auto"'

    def read(self, value: object, toml: bool) -> int | None:
        if isinstance(value, str) and value.strip() == "auto":
            return None
        try:
            return self.count.read(value, toml)
        except ConfigError:
            raise self.refuse(value, toml) from None


def _read_float(value: object, toml: bool) -> float | None:
    if _is_number(value):
        return float(value)
    if isinstance(value, str) and not toml:
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


class Number(Kind[float]):
    """A finite number above a minimum (``exclusive``: the minimum itself is refused)."""

    metavar = "X"

    def __init__(self, minimum: float = 0.0, exclusive: bool = True) -> None:
        self.minimum, self.exclusive = minimum, exclusive
        self.expected = f"a number {'>' if exclusive else '>='} {minimum:g}"

    def read(self, value: object, toml: bool) -> float:
        number = _read_float(value, toml)
        low = self.minimum
        if number is None or not math.isfinite(number) or number < low or (self.exclusive and number == low):
            raise self.refuse(value, toml)
        return number


class Fraction(Kind[float]):
    """A number from 0 to 1."""

    expected = "a number from 0 to 1"
    metavar = "0..1"

    def read(self, value: object, toml: bool) -> float:
        number = _read_float(value, toml)
        if number is None or not 0.0 <= number <= 1.0:  # NaN fails both comparisons
            raise self.refuse(value, toml)
        return number


class Duration(Kind[float]):
    """Seconds: a number, or a duration such as ``90m``, ``6h``, ``1h30m`` (text or TOML string)."""

    metavar = "DURATION"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum
        bound = "> 0" if minimum == 0 else f">= {minimum:g}"
        self.expected = f'seconds {bound} or a duration like "90m" or "1h30m"'

    def read(self, value: object, toml: bool) -> float:
        seconds: float | None = float(value) if _is_number(value) else None
        if isinstance(value, str):
            try:
                seconds = duration_seconds(value)
            except ConfigError:
                seconds = None
        if seconds is None or not math.isfinite(seconds) or seconds <= 0 or seconds < self.minimum:
            raise self.refuse(value, toml)
        return seconds


class TimeOfDay(Kind[str]):
    """``HH:MM`` on the 24-hour clock, kept as that text; a TOML local time works too."""

    expected = 'a time of day "HH:MM" on the 24-hour clock (e.g. "06:30")'
    metavar = "HH:MM"

    def read(self, value: object, toml: bool) -> str:
        if isinstance(value, _dt.time) and value.second == 0 and value.microsecond == 0:
            return f"{value.hour:02d}:{value.minute:02d}"
        if isinstance(value, str):
            try:
                hour, minute = parse_hhmm(value)
                return f"{hour:02d}:{minute:02d}"
            except ConfigError:
                pass
        raise self.refuse(value, toml)


class TileSide(Kind[str | None]):
    """``auto``, ``off`` or a tile side in pixels (at least 64), kept as text: "auto", "off", "1008".
    The one parser of ``--tile``: ``tiles.grid.parse_tile`` reads the option through it."""

    minimum = 64  # merging compares masks inside the overlap: a smaller tile leaves too little
    expected = f"auto, off or a tile side in pixels (an integer >= {minimum})"
    metavar = "auto|off|N"

    def read(self, value: object, toml: bool) -> str | None:
        if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
            return value.strip().lower()
        number = _read_int(value, toml)
        if number is None or number < self.minimum:
            raise self.refuse(value, toml)
        return str(number)


class Choice(Kind[str]):
    """One of a few words."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.expected = f"one of {', '.join(choices)}"
        self.metavar = "|".join(choices)

    def read(self, value: object, toml: bool) -> str:
        if isinstance(value, str) and value in self.choices:
            return value
        hint = did_you_mean(value, self.choices) if isinstance(value, str) else ""
        raise self.refuse(value, toml, hint)


class Device(Kind[str]):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    expected = "one of auto, cpu, cuda, cuda:N (N = 0, 1, ...)"
    metavar = "auto|cpu|cuda|cuda:N"

    def read(self, value: object, toml: bool) -> str:
        if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            return value
        hint = ""
        if isinstance(value, str):
            # "gpu" is closest to "cpu" by spelling, but the user wants the GPU.
            wants_gpu = "gpu" in value.lower()
            hint = "; did you mean 'cuda'?" if wants_gpu else did_you_mean(value, ["auto", "cpu", "cuda"])
        raise self.refuse(value, toml, hint)


def looks_like_path(model_id: str) -> bool:
    """True when ``model_id`` is meant as a folder rather than a hub id like ``facebook/sam3``.

    A hub id has exactly one slash and no path punctuation; anything absolute, relative with ``.``
    or ``~``, with a backslash, a drive letter or several slashes is a path.
    """
    if model_id.startswith(("/", ".", "~", "\\")) or "\\" in model_id:
        return True
    if re.match(r"^[A-Za-z]:", model_id):
        return True
    return model_id.count("/") != 1 or model_id.endswith("/")
