"""``batchseg run s3://BUCKET/PREFIX`` against a real S3 API on loopback (moto's server, IAM checks on):
a bucket of COGs and JPEGs runs ok, read by window and by download; a second run repeats nothing; a
changed object is redone; a read that fails after the retries fails that image only (and a flaky
one is retried); retry, status and the report's data work as for a folder; a missing bucket and
refused credentials end the run with exit 1 and a sentence, credentials never in the output folder."""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from _runs import checkpoint_rows, ok_rows, run_args, start_run, tagged_processes, wait_until
from _s3 import FaultProxy, Store, fault_proxy, moto_server
from affine import Affine
from PIL import Image
from rasterio.crs import CRS

ENGINE = "batchseg.engines.threshold:load"
UTM = CRS.from_epsg(32633)
RED, GREY = (255, 0, 0), (128, 128, 128)
BUCKET = "aerial"


def _picture(width: int, height: int, square: tuple[int, int, int]) -> np.ndarray:
    pixels = np.full((height, width, 3), GREY, np.uint8)
    x, y, side = square
    pixels[y : y + side, x : x + side] = RED
    return pixels


def _cog(pixels: np.ndarray, col: int) -> bytes:
    """A cloud-optimized GeoTIFF (GDAL's COG driver) of ``pixels`` on tile ``col`` of a UTM grid."""
    height, width, _ = pixels.shape
    grid = Affine(0.5, 0.0, 500000.0 + col * width * 0.5, 0.0, -0.5, 4100000.0)
    profile = dict(driver="COG", width=width, height=height, count=3, dtype="uint8", crs=UTM, transform=grid)
    with rasterio.MemoryFile() as memory:
        with memory.open(**profile, blocksize=256) as dst:
            dst.write(pixels.transpose(2, 0, 1))
        return bytes(memory.read())


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, quality=95)
    return out.getvalue()


def _fill(store: Store) -> None:
    s3 = store.client()
    s3.create_bucket(Bucket=BUCKET)
    objects = {
        "run/ortho/a.tif": _cog(_picture(1200, 900, (100, 100, 40)), 0),
        "run/ortho/b.tif": _cog(_picture(1200, 900, (700, 500, 30)), 1),
        "run/photos/p.jpg": _encoded(_picture(300, 200, (10, 10, 50)), "JPEG"),
        "run/photos/q.png": _encoded(_picture(300, 200, (200, 100, 20)), "PNG"),
        "run/photos/flaky.jpg": _encoded(_picture(300, 200, (0, 0, 30)), "JPEG"),
        "run/photos/broken.jpg": _encoded(_picture(300, 200, (0, 0, 30)), "JPEG"),
        "run/.hidden/h.jpg": b"not looked at",
        "run/notes.txt": b"not an image",
        "other/x.jpg": _encoded(_picture(30, 20, (0, 0, 5)), "JPEG"),
    }
    for key, body in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    with moto_server() as running:
        _fill(running)
        yield running


@pytest.fixture
def proxy(store: Store) -> Iterator[FaultProxy]:
    with fault_proxy(store.url) as running:
        yield running


def batchseg(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "batchseg", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)


def _rows(output: Path) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}


