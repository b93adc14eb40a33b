"""Keeping the output folder whole while a run goes on: manifest exports that survive a file held
open by another program, a dead worker's temp files removed when it exits, a warning for an input
folder without a single image. Called by the runner; the parent process only (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from .atomic import FileHeldError, held_file_patience, remove_temp_files_of
from .imageio import mask_relpath
from .logs import RunLog
from .records import Status
from .store.checkpoint import Checkpoint
from .store.manifest import export_manifest
from .supervise.pool import PoolEvent
from .supervise.settings import EventKind

__all__ = [
    "FINAL_EXPORT_PATIENCE_S",
    "PERIODIC_EXPORT_PATIENCE_S",
    "WorkerFiles",
    "export",
    "warn_empty_input",
]

#: How long a manifest export waits for a held manifest file (Windows): a periodic export blocks the
#: pool's loop, so it gives up soon and the next interval tries again; the final one waits longer.
PERIODIC_EXPORT_PATIENCE_S = 5.0
FINAL_EXPORT_PATIENCE_S = 120.0


def export(
    checkpoint: Checkpoint, output_dir: Path, log: RunLog, *, final: bool, stream: TextIO | None = None
) -> None:
    """Export the manifest; a manifest file held open by another program (Windows) does not end the
    run: the previous manifest stays whole, a periodic export is tried again at the next interval,
    and after the final one the run keeps the exit code of its images and says how to export again.
    """
    patience = FINAL_EXPORT_PATIENCE_S if final else PERIODIC_EXPORT_PATIENCE_S
    try:
        with held_file_patience(patience):
            export_manifest(checkpoint, output_dir, polygons=final)
    except FileHeldError as exc:
        if not final:
            log.warning(f"manifest not exported (tried again at the next interval): {exc}")
            return
        text = (
            f"the manifest in {output_dir / 'manifest'} is out of date: {exc}. The checkpoint holds "
            "every result: run the same command again once the file is closed to export it"
        )
        log.warning(text)
        if stream is not None:
            stream.write(f"warning: {text}\n")


def warn_empty_input(root: Path, checkpoint: Checkpoint, log: RunLog, stream: TextIO | None) -> None:
    """No image at all in the input: usually a wrong path or a share that is not mounted."""
    missing = checkpoint.counts().get(str(Status.MISSING), 0)
    text = f"no image found in {root}; check the path (a network share: is it mounted?)"
    if missing:
        text += f"; the {missing} image(s) of earlier runs now show as missing until it is back"
    log.warning(text)
    if stream is not None:
        stream.write(f"warning: {text}\n")


class WorkerFiles:
    """Removes a dead worker's unfinished temp files when it exits (crash, watchdog kill), not at
    the next start: remembers the mask folders of each worker's latest task, and scans only those."""

    def __init__(self, output_dir: Path, log: RunLog) -> None:
        self.output_dir = output_dir
        self.log = log
        self.folders: dict[int, set[Path]] = {}

    def see(self, event: PoolEvent) -> None:
        if event.pid is None:
            return
        if event.kind == EventKind.TASK_STARTED:
            self.folders[event.pid] = {(self.output_dir / mask_relpath(p)).parent for p in event.paths}
        elif event.kind == EventKind.WORKER_EXITED:
            removed = remove_temp_files_of(event.pid, self.folders.pop(event.pid, ()))
            if removed:
                self.log.info(f"removed {removed} unfinished temp file(s) of worker pid {event.pid}")
