"""A night as users have it: a folder of photos, big tiled orthophotos, a strip, damaged files, two
prompts, dense output (threshold 0), default options; then every output checked.

    # GPU: full-size SAM3 architecture (random weights), 200 photos, two 12000x12000 TIFFs
    python benchmarks/night.py --model full --device cuda --photos 200 --ortho-size 12000
    # CPU, the small night (tests/test_night.py runs this one): tiny model, --tile 512
    python benchmarks/night.py --model tiny --device cpu --photos 6 --photo-size 640x480 \\
        --ortho-size 2000 --strip-size 20000x40 --tile 512

The run is ``python -m batchseg run IN --prompt roof --prompt "solar panel" --threshold 0`` with
the model, output and device, nothing else unless ``--tile`` is given. The checks, each a line of
the report and a non-zero exit of this script when one fails:
  - every input file has a row in images.parquet, and every image is ``ok`` or has a status and a
    message (the photos and orthophotos must be ``ok``, the damaged files must not be; the strip
    may be either, and its time is reported);
  - the exit code is 3 (finished, some images not ok), never 1;
  - for every ok image, ``n_detections`` equals its rows in detections.parquet, the indices are
    1..N, and its label map holds exactly ``area_px`` pixels of each index (label map against
    detections; a tiled TIFF read by blocks), no detection has ``area_px`` 0;
  - no temporary file, and no ``tiles-in-progress`` left for an ok image (a failed image's finished
    tiles stay for ``batchseg retry``);
  - no process of the run left (every process started carries a marker in its environment).
Wall time, images/s and tiles/s are reported to ``--out`` (night.json, one line per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from throughput import build_model, hardware, make_images  # noqa: E402
from tiles import make_tiled_tiff  # noqa: E402

PROMPTS = ("roof", "solar panel")
MARK = "BATCHSEG_NIGHT_MARK"


# ---- the folder -------------------------------------------------------------------------------------


def build_folder(root: Path, args: argparse.Namespace) -> dict[str, str]:
    """The night's input folder; returns {relative path: what it is}."""
    kinds: dict[str, str] = {}
    photos = make_images(root / "photos", args.photos, _size(args.photo_size))
    for path in sorted(photos.glob("*.jpg")):
        kinds[f"photos/{path.name}"] = "photo"
    for k in range(args.orthos):
        make_tiled_tiff(root / "ortho" / f"ortho_{k}.tif", args.ortho_size, variant=k)
        kinds[f"ortho/ortho_{k}.tif"] = "ortho"
    width, height = _size(args.strip_size)
    strip = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(strip).save(root / "strip.png")
    kinds["strip.png"] = "strip"
    kinds.update(_damaged(root, photos))
    return kinds


