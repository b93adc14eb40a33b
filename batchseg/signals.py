"""Ctrl-C and SIGTERM during a run: the first asks for a clean stop, the second stops at once.

    with StopRequest(notice=log.warning) as stop:
        run_pool(..., should_stop=stop)

The first SIGINT, SIGTERM (or SIGBREAK, Ctrl-Break on Windows) makes ``stop()`` return
"interrupted": the pool starts no new image and lets those in progress finish, and the run exits 4,
resumable. The second raises KeyboardInterrupt in the main thread, and the pool kills its workers
at once; on its way out the runner exports the manifest of what is recorded (a third signal then
meets the previous handler and is said, not hidden). The previous handlers come back when the
block ends. Python only runs signal handlers in
the main thread, so outside it ``StopRequest`` installs nothing (``request()`` still works).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopRequest"]

#: What ``StopRequest()`` returns after the first signal.
INTERRUPTED = "interrupted"


class StopRequest:
    """A ``should_stop`` callable that signals (or ``request()``) set; a context manager for handlers."""

    def __init__(self, notice: Callable[[str], None] | None = None) -> None:
        self.reason: str | None = None
        self.signal_name: str | None = None  # of the first signal, for the log
        self._notice = notice
        self._signals_seen = 0
        self._previous: dict[int, Any] = {}

    def __call__(self) -> str | None:
        return self.reason

    def request(self, reason: str) -> None:
        """Ask for a clean stop (e.g. a deadline); the first reason given is kept."""
        if self.reason is None:
            self.reason = reason

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in _stop_signals():
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            # None: the old handler was not set from Python; the default is the honest fallback.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self.request(INTERRUPTED)
        if self._notice is not None:
            self._notice(
                f"{self.signal_name} received: finishing the images in progress, then stopping "
                "(the run can be resumed); send it again to stop at once"
            )


def _stop_signals() -> list[int]:
    names = ("SIGINT", "SIGTERM", "SIGBREAK")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]
