"""The morning report: overlay previews (``OUTPUT/previews/``) and ``OUTPUT/report.html``.

    write_report(output_dir)            report.html from the manifest, the run's metadata and its log
    make_missing_previews(output_dir)   previews of the images that have none yet
    PreviewMaker                        previews made on a few threads of the parent during a run

Torch-free: Pillow, numpy and pyarrow only.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..config import RunConfig
from ..errors import OutputError
from ..logs import RunLog
from ..remote import is_remote
from ..store.folder import existing_previews
from ..store.manifest import manifest_paths, read_manifest_run, refresh_preview_paths
from .data import collect_report
from .page import render_page
from .previews import (
    DEFAULT_PREVIEW_SIZE,
    PREVIEW_STATUSES,
    PreviewMaker,
    PreviewSpec,
    preview_relpath,
)

__all__ = [
    "REPORT_NAME",
    "PreviewMaker",
    "make_missing_previews",
    "preview_relpath",
    "report_after_run",
    "write_report",
]

REPORT_NAME = "report.html"


def write_report(output_dir: Path) -> Path:
    """Write ``OUTPUT/report.html`` atomically; returns its path. OutputError without a manifest."""
    output_dir = Path(output_dir)
    page = render_page(collect_report(output_dir))
    target = output_dir / REPORT_NAME
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(page.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())  # the rename must not reach the disk before the page
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


def report_after_run(
    config: RunConfig, log: RunLog, *, retried: bool, stopped: str | None = None
) -> Path | None:
    """The end of a run with previews or --report (or of a retry): the previews still missing
    (those queued when an earlier session was killed, or left by a long backlog), then report.html,
    whose path is the log's last line. A run stopped early (deadline, Ctrl-C) leaves the missing
    previews for the next run: it must end now.

    Never raises: the run's results are durable already and its exit code stands.
    """
    if not (config.previews or config.report or retried):
        return None
    try:
        if config.previews and not stopped:
            made, failed = make_missing_previews(config.output_dir, config.preview_size)
            if made or failed:
                log.info(f"previews made after the run: {made}; could not be made: {failed}")
        path = write_report(config.output_dir)
    except Exception as exc:  # noqa: BLE001 - a report is a by-product; never fail a finished run
        log.warning(f"no report written: {type(exc).__name__}: {exc}")
        return None
    log.info(f"report: {path}")
    return path


def make_missing_previews(
    output_dir: Path,
    max_side: int = DEFAULT_PREVIEW_SIZE,
    *,
    redo: bool = False,
    stream: TextIO | None = None,
    threads: int | None = None,
) -> tuple[int, int]:
    """Make the previews of ok (and error) images that have none (all of them with ``redo``).

    Returns (made, failed). Needs the input folder the run read (from its stored configuration).
    """
    output_dir = Path(output_dir)
    run = read_manifest_run(output_dir)
    images_path, detections_path = manifest_paths(output_dir)
    if run is None:
        raise OutputError(f"no readable batchseg manifest at {images_path}: run batchseg first")
    input_dir = Path(run.config.get("input", ""))
    if not input_dir.is_dir() and not is_remote(input_dir):  # an S3 prefix: read object by object
        raise OutputError(f"the run's input folder {input_dir} is not there: previews need the images")
    try:
        images = pq.read_table(images_path, columns=["path", "status", "mask_path"])
        images = images.filter(pc.is_in(images["status"], pa.array(PREVIEW_STATUSES)))
        detections = _detections_by_path(detections_path)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"cannot read the manifest in {images_path.parent}: {exc}") from exc
    existing = set() if redo else existing_previews(output_dir)
    jobs = [
        (row["path"], row["mask_path"], detections.get(row["path"], []))
        for row in images.to_pylist()
        if preview_relpath(row["path"]) not in existing
    ]
    spec = PreviewSpec(
        input_dir=input_dir,
        output_dir=output_dir,
        prompts=tuple(run.config.get("prompts", ())),
        max_side=max_side,
        max_pixels=int(run.config.get("max_pixels", 250_000_000)),
    )
    with PreviewMaker(spec, threads) as maker:
        maker.submit_many(jobs)
        last = time.monotonic()
        while maker.pending():
            time.sleep(0.1)
            if stream is not None and time.monotonic() - last >= 5:
                stream.write(f"previews: {len(jobs) - maker.pending():,} of {len(jobs):,}\n")
                last = time.monotonic()
    if maker.made:
        refresh_preview_paths(output_dir)  # images.parquet names the new previews too
    return maker.made, maker.failed


def _detections_by_path(path: Path) -> dict[str, list[tuple[str, int]]]:
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["path", "prompt", "index"])
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    cols = table.to_pydict()
    for rel, prompt, index in zip(cols["path"], cols["prompt"], cols["index"], strict=True):
        out[rel].append((prompt, index))
    return out
