"""Start-up cost of a resumed run on a large folder: 200,000 files of which 190,000 are already done.

Generates the folder, a checkpoint holding 190,000 ok results (with their mask files), then starts
``batchseg run`` on it and measures, from the log and the checkpoint:
  - seconds from the command's start until the first remaining image starts processing;
  - the parent process's peak RSS (sampled with psutil every 50 ms).
The run is stopped with --max-runtime once it has started (exit 4, resumable), so the benchmark
measures start-up, not the 10,000 remaining images.

    python benchmarks/scale.py --files 200000 --done 190000 --work .bench/scale
    python benchmarks/scale.py --files 1000000 --done 950000 --work .bench/scale-1m

The checkpoint is written through the library (``Checkpoint.open`` with the options left at their
defaults) and resumed through the CLI, as a folder made by a script and run at night is. The
folder is made once per --work (a ``ready`` file marks it); each run starts from the same state.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478da63f8cfc000"
    "0003010100c9fe92ef0000000049454e44ae426082"
)


def make_folder(root: Path, files: int) -> None:
    for i in range(files):
        sub = root / f"d{i // 2000:03d}"
        if i % 2000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:06d}.png").write_bytes(PNG_1PX)


def make_checkpoint(images: Path, output: Path, model: Path, done: int) -> None:
    from batchseg.config import RunConfig
    from batchseg.discover import discover
    from batchseg.imageio import mask_relpath
    from batchseg.records import ItemResult, Status
    from batchseg.store.checkpoint import Checkpoint

    config = RunConfig(
        input=images.resolve(),
        prompts=("roof",),
        model=str(model.resolve()),
        output=output.resolve(),
        device="cpu",
    )
    items = discover(images).items[:done]
    with Checkpoint.open(output.resolve(), config) as checkpoint:
        checkpoint.plan(items, use_hash=False)
        for start in range(0, len(items), 10_000):
            pairs = []
            for item in items[start : start + 10_000]:
                mask = output / mask_relpath(item.path)
                mask.parent.mkdir(parents=True, exist_ok=True)
                mask.write_bytes(PNG_1PX)
                now = time.time()
                pairs.append(
                    (
                        ItemResult(
                            item.path,
                            Status.OK,
                            width=1,
                            height=1,
                            mask_path=mask_relpath(item.path),
                            started_at=now,
                            finished_at=now,
                        ),
                        item,
                    )
                )
            checkpoint.record_many(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--done", type=int, default=190_000)
    parser.add_argument("--work", type=Path, default=Path(".bench/scale"))
    args = parser.parse_args()

    from batchseg.random_sam3 import build_tiny_checkpoint

    images, output = args.work / "images", args.work / "output"
    model = build_tiny_checkpoint(args.work / "tiny-model")
    if not (args.work / "ready").exists():
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)
        t = time.perf_counter()
        make_folder(images, args.files)
        make_checkpoint(images, output, model, args.done)
        (args.work / "ready").write_text("")
        print(f"generated in {time.perf_counter() - t:.0f}s", flush=True)
    # Back to the same state each time: only the first `done` images are finished.
    with sqlite3.connect(output / "checkpoint.sqlite") as db:
        db.execute("DELETE FROM images WHERE status != 'ok'")
        db.execute("DELETE FROM detections WHERE path NOT IN (SELECT path FROM images)")

    command = [
        sys.executable,
        "-m",
        "batchseg",
        "run",
        str(images),
        "--prompt",
        "roof",
        "--model",
        str(model),
        "--output",
        str(output),
        "--device",
        "cpu",
        "--max-runtime",
        "25s",
        "--progress-interval",
        "5",
    ]
    start = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, parent.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    with sqlite3.connect(output / "checkpoint.sqlite") as db:
        first = db.execute(
            "SELECT MIN(started_at), COUNT(*) FROM images WHERE status = 'ok' AND started_at > ?", (start,)
        ).fetchone()
    report = {
        "files": args.files,
        "done_before": args.done,
        "exit_code": proc.returncode,
        "first_image_started_after_s": None if first[0] is None else first[0] - start,
        "processed_in_run": first[1],
        "parent_peak_rss_mb": peak / 2**20,
    }
    print(json.dumps(report, indent=2))
    if proc.returncode not in (0, 3, 4):
        print(out, err, file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
