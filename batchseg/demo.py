"""``batchseg demo``: the full pipeline on a tiny random-initialised SAM3 and generated images."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TextIO

from PIL import Image, ImageDraw

from .config import RunConfig
from .engines.demo import DEMO_ENGINE
from .runner import RunSummary, run

__all__ = ["make_sample_images", "run_demo"]

DEMO_PROMPTS = ("roof", "solar panel")


def make_sample_images(folder: Path, count: int = 6, seed: int = 0) -> list[Path]:
    """Aerial-looking pictures: grey roofs and dark panels on a green field, in a nested folder."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        sub = folder / ("north" if i % 2 else "south")
        sub.mkdir(parents=True, exist_ok=True)
        width, height = rng.choice([(640, 480), (800, 600), (480, 640)])
        img = Image.new("RGB", (width, height), (70 + rng.randint(0, 30), 120, 60))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 8)):
            x, y = rng.randint(0, width - 120), rng.randint(0, height - 120)
            w, h = rng.randint(40, 120), rng.randint(40, 120)
            draw.rectangle([x, y, x + w, y + h], fill=(150 + rng.randint(0, 60),) * 3)
            draw.rectangle([x + 8, y + 8, x + w // 2, y + h // 2], fill=(30, 40, 70))
        path = sub / f"tile_{i:03d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def run_demo(root: Path, stream: TextIO | None = None) -> RunSummary:
    # Built by the run's worker (``engines.demo``): torch and transformers are imported once.
    model = root / "demo-model"
    model.mkdir(parents=True, exist_ok=True)
    images = root / "demo-images"
    if not images.exists():
        make_sample_images(images)
    config = RunConfig(
        input=images,
        prompts=DEMO_PROMPTS,
        model=str(model),
        output=root / "demo",
        device="cpu",
        threshold=0.0,  # random weights: no score passes the usual 0.3
        max_detections=5,
        timeout=120.0,
        # The tiny model's input is 112 px: `auto` would cut these 640 x 480 pictures into dozens
        # of tiles. The demo shows the run, not tiling.
        tile="off",
    )
    return run(config, factory=DEMO_ENGINE, stream=stream)
