"""report.html from real runs (tiny SAM3 with previews; the colour engine with chosen scores, whose
every figure is checked against the manifest), opened in a real headless browser.

The browser is Debian's chromium driven by Playwright's Python package through its executable path
(``.ci/run`` installs chromium with apt-get; where it is missing these tests say so and skip).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import shutil
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_image
from fault_engine import write_settings

from batchseg.cli import cli
from batchseg.config import RunConfig
from batchseg.records import Item, ItemResult, Status
from batchseg.report import REPORT_NAME, write_report
from batchseg.report.data import COUNT_BUCKETS, SCORE_BINS, collect_report
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
        # The tiny random model's masks are faint: at the default 0.5 every one is empty, and a
        # detection without a pixel is none; at 0.3 each image keeps one (it covers the others).
        mask_threshold=0.3,
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
    bars = {(r["prompt"], score_bin(r["score"])) for r in detections.select(["prompt", "score"]).to_pylist()}
    assert opened.page.locator("#score-histogram rect").count() == len(bars) > 0
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


# -- the figures, against a run whose every detection is known --------------------------------------

#: Patches drawn per image as (colour prompt, left edge): 4 x 4 squares apart from each other, each
#: one detection scoring left / 256 (tests/scored_engine.py); 64, 128 and 192 score 0.25, 0.5 and
#: 0.75, on edges of the score bins. "yellow" is a prompt drawn nowhere.
PATCHES: dict[str, list[tuple[str, int]]] = {
    "a.png": [("red", 13), ("red", 64), ("red", 200), ("blue", 128)],
    "b.png": [("red", 100)],
    "sub/c.png": [("blue", 5), ("blue", 192), ("blue", 250)],
    "d.png": [],
    "e.png": [("lime", 64), ("lime", 70)],
}
SCORED_PROMPTS = ("red", "blue", "lime", "yellow")


def scored_run_in(folder: Path) -> Path:
    """A run of the scored colour engine over PATCHES and a file that is no image, with --report.
    Its load takes a second, so its log's start and end stamps (whole seconds) differ."""
    from PIL import Image, ImageColor, ImageDraw

    root = folder / "in"
    for name, patches in PATCHES.items():
        image = Image.new("RGB", (256, 24))
        for colour, left in patches:
            ImageDraw.Draw(image).rectangle([left, 10, left + 3, 13], fill=ImageColor.getrgb(colour))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    (root / "broken.png").write_bytes(b"not a PNG")
    config = RunConfig(
        input=root,
        prompts=SCORED_PROMPTS,
        engine="scored_engine:load",
        output=folder / "out",
        workers=1,
        report=True,
    )
    write_settings(root, load_s=1.0)
    summary = run(config)
    assert summary.exit_code == 3 and summary.counts["ok"] == len(PATCHES)
    assert (summary.output_dir / REPORT_NAME).is_file()
    return summary.output_dir


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scored_run_in(tmp_path_factory.mktemp("scored"))


def score_bin(score: float) -> int:
    """The bin of [k/20, (k+1)/20) holding ``score`` exactly (1.0 in the last), in rational numbers."""
    return min(math.floor(Fraction(score) * SCORE_BINS), SCORE_BINS - 1)


def expected_prompts(detections: pa.Table) -> dict[str, dict[str, Any]]:
    """Per prompt, from detections.parquet row by row: detections, images with one, mean score and
    the score histogram."""
    rows = detections.select(["path", "prompt", "score"]).to_pylist()
    out = {}
    for prompt in SCORED_PROMPTS:
        scores = [r["score"] for r in rows if r["prompt"] == prompt]
        hist = [0] * SCORE_BINS
        for score in scores:
            hist[score_bin(score)] += 1
        out[prompt] = {
            "detections": len(scores),
            "images": len({r["path"] for r in rows if r["prompt"] == prompt}),
            "mean": math.fsum(scores) / len(scores) if scores else None,
            "hist": hist,
        }
    return out


def stamp(line: str) -> float:
    return _dt.datetime.fromisoformat(line.split()[0]).timestamp()


def latest_session(output: Path, images: pa.Table) -> tuple[float, list[str]]:
    """The latest session's rate (images finished per second between its log's first line and
    its summary line), and the paths it finished. Log stamps are milliseconds, cut down: an image
    of the session finished at or after its start stamp and before its end stamp + 1 ms."""
    sessions = []
    for log in (output / "logs").glob("*.log"):
        lines = log.read_text(encoding="utf-8").splitlines()
        (summary,) = [line for line in lines if " summary " in line]
        assert re.match(r"^\S+T\d\d:\d\d:\d\d\.\d{3}[+-]", summary), summary
        sessions.append((stamp(lines[0]), stamp(summary)))
    start, end = max(sessions)
    assert end - start >= 1  # the engine's load alone took a second
    paths = [
        row["path"]
        for row in images.select(["path", "finished_at"]).to_pylist()
        if row["finished_at"] is not None and start <= row["finished_at"].timestamp() < end + 0.001
    ]
    return len(paths) / (end - start), paths


def expected_rate(output: Path, images: pa.Table) -> float:
    """The rate of a run of one session, in which every image finished."""
    rate, paths = latest_session(output, images)
    assert len(paths) == images.num_rows
    return rate


def test_scored_run_holds_what_was_drawn(scored_run: Path) -> None:
    detections = pq.read_table(scored_run / "manifest/detections.parquet")
    drawn = sorted(
        (name, prompt, left / 256) for name, patches in PATCHES.items() for prompt, left in patches
    )
    stored = sorted((r["path"], r["prompt"], r["score"]) for r in detections.to_pylist())
    assert stored == drawn  # the run is what the figures below are checked against


