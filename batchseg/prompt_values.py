"""The kinds of value of the prompt options (``batchseg.values`` holds the general ones): a value
per prompt (``--class``, ``--prompt-threshold``) and the exemplar file (``--exemplars``), whose
fingerprint is its content. Torch-free and free of the run's configuration, so the option
registry imports it (the options' meaning is in ``prompting`` and ``exemplars``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadValueError, ConfigError
from .values import Fraction, Kind, PathValue, Text, TextList, show

__all__ = ["CLASS_KIND", "THRESHOLD_KIND", "ExemplarFile", "ExemplarsKind", "PromptMap", "file_digest"]

_SIDECARS = (".shx", ".dbf", ".prj", ".cpg")


class _Pair(Kind[tuple[str, Any]]):
    """``PROMPT=VALUE`` (the last ``=`` splits, so a prompt may hold one)."""

    def __init__(self, value: Kind[Any], metavar: str) -> None:
        self.value = value
        self.metavar = metavar
        self.expected = f"PROMPT=VALUE with VALUE {value.expected}"

    def read(self, value: object, toml: bool) -> tuple[str, Any]:
        if isinstance(value, tuple) and len(value) == 2:
            return value[0], value[1]
        text = Text().read(value, toml)
        prompt, equals, rest = text.rpartition("=")
        if not equals or not prompt.strip() or not rest.strip():
            raise self.refuse(value, toml)
        try:
            return prompt, self.value.from_text(rest.strip())
        except ConfigError:
            raise self.refuse(value, toml) from None


class PromptMap(TextList):
    """A value per prompt: ``--class roof=building`` (repeatable; ``a=x;b=y`` in one variable), in a
    job file a table (``class = { roof = "building" }``) or an array of ``"roof=building"``."""

    def __init__(self, value: Kind[Any], metavar: str) -> None:
        super().__init__("PROMPT=VALUE pairs", metavar)
        self.item = _Pair(value, metavar)
        self.expected = f"PROMPT=VALUE pairs (a table or a list of strings), VALUE {value.expected}"

    def read(self, value: object, toml: bool) -> Any:
        if toml and isinstance(value, dict):
            pairs = []
            for prompt, given in value.items():
                if not str(prompt).strip():
                    raise self.refuse(value, toml)
                try:
                    pairs.append((str(prompt), self.item.value.read(given, toml)))
                except ConfigError as exc:
                    raise BadValueError(f"{show(prompt)}: {exc}") from None
            return tuple(pairs)
        items = value.split(self.separator) if isinstance(value, str) and not toml else value
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list | tuple):
            raise self.refuse(value, toml)
        return tuple(self.item.read(v, toml) for v in items)

    def to_json(self, value: Any) -> Any:
        return [list(pair) for pair in value]

    def from_json(self, value: Any) -> Any:
        return tuple((str(p), v) for p, v in value)


#: The kinds of ``--class`` and ``--prompt-threshold``: tuples of (prompt, value) pairs.
CLASS_KIND: Kind[Any] = PromptMap(Text(), "PROMPT=CLASS")
THRESHOLD_KIND: Kind[Any] = PromptMap(Fraction(), "PROMPT=0..1")


@dataclass(frozen=True)
class ExemplarFile:
    """The ``--exemplars`` value: the file, and the SHA-256 of its content when it was given."""

    path: Path
    sha256: str


def file_digest(path: Path) -> str:
    """SHA-256 of the file (a Shapefile with its sidecars); BadValueError when it cannot be read."""
    digest = hashlib.sha256()
    parts = [path] + [path.with_suffix(s) for s in _SIDECARS if path.suffix.lower() == ".shp"]
    try:
        for part in parts:
            if part is path or part.is_file():
                digest.update(part.read_bytes())
    except OSError as exc:
        raise BadValueError(f"cannot read the exemplar file {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


class ExemplarsKind(Kind[ExemplarFile | None]):
    """A CSV or vector file of exemplar boxes; in a job file relative to the job file's folder."""

    metavar = "FILE"
    expected = "a CSV (path,x0,y0,x1,y1,label[,prompt]) or a vector file GDAL reads"

    def read(self, value: object, toml: bool) -> ExemplarFile:
        return self._of(PathValue().read(value, toml))

    def from_toml(self, value: object, base: Path) -> ExemplarFile:
        return self._of(PathValue().from_toml(value, base))

    @staticmethod
    def _of(path: Path) -> ExemplarFile:
        path = path.expanduser().resolve()
        if not path.is_file():
            raise BadValueError(f"no exemplar file {path}")
        return ExemplarFile(path, file_digest(path))

    def to_json(self, value: Any) -> Any:
        return None if value is None else {"path": str(value.path), "sha256": value.sha256}

    def from_json(self, value: Any) -> Any:
        return None if value is None else ExemplarFile(Path(value["path"]), str(value["sha256"]))

    def to_fingerprint(self, value: Any) -> Any:
        return None if value is None else value.sha256
