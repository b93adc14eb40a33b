"""A colour threshold engine: each ``--prompt`` is a colour, each 8-connected patch of it an instance.

``--engine batchseg.engines.threshold:load``. Exact to the pixel and without a model (numpy and
Pillow only), it is what tests use when they need known masks, and a small example of the engine
contract (``batchseg.worker.contract``) beside SAM3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageColor

from .. import imageio
from ..config import RunConfig
from ..errors import ConfigError
from ..exemplars import ExemplarSet, Placed, load_exemplars, run_prompts, within
from ..prompting import check_prompt_maps, fold_duplicates
from ..records import Item, ItemResult, Status, failure_result
from ..values import show
from ..worker.contract import Capabilities, EngineSpec, HeartbeatFn, Instance, Outcome, Segmentation
from ..worker.reading import ImageReader

__all__ = [
    "MODEL_ID",
    "TOLERANCE",
    "ThresholdEngine",
    "check",
    "components",
    "load",
    "model_id",
    "parse_colour",
]

#: A pixel matches a colour when each of its R, G and B values is within this many levels of the
#: colour's: enough for a PNG exported with slight colour management, not for JPEG edges (lossy
#: compression moves pixels along an edge by tens of levels; use PNG for exact masks).
TOLERANCE = 8
#: What a run with this engine records as its ``model_id``: there is no model, --model is unused.
MODEL_ID = "colour-threshold"


def check(config: RunConfig) -> None:
    """In the parent, before any worker: every text prompt must be a colour (exemplar boxes add
    prompts whose colours come from their boxes), and --class / --prompt-threshold name prompts."""
    for prompt in config.prompts:
        parse_colour(prompt)
    check_prompt_maps(config, run_prompts(config))


def model_id(config: RunConfig) -> str:
    """In the parent, for the run's record (``contract.recorded_model``): this engine, not --model."""
    return MODEL_ID


def load(spec: EngineSpec, slot: int) -> ThresholdEngine:
    """The factory: every prompt parsed as a colour now, so a bad one ends the run before any image."""
    config = spec.config
    imageio.configure_pillow(config.max_pixels)
    exemplars = load_exemplars(config)
    colours: list[tuple[str, tuple[int, int, int] | None]] = [(p, parse_colour(p)) for p in config.prompts]
    colours += [(prompt, None) for prompt in run_prompts(config, exemplars)[len(colours) :]]
    if not colours:
        raise ConfigError("give at least one colour (--prompt red, --prompt '#00ff00') or --exemplars")
    return ThresholdEngine(colours, config, exemplars)


def parse_colour(prompt: str) -> tuple[int, int, int]:
    """``"#ff0000"``, ``"#f00"``, ``"rgb(255, 0, 0)"`` or a CSS colour name (``red``, ``orange``)."""
    try:
        rgb = ImageColor.getrgb(prompt.strip())
    except ValueError:
        raise ConfigError(
            f"the threshold engine reads each prompt as a colour; {show(prompt)} is not one: "
            "use #rrggbb or a CSS colour name such as red"
        ) from None
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


