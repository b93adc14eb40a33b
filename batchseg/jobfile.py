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
    :func:`batchseg.values.looks_like_path`), or
    when it names a folder that exists relative to the job file (``models/sam3``). Anything else
    (``facebook/sam3``) is kept as written. Write ``./models/sam3`` to mean a local folder for sure.

Values
    A job file that cannot be read, an unknown key or a bad value is a usage error (exit 2), as the
    same mistake on the command line is. Every key is an option of :mod:`batchseg.options` and is
    read by that option's kind (:mod:`batchseg.values`), the same parser the command line uses:
    ``timeout = "90m"`` means ``--timeout 90m``. TOML types are kept: durations take seconds (a
    number) or a duration string, ``deadline`` takes ``"HH:MM"`` or a TOML local time
    (``06:30:00``), ``workers``, ``threads`` and ``batch-size`` also take ``"auto"``;
    ``workers = "2"`` is refused.

This module is imported by the parent process: it never imports torch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .errors import BadValueError, ConfigError
from .options import OPTIONS, Option
from .values import WINDOWS_PATH_HINT, did_you_mean, duration_seconds, is_local_model_path, parse_hhmm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "JOB_OPTIONS",
    "duration_seconds",
    "is_local_model_path",
    "load_job_file",
    "option_for_key",
    "parse_hhmm",
]

#: Job-file key (with ``_``) -> the option it sets: the option's name, long option and aliases.
_KEYS: dict[str, Option] = {spelling: o for o in OPTIONS for spelling in o.spellings}
#: The RunConfig fields a job file can set: every run option.
JOB_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS)


def option_for_key(key: str) -> Option | None:
    """The option a job-file key sets (``max-attempts``, ``max_attempts``, ``prompt``), or None."""
    return _KEYS.get(key.replace("-", "_"))


def _unknown_key_message(key: str) -> str:
    if key.replace("-", "_") == "job":
        return f"key {key!r}: a job file cannot name another job file"
    spellings = sorted(_KEYS)
    if "-" in key:
        spellings = [s.replace("_", "-") for s in spellings]
    return f"unknown key {key!r}{did_you_mean(key, spellings)}"


# --------------------------------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadValueError(f"{path}: job file not found") from None
    except OSError as exc:
        raise BadValueError(f"{path}: cannot read the job file: {exc.strerror or exc}") from exc
    try:
        text = _decode(raw)
    except UnicodeDecodeError as exc:
        raise BadValueError(
            f"{path}: the job file is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadValueError(f"{path}: {_syntax_message(exc)}") from exc


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
    hint = f" ({WINDOWS_PATH_HINT})" if "escape" in message.lower() else ""
    return f"{where}: {message[:1].lower()}{message[1:]}{hint}"


def load_job_file(path: Path) -> dict[str, Any]:
    """Read and check a job file; return its options keyed by RunConfig field name.

    Values come back as RunConfig holds them: ``input``/``output`` as absolute Paths and ``model``
    as an absolute folder or a hub id (see the module doc for the rules), lists as tuples of strings,
    durations as float seconds, ``deadline`` as ``"HH:MM"``, ``"auto"`` as None. Raises BadValueError
    (exit 2, as a bad flag is) naming the file, the key and what was expected.
    """
    path = Path(path)
    data = _read_toml(path)
    base = path.parent.resolve()
    options: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        found = option_for_key(key)
        if found is None:
            raise BadValueError(f"{path}: {_unknown_key_message(key)}")
        if found.name in spelled:
            raise BadValueError(f"{path}: keys {spelled[found.name]!r} and {key!r} set the same option")
        spelled[found.name] = key
        try:
            options[found.name] = found.kind.from_toml(value, base)
        except ConfigError as exc:
            raise BadValueError(f"{path}: key {key!r}: {exc}") from None
    return options
