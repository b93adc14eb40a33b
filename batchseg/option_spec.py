"""How one run option is declared: ``option(...)`` on a field of ``options.RunOptions`` makes an
``Option`` (name, kind of value, default, help, fingerprint, retry, reader, upgrade).

Torch-free; batchseg.options holds the declarations themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar, overload

from .values import Kind

__all__ = ["NO_UPGRADE", "REQUIRED", "Option", "Reader", "option"]

T = TypeVar("T")


class Reader(str, Enum):
    """The part of batchseg that reads an option."""

    ENGINE = "engine"  # the engine, inside each worker process (batchseg/engines)
    POOL = "pool"  # the worker pool (supervise.pool.PoolSettings.from_config)
    RUNNER = "runner"  # the runner: discovery, checkpoint, logs, stop times


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


class _NoUpgrade:
    def __repr__(self) -> str:
        return "NO_UPGRADE"


REQUIRED: Any = _Required()
NO_UPGRADE: Any = _NoUpgrade()


@dataclass(frozen=True)
class Option:
    """One run option, as declared in RunOptions."""

    name: str  # the RunConfig field
    kind: Kind[Any]
    default: Any  # REQUIRED for an option without a default
    help: str  # one line for --help
    reader: Reader
    fingerprint: bool = False  # decides the outputs: fixed for an output folder
    retry: bool = False  # `batchseg retry` accepts it
    upgrade: Any = NO_UPGRADE  # fingerprint options added later: the value that means the old behaviour
    #: left out of the fingerprint while at ``upgrade``: a run that does not use the option has the
    #: fingerprint (and hash) of the version before it
    quiet: bool = False
    argument: bool = False  # a positional argument (INPUT) rather than --name
    flag: str = ""  # the long option when it is not --name (--prompt)
    aliases: tuple[str, ...] = ()  # more job-file keys and BATCHSEG_* names
    default_text: str = ""  # the default in words, where it is chosen at run time

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def cli_name(self) -> str:
        """``--max-attempts``; ``INPUT`` for the argument."""
        if self.argument:
            return self.name.upper()
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def spellings(self) -> tuple[str, ...]:
        """The names it goes by, with ``_``: field, long option, aliases (job-file keys)."""
        names = [self.name, self.cli_name.lstrip("-").replace("-", "_").lower(), *self.aliases]
        return tuple(dict.fromkeys(names))

    @property
    def envvars(self) -> tuple[str, ...]:
        """``BATCHSEG_<NAME>``, the long option's name first."""
        names = [self.cli_name.lstrip("-").replace("-", "_"), *self.spellings]
        return tuple(dict.fromkeys(f"BATCHSEG_{n.upper()}" for n in names))

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` and the reference of options (docs/reference/options.md) show it."""
        if self.default_text:
            return self.default_text
        if self.required:
            return "(required)"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if self.default is None or self.default == ():
            return ""
        if isinstance(self.default, float) and self.default.is_integer():
            return f"`{int(self.default)}`"
        return f"`{self.default}`"


@overload
def option(
    kind: Kind[T],
    default: T,
    *,
    help: str,
    reader: Reader,
    fingerprint: bool = ...,
    retry: bool = ...,
    upgrade: Any = ...,
    quiet: bool = ...,
    argument: bool = ...,
    flag: str = ...,
    aliases: tuple[str, ...] = ...,
    default_text: str = ...,
) -> T: ...
@overload
def option(
    kind: Kind[T],
    *,
    help: str,
    reader: Reader,
    fingerprint: bool = ...,
    retry: bool = ...,
    upgrade: Any = ...,
    quiet: bool = ...,
    argument: bool = ...,
    flag: str = ...,
    aliases: tuple[str, ...] = ...,
    default_text: str = ...,
) -> T: ...
def option(kind: Kind[Any], default: Any = REQUIRED, **spec: Any) -> Any:
    """Declare a field of RunOptions as a run option (see the module doc)."""
    declared = Option(name="", kind=kind, default=default, **spec)
    if default is REQUIRED:
        return field(metadata={"option": declared})
    return field(default=default, metadata={"option": declared})