def _run(env: dict[str, str], output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = ["--engine", ENGINE, "--prompt", "red", "--workers", "1", "--output", output, *extra]
    return batchseg(env, "run", f"s3://{BUCKET}/run", *flags)


def test_a_bucket_runs_resumes_and_redoes_what_changed(
    store: Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.broken.add("broken.jpg")
    proxy.flaky.add("flaky.jpg")
    env = store.env(url=proxy.url)
    output = tmp_path / "out"
    first = _run(env, output, "--previews", "--report")
    assert first.returncode == 3, first.stdout + first.stderr  # one image failed, the run went on
    rows = _rows(output)
    assert sorted(rows) == [
        "ortho/a.tif",
        "ortho/b.tif",
        "photos/broken.jpg",
        "photos/flaky.jpg",
        "photos/p.jpg",
        "photos/q.png",
    ]
    assert {p: r["status"] for p, r in rows.items() if p != "photos/broken.jpg"} == dict.fromkeys(
        ("ortho/a.tif", "ortho/b.tif", "photos/flaky.jpg", "photos/p.jpg", "photos/q.png"), "ok"
    )
    broken = rows["photos/broken.jpg"]
    assert broken["status"] == "error" and "s3://aerial/run/photos/broken.jpg" in broken["error_message"]
    assert proxy.gets["broken.jpg"] >= 3  # every attempt was made
    assert proxy.gets["flaky.jpg"] >= 2  # failed once, read on the retry (and for its preview)
    assert proxy.gets["a.tif"] >= 1 and "a.tif" not in proxy.whole  # COGs: range requests only
    assert proxy.whole["p.jpg"] >= 1  # a JPEG is fetched whole
    # the COG was read by window: its label map is on its grid, the red square found
    with rasterio.open(output / rows["ortho/b.tif"]["mask_path"]) as src:
        labels = src.read(1)
        assert src.crs == UTM and src.transform.c == 500000.0 + 600.0
    assert np.count_nonzero(labels) == 30 * 30 and labels[500:530, 700:730].all()
    with rasterio.open(output / "labels.vrt") as mosaic:
        assert (mosaic.width, mosaic.height) == (2400, 900)
    assert np.count_nonzero(np.asarray(Image.open(output / rows["photos/q.png"]["mask_path"]))) == 400
    previews = {p.relative_to(output / "previews").as_posix() for p in (output / "previews").rglob("*.jpg")}
    assert {"photos/p.jpg.jpg", "photos/q.png.jpg", "ortho/a.tif.jpg"} <= previews
    assert (output / "report.html").is_file()

    assert not list(Path(tempfile.gettempdir()).glob("batchseg-s3-*"))  # downloads gone with the run

    # credentials are never written into the output folder
    for path in output.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert store.secret.encode() not in data and store.key_id.encode() not in data, path

    # a second run repeats nothing
    again = _run(env, output)
    assert again.returncode == 3, again.stdout + again.stderr
    rows_again = _rows(output)
    assert {p: r["started_at"] for p, r in rows_again.items()} == {
        p: r["started_at"] for p, r in rows.items()
    }

    # a changed object is redone, and only it
    store.client().put_object(
        Bucket=BUCKET, Key="run/photos/p.jpg", Body=_encoded(_picture(300, 200, (100, 50, 60)), "JPEG")
    )
    changed = _run(env, output)
    assert changed.returncode == 3, changed.stdout + changed.stderr
    rows_changed = _rows(output)
    redone = {p for p in rows if rows_changed[p]["started_at"] != rows[p]["started_at"]}
    assert redone == {"photos/p.jpg"}
    assert rows_changed["photos/p.jpg"]["n_detections"] == 1

    # status, and retry once the object reads again
    status = batchseg(env, "status", output)
    assert status.returncode == 0 and "broken.jpg: InternalError injected" in status.stdout
    proxy.broken.clear()
    retried = batchseg(env, "retry", output)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert _rows(output)["photos/broken.jpg"]["status"] == "ok"


def test_a_cog_in_tiles_is_read_by_window(store: Store, proxy: FaultProxy, tmp_path: Path) -> None:
    """A COG cut into tiles: each tile's worker reads its window with range requests; GDAL retries
    a 503 on its first read."""
    proxy.flaky.add("a.tif")
    output = tmp_path / "out"
    result = _run(store.env(url=proxy.url), output, "--include", "ortho/*", "--tile", "512")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(output)
    assert {rows[p]["status"] for p in ("ortho/a.tif", "ortho/b.tif")} == {"ok"}
    with rasterio.open(output / rows["ortho/a.tif"]["mask_path"]) as src:
        labels = src.read(1)
    assert np.count_nonzero(labels) == 40 * 40 and labels[100:140, 100:140].all()
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    (square,) = [d for d in detections if d["path"] == "ortho/b.tif"]
    assert square["tiles"] >= 2  # seen by several overlapping 512-pixel tiles: the image was tiled
    assert proxy.gets["a.tif"] >= 2 and "a.tif" not in proxy.whole and "b.tif" not in proxy.whole
    assert not proxy.flaky  # the 503 was served, and the read retried


def test_sam3_reads_objects_in_its_reader_threads(store: Store, tiny_model: Path, tmp_path: Path) -> None:
    """The SAM3 engine (a tiny random checkpoint, CPU) reads objects through the same path: plain
    images fetched by its reader threads, a COG by window."""
    output = tmp_path / "out"
    args = run_args(tmp_path, output, tiny_model, "--include", "photos/p.jpg", "--include", "ortho/a.tif")
    args[1] = f"s3://{BUCKET}/run"  # run_args takes a folder; here the input is a prefix
    result = batchseg(store.env(), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(output)
    assert {p: (r["status"], r["width"]) for p, r in rows.items() if r["status"] != "skipped"} == {
        "photos/p.jpg": ("ok", 300),
        "ortho/a.tif": ("ok", 1200),
    }
    with rasterio.open(output / rows["ortho/a.tif"]["mask_path"]) as src:
        assert src.crs == UTM and (src.width, src.height) == (1200, 900)


def test_a_killed_run_resumes_and_repeats_nothing(store: Store, proxy: FaultProxy, tmp_path: Path) -> None:
    """The run is SIGKILLed while a worker waits for the last object (the proxy holds its read):
    the resumed run processes that object alone."""
    proxy.held.add("q.png")
    output = tmp_path / "out"
    args = ["run", f"s3://{BUCKET}/run", "--engine", ENGINE, "--prompt", "red", "--workers", "1"]
    args += ["--output", str(output), "--include", "photos/*"]
    live = start_run(args, tmp_path / "console.txt", cwd=tmp_path, env=store.env(url=proxy.url))
    done = {"photos/broken.jpg", "photos/flaky.jpg", "photos/p.jpg"}
    assert wait_until(lambda: done <= set(ok_rows(output)), 120, while_alive=live), live.output()
    assert wait_until(lambda: proxy.gets.get("q.png", 0) > 0, 60, while_alive=live), live.output()
    live.kill()
    assert wait_until(lambda: not tagged_processes(live.tag), 30)  # its worker went with it
    before = checkpoint_rows(output)
    orphans = list(Path(tempfile.gettempdir()).glob("batchseg-s3-*"))
    assert orphans  # the killed worker's downloads: no atexit ran
    proxy.release.set()
    resumed = batchseg(store.env(url=proxy.url), *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = checkpoint_rows(output)
    assert {p: after[p]["started_at"] for p in done} == {p: before[p]["started_at"] for p in done}
    assert not any(p.exists() for p in orphans)  # the next worker removed them
    statuses = {p: r["status"] for p, r in after.items()}
    skipped = {"ortho/a.tif": "skipped", "ortho/b.tif": "skipped"}  # --include, as for a folder
    assert statuses == {**dict.fromkeys(done | {"photos/q.png"}, "ok"), **skipped}


def test_a_missing_bucket_is_exit_1_with_a_sentence(store: Store, tmp_path: Path) -> None:
    result = batchseg(
        store.env(),
        "run",
        "s3://no-such-bucket/x",
        "--engine",
        ENGINE,
        "--prompt",
        "red",
        "--output",
        tmp_path / "out",
    )
    assert result.returncode == 1
    assert "The bucket s3://no-such-bucket does not exist at http://127.0.0.1:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_refused_credentials_are_exit_1_with_a_sentence(store: Store, tmp_path: Path) -> None:
    result = batchseg(
        store.env(secret="wrong"),
        "run",
        f"s3://{BUCKET}/run",
        "--engine",
        ENGINE,
        "--prompt",
        "red",
        "--output",
        tmp_path / "out",
    )
    assert result.returncode == 1
    assert f"refused access to s3://{BUCKET} (403): check the credentials" in result.stderr
    assert "wrong" not in result.stderr and store.key_id not in result.stderr
    assert not (tmp_path / "out").exists()


def test_endpoints_are_read_as_boto3_and_gdal_users_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchseg import remote

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert remote.endpoint_url() is None and "AWS_S3_ENDPOINT" not in remote.gdal_options()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    options = remote.gdal_options()
    assert (options["AWS_S3_ENDPOINT"], options["AWS_HTTPS"], options["AWS_VIRTUAL_HOSTING"]) == (
        "minio.local:9000",
        "NO",
        "FALSE",
    )
    assert "AWS_REGION" not in options  # AWS_DEFAULT_REGION is GDAL's too
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org")  # the S3 one wins
    assert remote.endpoint_url() == "https://s3.example.org"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_S3_ENDPOINT", "ceph.local:7480")  # GDAL's way
    monkeypatch.setenv("AWS_HTTPS", "NO")
    assert remote.endpoint_url() == "http://ceph.local:7480"
    assert "AWS_S3_ENDPOINT" not in remote.gdal_options()  # GDAL reads its own as it is
    assert remote.vsi_path("s3://b/some/prefix/") == "/vsis3/b/some/prefix"
    assert remote.url_of("/vsis3/b/k.tif") == "s3://b/k.tif" and remote.is_remote("s3://b")