def test_report_figures_match_the_manifest(scored_run: Path) -> None:
    images = pq.read_table(scored_run / "manifest/images.parquet")
    expected = expected_prompts(pq.read_table(scored_run / "manifest/detections.parquet"))
    data = collect_report(scored_run)
    assert [p.prompt for p in data.prompts] == list(SCORED_PROMPTS)
    for stats in data.prompts:
        want = expected[stats.prompt]
        assert (stats.detections, stats.images, stats.score_hist) == (
            want["detections"],
            want["images"],
            want["hist"],
        ), stats.prompt
        assert stats.mean_score == (None if want["mean"] is None else pytest.approx(want["mean"], rel=1e-12))
    # Drawn: red in a.png and b.png, blue in a.png and c.png, lime twice in e.png, yellow nowhere.
    assert [expected[p]["images"] for p in SCORED_PROMPTS] == [2, 2, 1, 0]
    assert expected["red"]["hist"][5] == 1 and expected["blue"]["hist"][10] == 1  # 0.25, 0.5: bins' low edges
    ok = [r["n_detections"] for r in images.to_pylist() if r["status"] == "ok"]
    buckets = {label: sum(lo <= n <= hi for n in ok) for label, lo, hi in COUNT_BUCKETS}
    assert data.count_hist == list(buckets.items()) and buckets["2-5"] == 3
    assert data.images_per_s == pytest.approx(expected_rate(scored_run, images), rel=1e-12)


def test_report_figures_in_a_browser(scored_run: Path, browser: Any) -> None:
    images = pq.read_table(scored_run / "manifest/images.parquet")
    expected = expected_prompts(pq.read_table(scored_run / "manifest/detections.parquet"))
    opened = Opened(browser, scored_run / REPORT_NAME)
    assert opened.errors == [] and opened.failed == []
    for prompt, want in expected.items():
        row = opened.page.locator(f'tr.prompt-row[data-prompt="{prompt}"] td')
        mean = "-" if want["mean"] is None else f"{want['mean']:,.3f}"
        assert row.all_inner_texts() == [str(want["detections"]), str(want["images"]), mean], prompt
    # One bar per prompt and bin with scores, its title saying how many, its height in proportion.
    bars = opened.page.eval_on_selector_all(
        "#score-histogram rect", "els => els.map(e => [e.textContent, +e.getAttribute('height')])"
    )
    shown = sorted(title for title, _height in bars)
    wanted = sorted(
        f"{prompt}: {count:,} with score {b / SCORE_BINS:.2f}-{(b + 1) / SCORE_BINS:.2f}"
        for prompt, want in expected.items()
        for b, count in enumerate(want["hist"])
        if count
    )
    assert shown == wanted
    counts = [int(title.split(": ")[1].split()[0]) for title, _height in bars]
    tallest = max(height for _title, height in bars)
    for count, (_title, height) in zip(counts, bars, strict=True):
        assert height / tallest == pytest.approx(count / max(counts), abs=0.01)
    rate = expected_rate(scored_run, images)
    assert opened.page.inner_text("#images-per-s") == f"{rate:,.2f}"
    opened.page.close()


def test_images_per_second_counts_only_the_latest_session(tmp_path: Path) -> None:
    """A retry that starts in the second after the run's last image finished: its rate is its one
    image over its own span, none of the run's (a window reaching a second before its start stamp
    would count the run's last images)."""
    output = scored_run_in(tmp_path)
    finished = pq.read_table(output / "manifest/images.parquet")["finished_at"].to_pylist()
    last = max(t.timestamp() for t in finished)
    time.sleep(max(0.0, math.floor(last) + 1 - time.time()))
    assert retry(output, (Status.INVALID_INPUT,)).processed == 1
    images = pq.read_table(output / "manifest/images.parquet")
    rate, paths = latest_session(output, images)
    assert paths == ["broken.png"]
    data = collect_report(output)
    assert data.images_per_s == pytest.approx(rate, rel=1e-12)


@pytest.mark.parametrize(
    ("start", "end", "step"),
    [
        ("2026-03-01T02:00:05+01:00", "2026-03-01T02:00:09+01:00", 1.0),  # a log of 0.2.0 and before
        ("2026-03-01T02:00:05.250+01:00", "2026-03-01T02:00:09.125+01:00", 0.001),
    ],
)
def test_a_sessions_span_is_read_at_its_stamps_resolution(
    tmp_path: Path, start: str, end: str, step: float
) -> None:
    """The rate of a short run rests on two stamps: milliseconds now; whole seconds in older logs
    still read, counting an image up to the end of the summary's second."""
    from batchseg.report.data import _rate, read_session

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "20260301-020005.log").write_text(
        f"{start} INFO    batchseg 0.2.0 run started; Python 3.11\n"
        f"{end} INFO    summary ok 3, error 0; 0m04s elapsed; exit code 0\n",
        encoding="utf-8",
    )
    session = read_session(tmp_path)
    assert session is not None and session.step == step
    assert session.ended is not None and session.started is not None
    assert session.ended - session.started == pytest.approx(4.0 if step == 1 else 3.875)
    finished = np.array([session.started + 1, session.ended, session.ended + 0.5 * step])
    assert _rate(finished - 1, finished, session) == pytest.approx(3 / (session.ended - session.started))
    late = np.array([session.ended + step])  # a stamp later than the summary's: another session's
    assert _rate(late - 1, late, session) is None