class ThresholdEngine:
    """Turns images into label arrays and their instances (``contract.Segmentation``; the worker
    writes them): prompts in order, each claiming the still unlabelled pixels
    within ``TOLERANCE`` of its colours (the first prompt wins a pixel two colours share); each
    8-connected component is one instance with score 1.0. Boxes are pixel edges: a component on
    columns 3..5 has x0 = 3, x1 = 6.

    Exemplar boxes (``--exemplars``) are read exactly: the median colour of a positive box is one
    more colour of its prompt, pixels within ``TOLERANCE`` of a negative box's median colour are
    none of its prompt's. A box's colour holds for the whole image it falls in, every tile of a
    tiled one included (read from the box's own pixels). With ``--suppress-iou`` each prompt finds
    its components on its own and duplicates across prompts are folded (``prompting``)."""

    def __init__(
        self,
        colours: Sequence[tuple[str, tuple[int, int, int] | None]],
        config: RunConfig,
        exemplars: ExemplarSet | None = None,
    ) -> None:
        self.config = config
        self.colours = list(colours)
        self.exemplars = exemplars
        self._georef: tuple[str | None, Any] = (None, None)  # (path, its Georef) of tiled exemplars
        self.input_root = Path(config.input)
        self.max_detections = config.max_detections
        self.capabilities = Capabilities(device="cpu numpy", task_size=8, heartbeat_every=1)
        self.reader = ImageReader(config)  # pixels in: whole images and tiles alike

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        if all(item.window is None for item in items):
            self.reader.close()  # a tiled image is done: its pixels are not kept while others run
        results = []
        for k, item in enumerate(items):
            heartbeat((), k + 1)  # nothing past this item is touched yet
            results.append(_above_threshold(self.config, self.one(item)))
            heartbeat([(k, results[-1])])
        return results

    def prefetch(self, item: Item) -> None:
        """The image of ``item`` comes next as tiles: open (decode) it while the current one runs."""
        self.reader.prefetch(item)

    def close(self) -> None:
        self.reader.close()

    def one(self, item: Item) -> Outcome:
        """One image (or its window): its instances, or its failure."""
        picture = self.reader.read(item)
        if isinstance(picture, ItemResult):
            return picture
        try:
            pixels = picture.pixels
            examples = self.examples(item, pixels, picture.size, picture.georef)
            labels, instances = self.label(pixels, examples)
        except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
            return failure_result(item, Status.ERROR, exc=exc, started_at=picture.started_at)
        return picture.found(labels, instances)

    def examples(
        self, item: Item, pixels: np.ndarray, size: tuple[int, int] | None, georef: object
    ) -> list[tuple[Placed, tuple[int, int, int]]]:
        """The exemplar boxes of the item's image, each with its median colour."""
        if self.exemplars is None:
            return []
        if item.window is None:
            placed = self.exemplars.place(item.path, pixels.shape[1], pixels.shape[0], georef)  # type: ignore[arg-type]
            return [(p, _median(pixels, p.box)) for p in placed]
        whole = None
        if self.exemplars.map_coordinates:  # the whole image's georeference, read once per image
            if self._georef[0] != item.path:
                from ..geo.georef import read_georef

                self._georef = (item.path, read_georef(self.input_root / item.path))
            whole = self._georef[1]
        width, height = size or (pixels.shape[1], pixels.shape[0])
        found = []
        for p in self.exemplars.place(item.path, width, height, whole):
            inside = within(p.box, item.window)
            if inside is not None:  # the window holds it: its pixels are here
                found.append((p, _median(pixels, inside)))
                continue
            x0, y0, x1, y1 = _pixel_span(p.box)
            box_pixels = self.reader.windows.read(self.input_root / item.path, (x0, y0, x1, y1))[0]
            found.append((p, _median(box_pixels, (0.0, 0.0, float(x1 - x0), float(y1 - y0)))))
        return found

    def label(
        self, pixels: np.ndarray, examples: Sequence[tuple[Placed, tuple[int, int, int]]] = ()
    ) -> tuple[np.ndarray, list[Instance]]:
        """The uint16 label map of an RGB array and its instances."""
        labels = np.zeros(pixels.shape[:2], np.uint16)
        instances: list[Instance] = []
        signed = pixels.astype(np.int16)
        text = self.config.prompts
        folding = self.config.suppress_iou is not None
        candidates: list[tuple[str, np.ndarray, tuple[int, int, int, int]]] = []
        for prompt, colour in self.colours:
            mine = self.exemplars.for_prompt([p for p, _ in examples], prompt, text) if self.exemplars else []
            ids = {id(p) for p in mine}
            wanted = [colour] if colour is not None else []
            wanted += [c for p, c in examples if id(p) in ids and p.positive]
            unwanted = [c for p, c in examples if id(p) in ids and not p.positive]
            if not wanted:
                continue
            near = _near(signed, wanted) & ~_near(signed, unwanted)
            found, boxes = components(near if folding else near & (labels == 0))
            keep = _largest(found, len(boxes), self.max_detections)
            if folding:
                candidates += [(prompt, found == k + 1, boxes[k]) for k in keep]
                continue
            if len(instances) + len(keep) > np.iinfo(np.uint16).max:
                raise ValueError("more instances than a uint16 label map holds; lower --max-detections")
            lookup = np.zeros(len(boxes) + 1, np.uint16)  # component -> its index in the label map
            for component in keep:
                x0, y0, x1, y1 = boxes[component]
                instances.append(Instance(prompt, 1.0, (float(x0), float(y0), float(x1), float(y1))))
                lookup[component + 1] = len(instances)
            painted = lookup[found]
            labels = np.where(painted > 0, painted, labels)
        if folding:
            return _fold(labels, candidates, float(self.config.suppress_iou or 0.0))
        return labels, instances


def _fold(
    labels: np.ndarray, candidates: Sequence[tuple[str, np.ndarray, tuple[int, int, int, int]]], iou: float
) -> tuple[np.ndarray, list[Instance]]:
    """Duplicates across prompts folded (``prompting.fold_duplicates``); the kept ones painted in
    prompt order, each on the pixels no earlier one took."""
    prompts = [c[0] for c in candidates]
    kept, folded = fold_duplicates([c[1] for c in candidates], prompts, [1.0] * len(candidates), iou)
    if len(kept) > np.iinfo(np.uint16).max:
        raise ValueError("more instances than a uint16 label map holds; lower --max-detections")
    instances = []
    for k in kept:
        prompt, mask, (x0, y0, x1, y1) = candidates[k]
        box = (float(x0), float(y0), float(x1), float(y1))
        instances.append(Instance(prompt, 1.0, box, folded.get(k, ())))
        labels[mask & (labels == 0)] = len(instances)
    return labels, instances


