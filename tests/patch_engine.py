"""Pixels in, instances out: each prompt a colour, each 8-connected patch of exactly it one
instance (``--engine patch_engine:load``, tests/ on the path). Its pixels come from the worker's
``ImageReader``, which reads windows too, so it tiles."""

import numpy as np

from batchseg.engines.threshold import components, parse_colour
from batchseg.records import ItemResult
from batchseg.worker.contract import Capabilities, Instance
from batchseg.worker.reading import ImageReader


class PatchEngine:
    def __init__(self, config):
        self.colours = [(p, parse_colour(p)) for p in config.prompts]
        self.reader = ImageReader(config)
        self.capabilities = Capabilities(device="cpu patches", task_size=4)

    def process(self, items, heartbeat):
        return [self.found(item) for item in items]

    def found(self, item):
        picture = self.reader.read(item)
        if isinstance(picture, ItemResult):  # not an image: its failure
            return picture
        labels, instances = np.zeros(picture.pixels.shape[:2], np.uint16), []
        for prompt, colour in self.colours:
            patches, boxes = components((picture.pixels == colour).all(axis=2) & (labels == 0))
            for k, box in enumerate(boxes, start=1):
                instances.append(Instance(prompt, 1.0, tuple(float(v) for v in box)))
                labels[patches == k] = len(instances)
        return picture.found(labels, instances)

    def close(self):
        self.reader.close()


def load(spec, slot):
    return PatchEngine(spec.config)
