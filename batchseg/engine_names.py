"""Engines by name: ``--engine sam3``, ``--engine threshold``, or a name another package registers.

A package registers an engine in the entry-point group ``batchseg.engines`` (pyproject:
``[project.entry-points."batchseg.engines"] bright = "bright:load"``). A name stands for its
``MODULE:FUNCTION``, and a run keeps and fingerprints that form, so an output folder made with
either spelling resumes with the other, as do folders made before engines had names. Torch-free:
looking a name up reads package metadata and imports nothing.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points

from .errors import BadValueError
from .values import Kind, did_you_mean, show, toml_type

__all__ = [
    "BUILT_IN_ENGINES",
    "ENTRY_POINT_GROUP",
    "SAM3_ENGINE",
    "EngineRef",
    "engine_target",
    "known_engines",
]

ENTRY_POINT_GROUP = "batchseg.engines"
SAM3_ENGINE = "batchseg.engines.sam3.engine:load_engine"
#: The engines batchseg ships; a registered engine cannot take one of these names.
BUILT_IN_ENGINES = {"sam3": SAM3_ENGINE, "threshold": "batchseg.engines.threshold:load"}

#: MODULE:FUNCTION, the function maybe an attribute of a class (``plugin:Engine.load``), as
#: entry points may name it.
_TARGET_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_NAME_RE = re.compile(r"[A-Za-z_][\w.-]*")


def known_engines() -> dict[str, str]:
    """Every engine name with its ``MODULE:FUNCTION``: the built-in ones and the registered ones."""
    registered = {ep.name: f"{ep.module}:{ep.attr}" for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**registered, **BUILT_IN_ENGINES}


def engine_target(ref: str) -> str:
    """The ``MODULE:FUNCTION`` that ``ref`` (a name or that form already) stands for; BadValueError
    (exit 2) naming the known engines if it is neither."""
    return EngineRef().read(ref, toml=False)


class EngineRef(Kind[str]):
    """An engine: its name (``sam3``, ``threshold``, a registered one) or ``MODULE:FUNCTION``, read
    as ``MODULE:FUNCTION``."""

    expected = "an engine name or MODULE:FUNCTION (e.g. threshold or batchseg.engines.threshold:load)"
    metavar = "NAME|MODULE:FUNCTION"

    def read(self, value: object, toml: bool) -> str:
        text = value.strip() if isinstance(value, str) else ""
        if _TARGET_RE.fullmatch(text):
            return text
        if not _NAME_RE.fullmatch(text):
            raise self.refuse(value, toml)
        known = known_engines()
        if text in known:
            return known[text]
        got = f"{show(value)} ({toml_type(value)})" if toml else show(value)
        raise BadValueError(
            f"no engine is named {got}; the known names are {', '.join(sorted(known))} "
            f"(or give MODULE:FUNCTION){did_you_mean(text, list(known))}"
        )
