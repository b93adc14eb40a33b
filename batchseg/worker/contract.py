"""The public engine contract: what the pool gives an engine, what an engine gives back.

An engine is loaded once per worker process by a factory named ``MODULE:FUNCTION`` (``--engine``),
states its ``Capabilities`` once, then turns batches of ``Item``s into their instances
(``Segmentation``: pixels in, instances out) or failures; it writes no file: the worker's
``writer.OutputWriter`` makes every output and the ok ``ItemResult``. The pool knows nothing else
of it: SAM3 (``batchseg.engines.sam3.engine:load_engine``), the colour
threshold engine (``batchseg.engines.threshold:load``) and the tests' engines all fit here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from ..config import DEFAULT_ENGINE, DEFAULT_MODEL, RunConfig
from ..errors import ConfigError
from ..records import Item, ItemResult

if TYPE_CHECKING:
    from ..geo.georef import Georef

__all__ = [
    "Capabilities",
    "Engine",
    "EngineFactory",
    "EngineSpec",
    "HeartbeatFn",
    "Instance",
    "Outcome",
    "Segmentation",
    "check_in_parent",
    "load_factory",
    "recorded_model",
]


@dataclass(frozen=True)
class Capabilities:
    """What a loaded engine tells the pool, once, in Ready."""

    #: e.g. "cuda:0 NVIDIA H200 bfloat16" or "cpu float32"; goes into the manifest.
    device: str
    #: Preferred items per task (e.g. from free GPU memory); the pool uses it unless told otherwise.
    task_size: int = 1
    #: The engine calls ``heartbeat`` after at most this many items (0: never). The watchdog's
    #: budget then covers that many items instead of the whole task.
    heartbeat_every: int = 0
    #: CUDA devices this worker sees: with ``--workers`` unset the pool starts one worker per GPU.
    gpu_count: int = 0
    #: Side of the square the model resizes every input to (SAM3: 1008), or None (no preferred
    #: size, e.g. the threshold engine). ``--tile auto`` tiles images whose long side exceeds
    #: 2 x this, in tiles of this side; with None, ``auto`` processes every image whole.
    model_input: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"Capabilities.device must be a non-empty string, not {self.device!r}")
        for name in ("task_size", "heartbeat_every", "gpu_count"):
            value = getattr(self, name)
            least = 1 if name == "task_size" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TypeError(f"Capabilities.{name} must be an int of at least {least}, not {value!r}")
        side = self.model_input
        if side is not None and (not isinstance(side, int) or isinstance(side, bool) or side < 1):
            raise TypeError(f"Capabilities.model_input must be None or an int of at least 1, not {side!r}")


@dataclass(frozen=True)
class Instance:
    """One detection an engine found: its prompt, score and box (x0, y0, x1, y1, pixel edges in the
    frame of its ``Segmentation.labels``: a window's own; None: the writer takes its pixels' box)."""

    prompt: str
    score: float
    box: tuple[float, float, float, float] | None = None
    #: other prompts whose detection of the same object was folded into this one (--suppress-iou)
    folded: tuple[str, ...] = ()


@dataclass
class Segmentation:
    """What an engine found in one item (the image, or its window): ``instances[k - 1]`` is the
    detection painted with value k in ``labels`` (uint16, the image's or window's height x width).

    ``size``: (width, height) of the whole upright image (None: ``labels`` is the whole image);
    ``georef`` and ``valid`` (HxW bool, False on nodata) as ``reading.ImageReader`` gives
    them for a georeferenced input; ``started_at`` when its work began (None: the batch's start);
    ``areas``: pixels of each label when the engine counted them already."""

    labels: np.ndarray
    instances: list[Instance]
    size: tuple[int, int] | None = None
    georef: Georef | None = None
    valid: np.ndarray | None = None
    started_at: float | None = None
    areas: np.ndarray | None = field(default=None, repr=False)


#: What an engine gives back for an item: its instances, or its failure (``failure_result``).
Outcome = Segmentation | ItemResult


#: ``heartbeat(finished=(), reached=None)``, always passed to ``Engine.process``:
#: ``finished``: outcomes done since the last call, as (index in items, outcome), written and
#: recorded at once;
#: ``reached``: no item at or after this index has been touched yet (after a crash they go back to
#: the queue as fresh work instead of being suspects). Each call restarts the watchdog's clock.
HeartbeatFn = Callable[..., None]


class Engine(Protocol):
    """Loaded once per worker process by the factory; lives until the worker exits.

    An engine may also have ``prefetch(item) -> None`` (not part of the protocol, so engines
    without it still fit): once an image's tiles run (the engine reported the first ones), the
    worker calls it when the next image of the task runs as tiles too, so the engine can open
    (decode) that image meanwhile. A hint only: what it raises is shown as a warning."""

    capabilities: Capabilities

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        """One outcome per item, in order: its ``Segmentation``, or its failure (``failure_result``);
        per-image problems are failures, never exceptions. No file is written here: the worker
        writes each segmentation's outputs (``heartbeat.write(item, segmentation)``, where the
        heartbeat has it, does so at once in the caller's thread and returns the item's result,
        for an engine that overlaps writing with its model). An exception marks every item not
        yet reported ``error`` (items of a batch are then run again one by one). ``heartbeat`` is
        always passed (it sends nothing where the engine declared ``heartbeat_every=0``)."""
        ...

    def close(self) -> None:
        """Free what the engine holds; called once before the worker exits."""
        ...


@dataclass(frozen=True)
class EngineSpec:
    """Picklable recipe for an Engine: sent to each spawned worker."""

    config: RunConfig
    factory: str = "batchseg.engines.sam3.engine:load_engine"


#: ``load(spec, slot) -> Engine``: called once per worker process; ``slot`` numbers the workers
#: from 0 (a GPU engine takes GPU ``slot``). It may raise: ConfigError (the user's to fix, the run
#: ends before any image) or anything else (the model cannot load).
EngineFactory = Callable[[EngineSpec, int], Engine]


def load_factory(spec: EngineSpec) -> EngineFactory:
    """The function ``spec.factory`` names; ConfigError naming what is wrong with it."""
    module_name, colon, func_name = spec.factory.partition(":")
    if not colon or not module_name or not func_name:
        raise ConfigError(f"--engine {spec.factory!r}: expected MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not exc.name or not (module_name + ".").startswith(exc.name + "."):
            raise  # the engine's module is there; something it imports is not: a load failure
        raise ConfigError(f"--engine {spec.factory!r}: there is no module {module_name}") from exc
    factory: object = module
    for name in func_name.split("."):  # a class's method too (``plugin:Engine.load``)
        factory = getattr(factory, name, None)
    if not callable(factory):
        raise ConfigError(f"--engine {spec.factory!r}: {module_name} has no function {func_name}")
    return cast(EngineFactory, factory)


def check_in_parent(factory: str, config: RunConfig) -> None:
    """The engine's look at the configuration before any worker starts: the factory module's
    ``check(config)``, if it defines one (SAM3 refuses a prompt longer than the model reads there,
    instead of after a model load). Imported in the parent, so such a module must stay light; a
    module that cannot be imported here is left to the worker, whose load reports it in full."""
    module_name = factory.partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - the worker's load says what is wrong, with its traceback
        return
    hook = getattr(module, "check", None)
    if callable(hook):
        hook(config)


def recorded_model(factory: str, config: RunConfig) -> str:
    """What the run's ``model_id`` records: the factory module's ``model_id(config)`` if it defines
    one (the colour-threshold engine has no model, so says what it is); else ``--model`` for the
    default SAM3 engine, and for another engine its ``MODULE:FUNCTION``, with ``--model`` after it
    when that was given (an engine of one's own may read it or not: batchseg cannot tell)."""
    module_name = factory.partition(":")[0]
    try:
        hook = getattr(importlib.import_module(module_name), "model_id", None)
        if callable(hook):
            return str(hook(config))
    except Exception:  # noqa: BLE001, S110 - the worker's load reports such a module; this is a label
        pass
    if factory == DEFAULT_ENGINE:
        return config.model
    return factory if config.model == DEFAULT_MODEL else f"{factory} ({config.model})"
