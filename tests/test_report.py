"""report.html from a real run (tiny SAM3, previews on), opened in a real headless browser.

The browser is Debian's chromium driven by Playwright's Python package through its executable path
(``.ci/run`` installs chromium with apt-get; where it is missing these tests say so and skip).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_image

from batchseg.cli import cli
from batchseg.config import RunConfig
from batchseg.records import Item, ItemResult, Status
from batchseg.report import REPORT_NAME, write_report
from batchseg.runner import retry, run
from batchseg.store.checkpoint import Checkpoint
from batchseg.store.manifest import export_manifest, manifest_paths

CHROMIUM = Path("/usr/bin/chromium")
PROMPTS = ("roof", "solar panel")
NAMES = ["a.jpg", "b #1 100%.jpg", "sub/дом.png", "sub/<b>&'x'.jpg", "c.jpg", "d.png"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) to run this test"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


class Opened:
    """A report page loaded in the browser, with what went wrong while loading it."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        started = time.perf_counter()
        self.page.goto(path.resolve().as_uri(), wait_until="load")
        self.load_s = time.perf_counter() - started

    def number(self, selector: str) -> int:
        return int(self.page.inner_text(selector).replace(",", ""))

    def images_ok(self) -> tuple[int, list[str]]:
        """Loads every image of the page (lazy ones too); returns (count, sources that broke)."""
        broken: list[str] = self.page.evaluate(
            """async () => {
              const imgs = [...document.images];
              await Promise.all(imgs.map(img => { img.loading = 'eager';
                return img.complete ? null : new Promise(r => { img.onload = img.onerror = r; }); }));
              return imgs.filter(img => !(img.naturalWidth > 0)).map(img => img.src);
            }"""
        )
        return self.page.locator("img").count(), broken


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A run with previews: six images (names that need escaping in HTML and URLs) and a broken one."""
    root = tmp_path_factory.mktemp("report") / "in"
    for k, name in enumerate(NAMES):
        make_image(root / name, (160 + 16 * k, 120), k)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    config = RunConfig(
        input=root,
        prompts=PROMPTS,
        model=str(tiny_model),
        output=root.parent / "out",
        device="cpu",
        threshold=0.0,
        max_detections=3,
        workers=1,
        timeout=60,
        previews=True,
        preview_size=200,
    )
    summary = run(config)
    assert summary.exit_code == 3 and summary.counts["ok"] == len(NAMES)
    assert summary.log_path is not None
    last = summary.log_path.read_text(encoding="utf-8").splitlines()[-1]
    assert last.endswith(f"INFO    report: {summary.output_dir / REPORT_NAME}")  # the log names it
    # Every preview was made while the run went on: none was left to the pass at its end.
    assert "previews made after the run" not in summary.log_path.read_text(encoding="utf-8")
    return summary.output_dir


def test_run_with_previews_writes_previews_and_report(finished_run: Path) -> None:
    for name in NAMES:
        preview = finished_run / "previews" / f"{name}.jpg"
        assert preview.is_file(), name
        from PIL import Image

        with Image.open(preview) as jpeg:
            assert jpeg.format == "JPEG" and max(jpeg.size) <= 200
    assert not (finished_run / "previews" / "broken.jpg.jpg").exists()
    # images.parquet names each preview that exists, and only those
    import pyarrow.parquet as pq

    rows = pq.read_table(finished_run / "manifest" / "images.parquet").to_pylist()
    named = {r["path"]: r["preview_path"] for r in rows}
    for path, preview in named.items():
        assert preview == (
            f"previews/{path}.jpg" if (finished_run / f"previews/{path}.jpg").is_file() else None
        )
    assert sum(p is not None for p in named.values()) >= len(NAMES)
    assert (finished_run / REPORT_NAME).stat().st_mode & 0o777 == 0o644  # for whoever opens the share
    text = (finished_run / REPORT_NAME).read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # nothing fetched from anywhere
    assert "<b>&'x'" not in text  # names are escaped (in HTML and in the gallery's JSON)


def test_report_in_a_browser_matches_the_manifest(finished_run: Path, browser: Any, tmp_path: Path) -> None:
    opened = Opened(browser, finished_run / REPORT_NAME)
    count, broken = opened.images_ok()
    opened.page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert opened.errors == [] and opened.failed == [] and broken == []
    assert count == 2 * len(NAMES)  # "most detections" and "a sample" show every ok image
    assert "sub/<b>&'x'.jpg" in opened.page.inner_text("#gallery-most")  # shown as it is named

    images = pq.read_table(finished_run / "manifest/images.parquet")
    detections = pq.read_table(finished_run / "manifest/detections.parquet")
    for row in pc.value_counts(images["status"]).to_pylist():
        assert opened.number(f"#count-{row['values']}") == row["counts"]
    assert opened.number("#count-error") == 0
    assert opened.number("#total-images") == images.num_rows
    assert opened.number("#total-detections") == detections.num_rows
    for row in detections.group_by("prompt").aggregate([("path", "count")]).to_pylist():
        cell = opened.page.locator(f'tr.prompt-row[data-prompt="{row["prompt"]}"] td.det-count')
        assert int(cell.inner_text().replace(",", "")) == row["path_count"]
    assert opened.page.inner_text("#exit-code") == "3"
    group = opened.page.locator("details.failure-group")
    assert group.count() == 1
    assert (group.get_attribute("data-status"), group.get_attribute("data-count")) == ("invalid_input", "1")
    assert "broken.jpg" in group.inner_text()
    assert opened.page.locator("#score-histogram rect").count() > 0
    # Links to the manifest files and the log resolve to files that are there.
    for href in opened.page.eval_on_selector_all("#files a", "els => els.map(a => a.href)"):
        assert Path(href.removeprefix("file://").replace("%20", " ")).is_file(), href
    opened.page.close()


def test_report_command_makes_missing_previews(finished_run: Path) -> None:
    gone = finished_run / "previews" / "b #1 100%.jpg.jpg"
    gone.unlink()
    result = CliRunner().invoke(cli, ["report", str(finished_run), "--previews", "--preview-size", "128"])
    assert result.exit_code == 0, result.output
    assert "previews: 1 made" in result.output and f"report: {finished_run / REPORT_NAME}" in result.output
    assert gone.is_file()
    import pyarrow.parquet as pq

    rows = pq.read_table(finished_run / "manifest" / "images.parquet").to_pylist()
    assert {r["path"]: r["preview_path"] for r in rows}["b #1 100%.jpg"] == "previews/b #1 100%.jpg.jpg"


def test_report_command_without_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert f"no readable batchseg manifest at {tmp_path / 'manifest/images.parquet'}" in result.output


def test_retry_writes_the_report(finished_run: Path) -> None:
    before = (finished_run / REPORT_NAME).stat().st_mtime_ns
    # No timed-out image: nothing to rerun and no worker to start, yet the report is written.
    summary = retry(finished_run, (Status.TIMEOUT,), overrides={"previews": False})
    assert summary.processed == 0 and summary.counts["invalid_input"] == 1
    assert (finished_run / REPORT_NAME).stat().st_mtime_ns > before
    assert summary.log_path is not None
    assert (
        summary.log_path.read_text(encoding="utf-8")
        .splitlines()[-1]
        .endswith(f"report: {finished_run / REPORT_NAME}")
    )


def big_run(folder: Path, n: int) -> Path:
    """An output folder holding ``n`` images (1.5 detections each on average, 1 in 15 failed in
    four ways) and previews for 60 of them.

    The schema and the run's metadata come from a real export (one image through the checkpoint);
    the rows are written with pyarrow, as the export would write them, in a second rather than 20.
    """
    (folder / "in").mkdir()
    output = folder / "out"
    config = RunConfig(input=folder / "in", prompts=("roof", "tree"), output=output)
    checkpoint = Checkpoint.open(output, config)
    try:
        checkpoint.record(ItemResult("seed.jpg", Status.OK), Item("seed.jpg", 1, 1))
        export_manifest(checkpoint, output)
    finally:
        checkpoint.close()
    images_path, detections_path = manifest_paths(output)
    i = np.arange(n)
    paths = [f"tiles/{k // 1000:03d}/{k:06d}.jpg" for k in range(n)]
    kind = np.where(i % 60 < 4, i % 60, -1)  # 0, 1: error; 2: invalid_input; 3: timeout; -1: ok
    status = np.array(["error", "error", "invalid_input", "timeout", "ok"])[kind]
    error_type = np.array(["OutOfMemoryError", "ValueError", "InvalidImageError", None, None])[kind]
    n_det = np.where(kind < 0, i % 4, 0).astype(np.int32)
    started = (time.time() - n / 50 + i / 50) * 1e6
    columns = {
        "path": paths,
        "status": status,
        "error_type": error_type,
        "error_message": np.where(kind >= 0, "it went wrong", None),
        "n_detections": n_det,
        "started_at": started.astype(np.int64),
        "finished_at": (started + 20_000).astype(np.int64),
        "device": np.where(kind < 0, "cuda:0 test", None),
        "attempts": np.ones(n, np.int32),
    }
    schema = pq.read_schema(images_path)
    arrays = [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), images_path)
    owner = np.repeat(i, n_det)
    k = np.concatenate([np.arange(c) for c in n_det]) if n_det.any() else np.zeros(0, int)
    det_columns = {
        "path": [paths[j] for j in owner],
        "prompt": np.where(k % 2 == 0, "roof", "tree"),
        "index": (k + 1).astype(np.int32),
        "score": 0.3 + 0.1 * k,
    }
    det_schema = pq.read_schema(detections_path)
    m = len(owner)
    det_arrays = [
        pa.array(det_columns[f.name], f.type) if f.name in det_columns else pa.nulls(m, f.type)
        for f in det_schema
    ]
    pq.write_table(pa.Table.from_arrays(det_arrays, schema=det_schema), detections_path)
    jpeg = make_image(folder / "small.jpg", (64, 48))
    # The images with the most detections, and three that failed with an error (a plain preview).
    for j in [*range(3, 4 * 60, 4), 0, 1, 60]:
        target = output / "previews" / f"{paths[j]}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(jpeg, target)
    return output


def test_big_manifest_opens_fast(tmp_path: Path, browser: Any) -> None:
    """100,000 images, 150,000 detections: the report is written from the manifest and opens in
    under two seconds; the gallery pages through its capped list."""
    output = big_run(tmp_path, 100_000)
    started = time.perf_counter()
    page_path = write_report(output)
    written_s = time.perf_counter() - started
    assert page_path.stat().st_size < 1_000_000
    opened = Opened(browser, page_path)
    assert opened.load_s < 2.0, f"opened in {opened.load_s:.2f} s"
    assert opened.errors == [] and opened.failed == []
    images = pq.read_table(output / "manifest/images.parquet", columns=["status", "error_type"])
    for row in pc.value_counts(images["status"]).to_pylist():
        assert opened.number(f"#count-{row['values']}") == row["counts"]
    failed = images.filter(pc.is_in(images["status"], pa.array(["error", "timeout", "invalid_input"])))
    expected = {
        (r["status"], r["error_type"] or "(no type)"): r["status_count"]
        for r in failed.group_by(["status", "error_type"]).aggregate([("status", "count")]).to_pylist()
    }
    shown = opened.page.eval_on_selector_all(
        "details.failure-group", "els => els.map(e => [e.dataset.status, e.dataset.type, +e.dataset.count])"
    )
    assert {(s, t): n for s, t, n in shown} == expected
    assert opened.number("#failure-total") == failed.num_rows
    assert opened.page.inner_text("#gallery-failures .page-info") == "page 1 of 1 (3 images)"
    assert "error: OutOfMemoryError" in opened.page.inner_text("#gallery-failures")
    info = opened.page.locator("#gallery-most .page-info")
    assert info.inner_text() == "page 1 of 2 (48 images)"
    opened.page.click("#gallery-most .next")
    assert info.inner_text() == "page 2 of 2 (48 images)"
    count, broken = opened.images_ok()
    assert broken == [] and count == 24 + 3  # page 2 of "most detections", the failures; no sample
    print(f"100,000 rows: written in {written_s:.2f} s, opened in {opened.load_s:.2f} s")
    opened.page.close()
    shutil.rmtree(output)


def test_report_after_run_only_when_asked_and_never_raises(tmp_path: Path) -> None:
    from batchseg.logs import RunLog
    from batchseg.report import report_after_run

    config = RunConfig(input=tmp_path, prompts=("roof",), output=tmp_path / "out")
    with RunLog(tmp_path / "logs") as log:
        assert report_after_run(config, log, retried=False) is None  # no previews, no retry: no page
        assert report_after_run(config, log, retried=True) is None  # no manifest: a warning, no raise
    assert not (tmp_path / "out" / REPORT_NAME).exists()
    assert log.path is not None
    last = log.path.read_text(encoding="utf-8").splitlines()[-1]
    assert "WARNING no report written: OutputError: no readable batchseg manifest" in last


def test_end_of_run_makes_missing_previews_unless_stopped_early(finished_run: Path, tmp_path: Path) -> None:
    from batchseg.logs import RunLog
    from batchseg.report import report_after_run
    from batchseg.store.manifest import read_manifest_run

    stored = read_manifest_run(finished_run)
    assert stored is not None
    config = RunConfig.from_dict(stored.config).with_changes(previews=True)
    gone = finished_run / "previews" / "c.jpg.jpg"
    gone.unlink()
    with RunLog(tmp_path / "logs") as log:
        assert report_after_run(config, log, retried=False, stopped="deadline") == finished_run / REPORT_NAME
        assert not gone.exists()  # a run stopped at its deadline ends now
        report_after_run(config, log, retried=False)
        assert gone.is_file()
    assert log.path is not None
    assert "previews made after the run: 1; could not be made: 0" in log.path.read_text(encoding="utf-8")