def _near(signed: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Pixels within ``TOLERANCE`` of any of ``colours``."""
    near = np.zeros(signed.shape[:2], bool)
    for colour in colours:
        near |= np.abs(signed - np.array(colour, np.int16)).max(axis=2) <= TOLERANCE
    return near


def _pixel_span(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The pixels whose centres a box (pixel edges) holds; at least one."""
    x0, y0 = int(np.floor(box[0] + 0.5)), int(np.floor(box[1] + 0.5))
    x1, y1 = max(int(np.floor(box[2] + 0.5)), x0 + 1), max(int(np.floor(box[3] + 0.5)), y0 + 1)
    return x0, y0, x1, y1


def _median(pixels: np.ndarray, box: tuple[float, float, float, float]) -> tuple[int, int, int]:
    """The median colour of the pixels a box holds."""
    x0, y0, x1, y1 = _pixel_span(box)
    inside = pixels[y0:y1, x0:x1].reshape(-1, pixels.shape[2])[:, :3]
    r, g, b = (int(v) for v in np.rint(np.median(inside, axis=0)))
    return r, g, b


def _above_threshold(config: RunConfig, outcome: Outcome) -> Outcome:
    """Instances scoring below their prompt's ``--prompt-threshold`` dropped (this engine's own
    scores are 1.0; an engine built on it may score otherwise)."""
    if not isinstance(outcome, Segmentation) or not config.prompt_thresholds:
        return outcome
    given = dict(config.prompt_thresholds)
    instances = outcome.instances
    keep = [k for k, inst in enumerate(instances) if inst.score >= given.get(inst.prompt, 0.0)]
    if len(keep) < len(instances):
        lookup = np.zeros(len(instances) + 1, outcome.labels.dtype)
        lookup[np.array(keep, int) + 1] = np.arange(1, len(keep) + 1)
        outcome.labels, outcome.instances, outcome.areas = (
            lookup[outcome.labels],
            [instances[k] for k in keep],
            None,
        )
    return outcome


def _largest(found: np.ndarray, count: int, limit: int) -> list[int]:
    """The ``limit`` largest components (0-based), in scan order; ties go to the earlier one."""
    if count <= limit:
        return list(range(count))
    areas = np.bincount(found.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-areas, kind="stable")[:limit]
    return sorted(int(k) for k in order)


def components(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """8-connected components of a 2-D boolean mask: an int32 map (0 = background, k = the
    component whose first pixel in row-major order comes k-th) and each one's box (x0, y0, x1, y1),
    pixel edges.

    Works on runs (horizontal stretches of True) instead of pixels: runs in neighbouring rows
    touch when their column ranges overlap or meet at a corner; those pairs are merged with a
    vectorised union-find (hook the larger root under the smaller, then halve every path until
    each run points at its root), so no Python loop runs per pixel or per run."""
    height, width = mask.shape
    rows, starts, ends = _runs(mask)
    if rows.size == 0:
        return np.zeros((height, width), np.int32), []
    first, second = _touching(rows, starts, ends, width)
    root = _union(rows.size, first, second)
    # Roots are the smallest run of each component, which comes first in row-major order.
    roots, component = np.unique(root, return_inverse=True)
    lengths = ends - starts
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(rows * width + starts, lengths) + np.arange(int(lengths.sum())) - offsets
    labelled = np.zeros(height * width, np.int32)
    labelled[flat] = np.repeat(component + 1, lengths)
    boxes = _boxes(len(roots), component, rows, starts, ends)
    return labelled.reshape(height, width), boxes


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, end) of every run of True, end exclusive, in row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    change = np.diff(padded, axis=1)
    rows, starts = np.nonzero(change == 1)
    _rows, ends = np.nonzero(change == -1)
    return rows.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def _touching(
    rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of runs, a in the row above b, that are 8-connected: start_a <= end_b and
    start_b <= end_a (ends exclusive, so runs meeting at a corner count)."""
    stride = width + 2
    above = rows - 1
    # Runs are sorted by (row, start) and disjoint within a row, so both keys are increasing.
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    low = np.searchsorted(end_keys, above * stride + starts, side="left")
    high = np.searchsorted(start_keys, above * stride + ends, side="right")
    count = np.maximum(high - low, 0)
    second = np.repeat(np.arange(rows.size), count)
    first = np.repeat(low, count) + np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    return first, second


def _union(size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The root (smallest member) of every element's set, given the pairs to merge."""
    parent = np.arange(size)
    while True:
        a, b = parent[first], parent[second]
        if np.array_equal(a, b):
            return parent
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))
        while True:  # every element straight to its root: parents only ever point lower
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _boxes(
    count: int, component: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> list[tuple[int, int, int, int]]:
    x0 = np.full(count, np.iinfo(np.int64).max)
    y0 = np.full(count, np.iinfo(np.int64).max)
    x1 = np.zeros(count, np.int64)
    y1 = np.zeros(count, np.int64)
    np.minimum.at(x0, component, starts)
    np.minimum.at(y0, component, rows)
    np.maximum.at(x1, component, ends)
    np.maximum.at(y1, component, rows + 1)
    return list(zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), strict=True))
