"""Progress: plain lines for logs and pipes, a tqdm bar on a terminal."""

from __future__ import annotations

import io
import string

import pytest

from batchseg.records import ItemResult, Status
from batchseg.run_progress import Progress, format_duration


class Clock:
    """A clock the test moves by hand, so intervals and rates are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def result(status: Status = Status.OK) -> ItemResult:
    return ItemResult("a.jpg", status)


def test_plain_line_has_counts_rate_and_eta() -> None:
    clock = Clock()
    progress = Progress(1000, io.StringIO(), interval=60, is_tty=False, clock=clock)
    for k in range(120):
        progress.update(result(Status.ERROR if k in (5, 50) else Status.OK))
    clock.now += 35.18
    assert progress.line() == "progress: 120/1000 (12.0%) ok=118 failed=2 3.4 img/s eta 4m18s"


def test_plain_lines_come_every_interval_without_control_characters() -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress(30, stream, interval=10, is_tty=False, clock=clock)
    for _ in range(25):
        clock.now += 1
        progress.update(result())
    assert stream.getvalue().count("\n") == 2  # at 10 s and 20 s
    clock.now += 10
    progress.tick()  # an image that takes long still gets a line from the polling loop
    progress.close()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("progress: 25/30 (83.3%) ok=25 failed=0")
    allowed = set(string.printable) - set("\r\x0b\x0c\t")
    assert set(stream.getvalue()) <= allowed


def test_statuses_are_counted_as_ok_or_failed() -> None:
    progress = Progress(5, io.StringIO(), is_tty=False)
    for status in (Status.OK, Status.TIMEOUT, Status.CRASHED, Status.INVALID_INPUT, Status.SKIPPED):
        progress.update(result(status))
    assert (progress.done, progress.ok, progress.failed) == (5, 1, 3)


def test_rate_and_eta_before_anything_is_done() -> None:
    progress = Progress(10, io.StringIO(), is_tty=False, clock=Clock())
    assert progress.line() == "progress: 0/10 (0.0%) ok=0 failed=0 0.0 img/s eta ?"


def test_a_slow_rate_keeps_two_decimals() -> None:
    clock = Clock()
    progress = Progress(10, io.StringIO(), is_tty=False, clock=clock)
    progress.update(result())
    clock.now += 20
    assert "0.05 img/s eta 3m00s" in progress.line()


def test_a_non_tty_stream_gets_plain_lines_by_default() -> None:
    stream = io.StringIO()
    with Progress(2, stream, interval=0) as progress:
        progress.update(result())
    assert stream.getvalue().startswith("progress: 1/2")
    assert "\r" not in stream.getvalue()


def test_a_tty_gets_a_bar_with_counts() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream, is_tty=True)
    progress.update(result())
    progress.update(result(Status.ERROR))
    progress.close()
    out = stream.getvalue()
    assert "\r" in out and "img" in out and "2/4" in out
    assert "ok=1" in out and "failed=1" in out
    assert progress.line().startswith("progress: 2/4 (50.0%)")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (258, "4m18s"), (3600, "1h00m"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
