"""Errors batchseg raises, each carrying the exit code the CLI turns it into, and the exit codes.

    BatchsegError                 exit 1, the root: anything fatal to a run
    ├── ConfigError               a configuration the input, model or engine cannot use
    │   └── BadValueError         exit 2: a value the options refuse, from a flag, a BATCHSEG_*
    │                             variable or a job file (a usage error, like click's own)
    ├── ModelLoadError            the model folder is incomplete or cannot be loaded
    ├── OutputError               the output folder cannot be written (read-only, disk full, path too long)
    ├── ConfigMismatchError       the output folder holds a run with another configuration
    ├── RunLockedError            another live batchseg run holds the output folder
    └── StoppedEarly              exit 4: Ctrl-C, deadline or circuit breaker; the run is resumable
        └── CircuitBreakerTripped the same error repeated on too many images in a row

Per-image problems are never exceptions across the pipe: they become an ItemResult status.
``ExitCode`` names every exit status of ``batchseg``; the runner and the CLI use these names only.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

__all__ = [
    "ExitCode",
    "BatchsegError",
    "CircuitBreakerTripped",
    "BadValueError",
    "ConfigError",
    "ConfigMismatchError",
    "ModelLoadError",
    "OutputError",
    "RunLockedError",
    "StoppedEarly",
    "InvalidImageError",
]


class ExitCode(IntEnum):
    """What ``batchseg`` exits with. A run with images not ok never exits 0."""

    OK = 0
    FATAL = 1
    USAGE = 2  # click's own code for a usage error
    NOT_ALL_OK = 3
    STOPPED = 4

    @property
    def meaning(self) -> str:
        """One line for ``--help``; docs/reference/exit-codes.md lists the codes."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "all images ok",
    ExitCode.FATAL: (
        "fatal error (a configuration the input, model or engine refuses, model cannot load, "
        "output not writable)"
    ),
    ExitCode.USAGE: "usage error (a bad option or value: flag, BATCHSEG_* variable or job file)",
    ExitCode.NOT_ALL_OK: "finished, some images not ok",
    ExitCode.STOPPED: (
        "stopped early (Ctrl-C, deadline, circuit breaker), run the same command again to resume"
    ),
}


class BatchsegError(Exception):
    """Root of the errors that end a run; ``exit_code`` is what the CLI exits with."""

    exit_code: ClassVar[ExitCode] = ExitCode.FATAL


class ConfigError(BatchsegError):
    """An option, job file or prompt that cannot be used."""


class BadValueError(ConfigError):
    """A value the options themselves refuse: a bad value, an unknown option or job-file key, options
    that cannot go together. Exit 2 wherever the value came from (flag, variable or job file)."""

    exit_code: ClassVar[ExitCode] = ExitCode.USAGE


class ModelLoadError(BatchsegError):
    """The model cannot be found, is incomplete, or fails to load."""


class OutputError(BatchsegError):
    """The output folder cannot be written."""


class ConfigMismatchError(BatchsegError):
    """The output folder holds a run made with another configuration."""


class RunLockedError(BatchsegError):
    """Another live batchseg run holds the output folder."""


class StoppedEarly(BatchsegError):
    """The run stopped before every image was tried; running the same command again resumes it."""

    exit_code: ClassVar[ExitCode] = ExitCode.STOPPED


class CircuitBreakerTripped(StoppedEarly):
    """The same failure repeated on too many images in a row."""


class InvalidImageError(Exception):
    """One input file is not a usable image (per-image status ``invalid_input``, never fatal)."""
