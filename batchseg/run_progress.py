"""Progress of a run: a tqdm bar on a terminal, plain lines in a log or a pipe.

On a TTY the bar shows images/s, ok/failed counts and the ETA. Elsewhere (cron, nohup, CI) a bar's
carriage returns make a mess, so one plain line is written every ``interval`` seconds instead::

    progress: 120/1000 (12.0%) ok=118 failed=2 3.4 img/s eta 4m18s

Lines are written from ``update()`` and ``tick()``; a caller whose images can take minutes calls
``tick()`` from its polling loop (e.g. inside ``should_stop``) so the log keeps moving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm import tqdm

from .records import FINAL_FAILURES, ItemResult, Status

__all__ = ["Progress", "format_duration"]


class Progress:
    """Counts final results and shows them; ``close()`` writes the last line (or closes the bar)."""

    def __init__(
        self,
        total: int,
        stream: IO[str] | None = None,
        interval: float = 60.0,
        is_tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream: IO[str] = stream if stream is not None else sys.stderr
        self.interval = interval
        self.done = 0
        self.ok = 0
        self.failed = 0
        self._clock = clock
        self._started = clock()
        self._last_line = self._started
        self._closed = False
        tty = _isatty(self.stream) if is_tty is None else is_tty
        self._bar: tqdm[Any] | None = None
        if tty:
            self._bar = tqdm(total=total, file=self.stream, unit="img", dynamic_ncols=True, smoothing=0.05)

    def update(self, result: ItemResult) -> None:
        """Count one final result."""
        self.done += 1
        if result.status is Status.OK:
            self.ok += 1
        elif result.status in FINAL_FAILURES:
            self.failed += 1
        if self._bar is not None:
            self._bar.set_postfix(ok=self.ok, failed=self.failed, refresh=False)
            self._bar.update(1)
        else:
            self.tick()

    def tick(self) -> None:
        """Write a plain line if ``interval`` seconds passed since the last one (no-op on a TTY)."""
        if self._bar is None and not self._closed and self._clock() - self._last_line >= self.interval:
            self._write_line()

    def line(self) -> str:
        """The plain progress line, e.g. for the log."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        remaining = max(self.total - self.done, 0)
        eta = format_duration(remaining / rate) if rate > 0 else "?"
        rate_text = f"{rate:.1f}" if rate >= 1 or rate == 0 else f"{rate:.2f}"
        return (
            f"progress: {self.done}/{self.total} ({percent:.1f}%) ok={self.ok} failed={self.failed} "
            f"{rate_text} img/s eta {eta}"
        )

    def close(self) -> None:
        """Finish the bar, or write the final plain line. Idempotent."""
        if self._closed:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._write_line()
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._last_line = self._clock()


def format_duration(seconds: float) -> str:
    """12s, 4m18s, 2h05m, 3d04h."""
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