def _damaged(root: Path, photos: Path) -> dict[str, str]:
    """Files a night meets: a truncated JPEG, an empty file, text named as an image, a tiled TIFF
    whose pixel data was cut short."""
    folder = root / "damaged"
    folder.mkdir(parents=True, exist_ok=True)
    data = (photos / "img_00000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n")
    tiff = make_tiled_tiff(folder / "cut-source.tif", 3000)
    cut = tiff.read_bytes()
    (folder / "cut.tif").write_bytes(cut[: len(cut) // 4])
    tiff.unlink()
    return {f"damaged/{name}": "damaged" for name in ("truncated.jpg", "empty.jpg", "notes.png", "cut.tif")}


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


# ---- the run ----------------------------------------------------------------------------------------


def run_night(args: argparse.Namespace, folder: Path, output: Path) -> tuple[int, float, str]:
    command = [sys.executable, "-m", "batchseg", "run", str(folder), "--model", str(args.model_dir),
               "--output", str(output), "--device", args.device, "--threshold", "0"]  # fmt: skip
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    if args.tile:
        command += ["--tile", args.tile]
    env = {**os.environ, MARK: args.mark}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


# ---- the checks -------------------------------------------------------------------------------------


def check(output: Path, kinds: dict[str, str], code: int, mark: str) -> tuple[list[str], dict[str, Any]]:
    """(failed checks, figures) of a finished night."""
    import pyarrow.parquet as pq

    images = {r["path"]: r for r in pq.read_table(output / "manifest" / "images.parquet").to_pylist()}
    detections = pq.read_table(output / "manifest" / "detections.parquet").to_pylist()
    failed: list[str] = []
    if code != 3:
        failed.append(f"exit code {code}, expected 3 (finished, some images not ok)")
    failed += _statuses(images, kinds)
    by_image: dict[str, list[dict[str, Any]]] = {}
    for det in detections:
        by_image.setdefault(det["path"], []).append(det)
    for path, row in images.items():
        if row["status"] == "ok":
            failed += _label_map(output, row, by_image.get(path, []))
    leftovers = [str(p.relative_to(output)) for p in output.rglob("*.batchseg-tmp")]
    if leftovers:
        failed.append(f"temporary files left: {leftovers[:5]}")
    # A failed image's finished tiles stay for `batchseg retry`; an ok image's must be gone.
    kept = [
        p for p, r in images.items() if r["status"] == "ok" and (output / "tiles-in-progress" / p).exists()
    ]
    if kept:
        failed.append(f"finished tiles left for ok images: {kept[:5]}")
    alive = _processes_with(mark)
    if alive:
        failed.append(f"processes of the run left: {alive}")
    return failed, _figures(images, detections)


def _statuses(images: dict[str, dict[str, Any]], kinds: dict[str, str]) -> list[str]:
    failed = [f"{path}: no row in images.parquet" for path in kinds if path not in images]
    for path, row in images.items():
        kind = kinds.get(path, "?")
        if kind in ("photo", "ortho") and row["status"] != "ok":
            failed.append(f"{path} ({kind}): {row['status']}: {row['error_message']}")
        elif kind == "damaged" and row["status"] == "ok":
            failed.append(f"{path} ({kind}) is ok")
        elif row["status"] != "ok" and not (row["error_message"] or "").strip():
            failed.append(f"{path}: {row['status']} without a message")
    return failed


def _label_map(output: Path, row: dict[str, Any], dets: list[dict[str, Any]]) -> list[str]:
    """The label map holds exactly area_px pixels of each index 1..N, nothing else."""
    path, n = row["path"], row["n_detections"]
    indices = sorted(d["index"] for d in dets)
    if len(dets) != n or indices != list(range(1, n + 1)):
        return [f"{path}: {n} detections in images.parquet, indices {indices[:5]}... in detections"]
    if any(d["area_px"] <= 0 for d in dets):
        return [f"{path}: a detection with area_px 0"]
    counts = _label_counts(output / row["mask_path"], n)
    if counts[n + 1]:
        return [f"{path}: the label map holds {counts[n + 1]} pixels of labels above {n}"]
    expected = np.zeros(n + 1, np.int64)
    for det in dets:
        expected[det["index"]] = det["area_px"]
    if not np.array_equal(counts[1 : n + 1], expected[1:]):
        wrong = np.flatnonzero(counts[1 : n + 1] != expected[1:])[:5] + 1
        return [f"{path}: label map disagrees with area_px at indices {wrong.tolist()}"]
    return []


def _label_counts(path: Path, n: int) -> np.ndarray:
    """Pixels of each value 0..n, and at n + 1 those of any larger value (labels that should not
    be there). A tiled TIFF is read block by block; its padding past the edge is 0, not counted."""
    counts = np.zeros(n + 2, np.int64)

    def add(data: np.ndarray) -> None:
        values = np.bincount(data.ravel().astype(np.int64), minlength=n + 2)
        counts[: n + 1] += values[: n + 1]
        counts[n + 1] += values[n + 1 :].sum()

    if path.suffix == ".png":
        add(np.asarray(Image.open(path)))
        return counts
    import tifffile

    with tifffile.TiffFile(path) as tif:
        for data, _, _ in tif.pages[0].segments():
            if data is not None:
                add(np.asarray(data))
    return counts


def _processes_with(mark: str) -> list[str]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARK) == mark:
                alive.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:80]}")
        except psutil.Error:
            continue
    return alive


def _figures(images: dict[str, dict[str, Any]], detections: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for row in images.values():
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    ok = [r for r in images.values() if r["status"] == "ok"]
    span = 0.0
    if ok:
        span = max(r["finished_at"].timestamp() for r in ok) - min(r["started_at"].timestamp() for r in ok)
    strip = images.get("strip.png", {})
    return {
        "statuses": statuses,
        "detections": len(detections),
        "ok_span_s": round(span, 1),
        "strip": f"{strip.get('status')} in {strip.get('duration_s') or 0:.1f} s",
        "not_ok": {
            p: f"{r['status']}: {(r['error_message'] or '')[:120]}"
            for p, r in images.items()
            if r["status"] != "ok"
        },
    }


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, full, or a folder with SAM3 weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--photo-size", default="2048x1536")
    parser.add_argument("--orthos", type=int, default=2)
    parser.add_argument("--ortho-size", type=int, default=12000)
    parser.add_argument("--strip-size", default="300000x48")
    parser.add_argument("--tile", default=None, help="--tile for the run (default: the run's own)")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--out", type=Path, default=None, help="night.json (default: in --work)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.model_dir = build_model(args.model, args.work / "models")
    args.mark = uuid.uuid4().hex
    folder = args.work / f"night-{args.photos}-{args.photo_size}-{args.orthos}x{args.ortho_size}"
    kinds = build_folder(folder, args)
    output = Path(tempfile.mkdtemp(prefix="batchseg-night-", dir=args.work))
    code, wall, log = run_night(args, folder, output)
    if not (output / "manifest" / "images.parquet").exists():
        raise SystemExit(f"batchseg run wrote no manifest (exit {code}):\n{log[-4000:]}")
    failed, figures = check(output, kinds, code, args.mark)
    ok = figures["statuses"].get("ok", 0)
    report = {
        "hardware": hardware(args.device),
        "model": args.model,
        "files": len(kinds),
        "exit_code": code,
        "wall_s": round(wall, 1),
        "ok_img_per_s_wall": round(ok / wall, 2),
        **figures,
        "failed_checks": failed,
    }
    line = json.dumps(report)
    print(line)
    with open(args.out or args.work / "night.json", "a", encoding="utf-8") as out:
        out.write(line + "\n")
    if failed:
        print("\n".join(["FAILED CHECKS:", *failed, "", "run output (end):", log[-3000:]]), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
