"""Pixels in, instances out: each prompt a colour, each 8-connected patch of exactly it one
instance (``--engine patch_engine:load``, tests/ on the path). It honours windows, so it tiles."""

from pathlib import Path

import numpy as np

from batchseg.engines.threshold import components, parse_colour
from batchseg.tiles.windows import WindowReader, upright_size
from batchseg.worker.contract import Capabilities, Instance, Segmentation


class PatchEngine:
    def __init__(self, config):
        self.root, self.colours = Path(config.input), [(p, parse_colour(p)) for p in config.prompts]
        self.reader = WindowReader(config.max_pixels, config.max_tiled_pixels)
        self.capabilities = Capabilities(device="cpu patches", task_size=4)

    def process(self, items, heartbeat):
        return [self.found(item) for item in items]

    def found(self, item):
        path = self.root / item.path
        window = item.window or (0, 0, *upright_size(path)[:2])
        pixels, width, height, _valid = self.reader.read(path, window)
        labels, instances = np.zeros(pixels.shape[:2], np.uint16), []
        for prompt, colour in self.colours:
            patches, boxes = components((pixels == colour).all(axis=2) & (labels == 0))
            for k, box in enumerate(boxes, start=1):
                instances.append(Instance(prompt, 1.0, tuple(float(v) for v in box)))
                labels[patches == k] = len(instances)
        return Segmentation(labels, instances, size=(width, height))

    def close(self):
        self.reader.close()


def load(spec, slot):
    return PatchEngine(spec.config)
