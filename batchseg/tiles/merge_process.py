"""A tiled image's merge in a helper process beside the worker, fed as tiles finish.

The worker's thread feeds the engine and mostly waits on the device; merging a dense image's
tiles is seconds of small numpy steps. In a thread of the worker the two fought over the GIL
(measured on an H200 with 729 dense tiles: the merge thread needed over 30 s of wall time for about
5 s of work, and the image waited for it); in a process of its own the merge runs on another core.

The helper (``python -m batchseg.tiles.merge_process``) starts at a worker's first tiled image and
stays for the next ones. It gets each batch's finished tiles as (prompt, score, RLE) rows, never
pixels, through its stdin (written by a thread, so the engine's thread never waits on a full
pipe), and answers the merged detections with their RLE on its stdout. It never outlives its
worker by more than a moment, even deep in a long merge step: a thread reads its stdin and ends it
at end of input, a thread watches the worker (its parent id on POSIX, its process handle on
Windows), and on Linux the kernel kills it with the worker (parent-death signal). A helper that died
is started again for the next image; the image it was merging fails with an error saying so. An
image given up before its merge's end (a failing tile) ends its helper at once, so the next image
never waits behind an abandoned merge. For an image whose tiles are spread over
several workers, the helper of each worker that runs some of them follows the image's folder of
kept tiles (``follow``), so the worker that takes the image's merge finds it mostly done.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from .. import rle
from .grid import TilePlan, plan_tiles
from .merge import MergedDetection, MergeRules, TileDetection, TileMerger, describe
from .progress import TileProgress

__all__ = ["MergeProcess", "RemoteMerge", "shared", "stop_shared"]

_HEADER = struct.Struct("<Q")

#: Exit status of a helper that found its worker gone.
ORPHAN_EXIT_CODE = 70
_PARENT_POLL_S = 0.5


class _Row(NamedTuple):
    """What merging needs of a tile's detection (fits ``merge.TileDetection``)."""

    prompt: str
    score: float
    mask_rle: str
    folded: tuple[str, ...] = ()


