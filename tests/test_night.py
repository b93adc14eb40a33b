"""The small night of ``benchmarks/night.py`` on the CPU: photos, two tiled orthophotos, a strip and
damaged files, two prompts, dense output; every output checked by the benchmark's own checks (rows for
every file, label maps against detections, no temporary files, no process of the run left)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NIGHT = Path(__file__).parents[1] / "benchmarks" / "night.py"


def test_the_small_night_is_all_ok_or_classified(tiny_model: Path, tmp_path: Path) -> None:
    # The session's tiny SAM3 (what --model tiny builds) instead of a second build of it.
    command = [sys.executable, str(NIGHT), "--model", str(tiny_model), "--device", "cpu", "--photos", "4",
               "--photo-size", "640x480", "--ortho-size", "1600", "--strip-size", "20000x40",
               "--tile", "512", "--work", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "night.json").read_text().splitlines()[-1])
    assert report["failed_checks"] == []
    assert report["statuses"]["ok"] == 4 + 2 + (report["strip"].startswith("ok"))
    assert set(report["not_ok"]) >= {"damaged/truncated.jpg", "damaged/empty.jpg", "damaged/notes.png"}