class MergeProcess:
    """The worker's merge helper: started on first use, started again when it has died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._sends: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._serial = 0
        self._open = False  # the image of ``_serial`` was begun and neither finished nor given up

    def begin(self, plan: TilePlan, rules: MergeRules, progress: TileProgress | None = None) -> RemoteMerge:
        """A new image's merge. With the image's ``progress``, a merge the helper has been following
        there (``follow``) goes on instead of a new one: its tiles are in already. An earlier image
        left unfinished ends the helper first (it may be deep in that image's merge)."""
        if self._open:
            self.stop()
        self._ensure_started()
        self._serial += 1
        self._open = True
        self._send(("begin", self._serial, _geometry(plan), rules, *_where(progress)))
        return RemoteMerge(self, self._serial)

    def follow(self, progress: TileProgress, plan: TilePlan, rules: MergeRules) -> None:
        """Have the helper merge the tiles kept in ``progress`` (by any worker) as they land, for
        when this worker merges the image: it reads the files it has not read yet now, and again at
        each later call. A worker that runs some tiles of an image spread over several workers
        calls it as it keeps them. The helper follows two images at most, and forgets one whose
        folder is gone (merged elsewhere)."""
        self._ensure_started()
        self._send(("follow", 0, _geometry(plan), rules, *_where(progress)))

    @property
    def pid(self) -> int | None:
        """The helper's process id, None when none is running."""
        return None if self._proc is None else self._proc.pid

    def _ensure_started(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._start()

    def _start(self) -> None:
        # The thread that starts the helper also feeds it, and lives exactly as long as it: Linux
        # sends the parent-death signal when the starting THREAD ends, not the process.
        sends: queue.SimpleQueue[Any] = queue.SimpleQueue()
        started: queue.SimpleQueue[subprocess.Popen[bytes] | BaseException] = queue.SimpleQueue()
        feeder = threading.Thread(
            target=_start_and_feed, args=(sends, started), name="batchseg-merge-feed", daemon=True
        )
        feeder.start()
        proc = started.get()
        if isinstance(proc, BaseException):
            raise proc
        self._proc, self._sends = proc, sends

    def _abandon(self, serial: int) -> None:
        """Image ``serial`` is given up before its end: end the helper, which may be busy with it
        for a long time yet (a huge plan, a dense tile); the next image starts a new one."""
        if serial == self._serial and self._open:
            self._open = False
            self.stop()

    def _send(self, message: tuple[Any, ...]) -> None:
        self._sends.put(message)

    def _reply(self, serial: int) -> tuple[list[MergedDetection], list[str]]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            kind, got, *body = _read(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            code = proc.poll()
            self.stop()
            raise RuntimeError(f"the merge process ended (exit code {code}) before its answer") from exc
        if got != serial:  # cannot happen while one image is merged at a time; start afresh
            self.stop()
            raise RuntimeError(f"the merge process answered image {got}, not {serial}")
        if kind == "failed":
            raise RuntimeError(f"merging failed: {body[0]}")
        return body[0], body[1]

    def stop(self) -> None:
        """End the helper (the next image starts a new one)."""
        proc, self._proc, self._open = self._proc, None, False
        if proc is not None:
            self._sends.put(None)  # the feeder closes the helper's input
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class RemoteMerge:
    """One image's merge in the helper: ``add`` finished tiles, then ``result``."""

    def __init__(self, helper: MergeProcess, serial: int) -> None:
        self._helper, self._serial, self._done = helper, serial, False

    def add(self, done: Mapping[str, Sequence[TileDetection]]) -> None:
        if done:
            rows = {
                t: [_Row(d.prompt, float(d.score), d.mask_rle, tuple(d.folded)) for d in dets]
                for t, dets in done.items()
            }
            self._helper._send(("add", self._serial, rows))

    def result(self) -> tuple[list[MergedDetection], list[str]]:
        """The merged detections and the RLE of each over the whole image."""
        self._done = True
        self._helper._open = False  # answered or failed, the helper is done with this image
        self._helper._send(("finish", self._serial))
        return self._helper._reply(self._serial)

    def close(self) -> None:
        """The image is over; given up before ``result`` (a failed tile), its helper ends at once."""
        if not self._done:
            self._done = True
            self._helper._abandon(self._serial)


def _geometry(plan: TilePlan) -> tuple[int, int, int, int]:
    return (plan.width, plan.height, plan.side, plan.overlap)


def _where(progress: TileProgress | None) -> tuple[str | None, Any]:
    return (None, None) if progress is None else (str(progress.folder), progress.key)


_SHARED: MergeProcess | None = None


def shared() -> MergeProcess:
    """This process's merge helper."""
    global _SHARED
    if _SHARED is None:
        _SHARED = MergeProcess()
    return _SHARED


def stop_shared() -> None:
    """End this process's merge helper, if one runs (a worker's last act)."""
    if _SHARED is not None:
        _SHARED.stop()


def _start_and_feed(
    sends: queue.SimpleQueue[Any], started: queue.SimpleQueue[subprocess.Popen[bytes] | BaseException]
) -> None:
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if sys.stderr is not None else subprocess.DEVNULL,  # pythonw.exe has none
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console from a nightly job
        )
    except BaseException as exc:  # noqa: BLE001 - raised again in the thread that asked
        started.put(exc)
        return
    started.put(proc)
    assert proc.stdin is not None
    _feed(proc.stdin, sends)


def _feed(stream: IO[bytes], sends: queue.SimpleQueue[Any]) -> None:
    """Write queued messages to the helper until None (then close its input: the helper ends) or
    until the helper is gone (the image's ``result`` says so)."""
    with contextlib.suppress(OSError, ValueError), stream:
        while (message := sends.get()) is not None:
            _write(stream, message)


def _write(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    header = _read_exactly(stream, _HEADER.size)
    return pickle.loads(_read_exactly(stream, _HEADER.unpack(header)[0]))  # noqa: S301 - our own child


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the pipe closed")
    return data


def serve(inbox: IO[bytes], outbox: IO[bytes]) -> None:
    """The helper's loop: one image at a time, until its input closes; meanwhile it may follow the
    kept tiles of images spread over several workers (``MergeProcess.follow``). The input is read
    by a thread of its own, so its end ends the process at once, even in a long merge step."""
    messages = _read_in_background(inbox)
    serial, merger, error = 0, None, ""
    following = _Following()
    while True:
        kind, got, *body = messages.get()
        if kind == "follow":
            following.scan(*body)
        elif kind == "begin":
            serial = got
            geometry, rules, folder, key = body
            merger, error = following.adopt(geometry, rules, folder, key) or (
                rules.merger(plan_tiles(*geometry)),
                "",
            )
        elif got != serial or merger is None:
            continue  # a message of an image that was dropped
        elif kind == "add" and not error:
            try:
                for tile_id, rows in body[0].items():
                    if tile_id not in merger:  # a followed merge has most of them already
                        merger.add(tile_id, rows)
            except Exception as exc:  # noqa: BLE001 - the image's error, said at its finish
                error = describe(exc)  # names the tile, and what went wrong even without a message
        elif kind == "finish":
            try:
                _write(outbox, _answer(serial, merger, error))
            except OSError:
                return  # the worker is gone (killed while it waited): nobody to answer
            merger = None


def _read_in_background(inbox: IO[bytes]) -> queue.SimpleQueue[Any]:
    """The messages on ``inbox``, read by a thread that ends the process when the input closes:
    the worker ended, was killed, or stopped this helper, and nobody wants an answer any more."""
    messages: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                messages.put(_read(inbox))
        except (EOFError, OSError, ValueError, pickle.UnpicklingError):
            os._exit(0)

    threading.Thread(target=read, name="batchseg-merge-inbox", daemon=True).start()
    return messages


def _exit_with_parent(parent_pid: int) -> None:
    """End this helper when its worker ends, however it ends and whatever the main thread is doing:
    the kernel's parent-death signal on Linux (a C call holding the GIL cannot delay it), and a
    thread watching the parent id (POSIX) or waiting on the parent's process handle (Windows)."""
    if sys.platform == "win32":
        _wait_for_parent_process(parent_pid)
        return
    if sys.platform.startswith("linux"):
        # The kernel SIGKILLs this process when the worker's thread that started it ends (that
        # thread feeds the helper and ends only with it, or with the worker).
        with contextlib.suppress(Exception):  # the watching thread still covers this case
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the worker died before the signal was asked for
        os._exit(ORPHAN_EXIT_CODE)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="batchseg-merge-parent-watch", daemon=True).start()


if sys.platform == "win32":

    def _wait_for_parent_process(parent_pid: int) -> None:
        """Windows: a thread waits on the worker's process handle and ends this helper with it."""
        import ctypes
        from ctypes import wintypes

        synchronize, infinite, no_such_process = 0x00100000, 0xFFFFFFFF, 87  # ERROR_INVALID_PARAMETER
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        kernel32.OpenProcess.restype = wintypes.HANDLE
        kernel32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
        kernel32.WaitForSingleObject.restype = wintypes.DWORD
        handle = kernel32.OpenProcess(synchronize, False, parent_pid)
        if not handle:
            if ctypes.get_last_error() == no_such_process:
                os._exit(ORPHAN_EXIT_CODE)  # the worker is gone already
            return  # cannot watch it: the end of the input still ends this helper

        def wait() -> None:
            kernel32.WaitForSingleObject(handle, infinite)  # ctypes releases the GIL meanwhile
            os._exit(ORPHAN_EXIT_CODE)

        threading.Thread(target=wait, name="batchseg-merge-parent-watch", daemon=True).start()


@dataclass
class _Followed:
    """A merge fed from an image's folder of kept tiles: the files read, and what went wrong."""

    geometry: tuple[int, int, int, int]
    rules: MergeRules
    progress: TileProgress
    merger: TileMerger
    seen: set[str] = field(default_factory=set)
    error: str = ""

    def serves(self, geometry: tuple[int, int, int, int], rules: MergeRules, key: Any) -> bool:
        """Whether this is the merge of that plan, rules and image (key of its kept tiles)."""
        return (self.geometry, self.rules, self.progress.key) == (geometry, rules, key)


class _Following:
    """The images whose kept tiles the helper merges as they land, by folder: at most ``LIMIT``
    (the oldest goes first), and none whose folder is gone (the image was merged elsewhere)."""

    LIMIT = 2

    def __init__(self) -> None:
        self.images: dict[str, _Followed] = {}

    def scan(self, geometry: tuple[int, int, int, int], rules: MergeRules, folder: str, key: Any) -> None:
        for other in [f for f in self.images if f != folder and not os.path.isdir(f)]:
            del self.images[other]
        followed = self.images.get(folder)
        if followed is None or not followed.serves(geometry, rules, key):
            merger = rules.merger(plan_tiles(*geometry))
            followed = _Followed(geometry, rules, TileProgress(Path(folder), key), merger)
            self.images.pop(folder, None)
            self.images[folder] = followed
            while len(self.images) > self.LIMIT:
                del self.images[next(iter(self.images))]
        if followed.error:
            return
        try:
            for tile_id, detections in followed.progress.load_new(followed.seen).items():
                if tile_id not in followed.merger:  # a tile kept twice (a rerun): the first counts
                    followed.merger.add(tile_id, detections)
        except Exception as exc:  # noqa: BLE001 - the image's error, said at its finish
            followed.error = describe(exc)

    def adopt(
        self, geometry: tuple[int, int, int, int], rules: MergeRules, folder: str | None, key: Any
    ) -> tuple[TileMerger, str] | None:
        """The merge followed for this image and its error, taken out of the list; None if none."""
        followed = self.images.pop(folder, None) if folder is not None else None
        if followed is None or not followed.serves(geometry, rules, key):
            return None
        return followed.merger, followed.error


def _answer(serial: int, merger: TileMerger, error: str) -> tuple[Any, ...]:
    if not error:
        try:
            merged = merger.finish()
            runs = [(m.mask.starts, m.mask.ends) for m in merged]
            rles = rle.encode_runs_many(runs, merger.plan.height, merger.plan.width)
            return ("merged", serial, merged, rles)
        except Exception as exc:  # noqa: BLE001
            error = describe(exc)
    return ("failed", serial, error)


def main() -> None:
    # The worker names itself: by the time this runs it may be gone, and our parent someone else.
    _exit_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
    # Answers go to the real stdout; anything a library prints goes to stderr, not into the stream.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    if sys.stderr is not None:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    else:  # pythonw.exe and service hosts have no console streams
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
