"""The options of ``batchseg run``, each declared once; everything else about them is derived.

One field of :class:`RunOptions` is one option: its name (the RunConfig field, the job-file key with
``_`` or ``-``, ``--name`` on the command line, ``BATCHSEG_NAME`` in the environment), its kind of
value (:mod:`batchseg.values`), default, help, whether it belongs to the configuration fingerprint,
whether ``batchseg retry`` accepts it, and which part reads it. Derived from it: the click options of
``run`` and ``retry`` (cli), the job-file checks (jobfile), RunConfig's fields and defaults (config,
a subclass), the fingerprint fields and upgrades, and the documentation's reference of options
(docs/gen_reference.py writes docs/reference/options.md and the README's short table from here;
tests/test_docs.py and tests/test_docs_site.py check they are current).

Adding an option is one field here, then `python docs/gen_reference.py` (a longer explanation than
the help line goes in docs/reference-notes.toml):

    previews: bool = option(Flag(), False, help="Write overlay previews.", reader=RUNNER, retry=True)
    tile_overlap: float = option(Fraction(), 0.0, help="Overlap of neighbouring tiles.",
                                 reader=ENGINE, fingerprint=True, upgrade=0.0)

A fingerprint option needs ``upgrade``: the value that means what batchseg did before the option
existed. A stored fingerprint without the field reads as that value, so an output folder made by an
earlier version resumes without --new-run as long as the run's value equals it (keep the default
there when you can). With ``quiet=True`` the option is left out of the fingerprint while at that
value, so a run that does not use it keeps the fingerprint and hash of earlier versions. A new kind
of value goes in batchseg.values. Torch-free.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .engine_names import SAM3_ENGINE, EngineRef
from .option_spec import NO_UPGRADE, REQUIRED, Option, Reader, option
from .prompt_values import CLASS_KIND, THRESHOLD_KIND, ExemplarFile, ExemplarsKind
from .remote import InputPath
from .values import (
    Choice,
    Count,
    CountOrAuto,
    Device,
    Duration,
    Flag,
    Fraction,
    Kind,
    ModelRef,
    Number,
    PathValue,
    Text,
    TextList,
    TileSide,
    TimeOfDay,
)

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_MODEL",
    "FINGERPRINT_UPGRADES",
    "OPTIONS",
    "Option",
    "Reader",
    "RunOptions",
    "by_name",
    "fingerprint_options",
    "option",
    "retry_options",
]


DEFAULT_MODEL = "facebook/sam3"
#: The engine factory (``MODULE:FUNCTION``) a run uses unless ``--engine`` names another.
DEFAULT_ENGINE = SAM3_ENGINE


ENGINE, POOL, RUNNER = Reader.ENGINE, Reader.POOL, Reader.RUNNER


class BandList(Kind[tuple[int, ...] | None]):
    """One or three band numbers counted from 1: ``1,2,3`` as text, ``[4, 3, 2]`` in a job file."""

    expected = "one or three band numbers counted from 1, like 1,2,3"
    metavar = "B,B,B"

    def read(self, value: object, toml: bool) -> tuple[int, ...] | None:
        parts = value.split(",") if isinstance(value, str) else value
        parts = [parts] if isinstance(parts, int) else parts
        if not isinstance(parts, list | tuple) or isinstance(value, bool):
            raise self.refuse(value, toml)
        try:
            bands = tuple(int(str(p).strip()) for p in parts if not isinstance(p, bool | float))
        except ValueError:
            raise self.refuse(value, toml) from None
        if len(bands) != len(parts) or len(bands) not in (1, 3) or min(bands) < 1:
            raise self.refuse(value, toml)
        return bands

    def to_json(self, value: Any) -> Any:
        return None if value is None else list(value)

    def from_json(self, value: Any) -> Any:
        return None if value is None else tuple(value)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The registry of run options; RunConfig adds its behaviour to these fields."""

    # --- what to segment, with what: the outputs depend on these ---------------------------------
    input: Path = option(
        InputPath(),
        help="Folder of images, walked recursively, or s3://BUCKET/PREFIX (docs/object-storage.md).",
        reader=RUNNER,
        argument=True,
    )
    prompts: tuple[str, ...] = option(
        TextList("prompts"),
        (),
        help="Text prompt; repeat for several (each image is encoded once).",
        reader=ENGINE,
        fingerprint=True,
        flag="--prompt",
        aliases=("prompt",),
        default_text="(required unless --exemplars)",
    )
    exemplars: ExemplarFile | None = option(
        ExemplarsKind(),
        None,
        help="Exemplar boxes: CSV path,x0,y0,x1,y1,label[,prompt] in pixels, or a vector file in map "
        "coordinates (docs/prompts.md).",
        reader=ENGINE,
        fingerprint=True,
        upgrade=None,
        quiet=True,
    )
    classes: tuple[tuple[str, str], ...] = option(
        CLASS_KIND,
        (),
        help="PROMPT=CLASS: the class of a prompt's detections (outputs' class column); repeatable.",
        reader=RUNNER,
        fingerprint=True,
        upgrade=(),
        quiet=True,
        flag="--class",
        aliases=("class",),
        default_text="the prompt",
    )
    prompt_thresholds: tuple[tuple[str, float], ...] = option(
        THRESHOLD_KIND,
        (),
        help="PROMPT=SCORE: minimum detection score of one prompt; repeatable.",
        reader=ENGINE,
        fingerprint=True,
        upgrade=(),
        quiet=True,
        flag="--prompt-threshold",
        aliases=("prompt_threshold",),
        default_text="--threshold",
    )
    suppress_iou: float | None = option(
        Fraction(),
        None,
        help="Fold a detection into a better-scored one of another prompt whose mask overlaps it by "
        "this IoU.",
        reader=ENGINE,
        fingerprint=True,
        upgrade=None,
        quiet=True,
        default_text="off",
    )
    model: str = option(
        ModelRef(),
        DEFAULT_MODEL,
        help="Local SAM3 folder (config.json, tokenizer files, model.safetensors) or hub id.",
        reader=ENGINE,
        fingerprint=True,
    )
    engine: str = option(
        EngineRef(),
        DEFAULT_ENGINE,
        help="Engine loaded in each worker: sam3, threshold, a name a package registers in the entry-point "
        "group batchseg.engines, or MODULE:FUNCTION (see docs/engines.md).",
        reader=RUNNER,
        fingerprint=True,
        upgrade=DEFAULT_ENGINE,  # 0.1.0 had only the SAM3 engine
    )
    output: Path | None = option(
        PathValue(), None, help="Output folder.", reader=RUNNER, default_text="`output/<input folder name>`"
    )
    device: str = option(
        Device(),
        "auto",
        help="auto (CUDA when present), cpu, cuda or cuda:N. Asking for cuda without one is an error.",
        reader=ENGINE,
        retry=True,
    )
    dtype: str = option(
        Choice("auto", "float32", "bfloat16", "float16"),
        "auto",
        help="auto: bfloat16 on recent GPUs, float16 on older ones, measured best on CPU.",
        reader=ENGINE,
        fingerprint=True,
    )
    threshold: float = option(
        Fraction(), 0.3, help="Minimum detection score.", reader=ENGINE, fingerprint=True
    )
    mask_threshold: float = option(
        Fraction(), 0.5, help="Mask probability threshold.", reader=ENGINE, fingerprint=True
    )
    max_detections: int = option(
        Count(), 100, help="Detections kept per prompt and image.", reader=ENGINE, fingerprint=True
    )
    max_pixels: int = option(
        Count(),
        250_000_000,
        help="Images with more pixels are refused as invalid_input.",
        reader=ENGINE,
        fingerprint=True,
    )
    # --- large images in tiles (README, "Large images: tiles") -------------------------------------
    tile: str | None = option(
        TileSide(),
        None,
        help="auto, off or N: cut large images into tiles of N source pixels, merged across seams.",
        reader=ENGINE,
        fingerprint=True,
        upgrade="off",  # before tiling every image was processed whole
        default_text="`auto` (`off` in a folder made before tiling)",
    )
    tile_overlap: int | None = option(
        CountOrAuto(2),
        None,
        help="Overlap of neighbouring tiles, pixels (2 to half a tile).",
        reader=ENGINE,
        fingerprint=True,
        upgrade=None,
        default_text="a quarter of the tile",
    )
    tile_match: float = option(
        Fraction(),
        0.5,
        help="Two tiles' detections are one object when they share this much of the smaller mask.",
        reader=ENGINE,
        fingerprint=True,
        upgrade=0.5,
    )
    gsd: float | None = option(
        Number(),
        None,
        help="Metres per pixel the model sees on georeferenced inputs: their tiles are resampled to it "
        "(outputs stay on the source grid).",
        reader=ENGINE,
        fingerprint=True,
        upgrade=None,
        default_text="the source's",
    )
    max_tiled_pixels: int = option(
        Count(),
        4_000_000_000,
        help="Largest image read by window (tiled or striped TIFF/BigTIFF).",
        reader=ENGINE,
        retry=True,
    )
    # --- how to run: may change between attempts -------------------------------------------------
    workers: int | None = option(
        CountOrAuto(),
        None,
        help="Worker processes.",
        reader=POOL,
        retry=True,
        default_text="1 on CPU, one per GPU",
    )
    threads: int | None = option(
        CountOrAuto(),
        None,
        help="Torch threads per worker.",
        reader=POOL,
        retry=True,
        default_text="cores / workers",
    )
    batch_size: int | None = option(
        CountOrAuto(),
        None,
        help="Images per forward pass.",
        reader=ENGINE,
        retry=True,
        default_text="1 on CPU, from free memory on a GPU (at most 16)",
    )
    compile: bool = option(
        Flag(),
        False,
        help="CUDA: torch.compile the ViT's layers and the prompts' decoders (slower start, then faster).",
        reader=ENGINE,
        retry=True,
    )
    cuda_graphs: bool = option(
        Flag(),
        True,
        help="CUDA: replay the vision backbone as a CUDA graph (one launch per batch).",
        reader=ENGINE,
        retry=True,
    )
    fuse_rope: bool = option(
        Flag(),
        True,
        help="CUDA: the backbone's rotary embedding as one compiled kernel (seconds to compile).",
        reader=ENGINE,
        retry=True,
        default_text="on where Triton runs",
    )
    fuse_gelu: bool = option(
        Flag(),
        True,
        help="CUDA: the backbone MLPs' GELU (tanh form) inside their first product's kernel.",
        reader=ENGINE,
        retry=True,
    )
    timeout: float = option(
        Duration(),
        300.0,
        help="Time one image may take before its worker is killed: seconds or 90m, 1h30m.",
        reader=POOL,
        retry=True,
    )
    load_timeout: float = option(
        Duration(), 600.0, help="Time a worker may take to load the model.", reader=POOL, retry=True
    )
    max_attempts: int = option(
        Count(), 2, help="Tries per image, each on a fresh worker after a failure.", reader=POOL, retry=True
    )
    max_images_per_worker: int | None = option(
        Count(),
        None,
        help="Recycle a worker after this many images, to bound leaks.",
        reader=POOL,
        retry=True,
        default_text="never",
    )
    max_consecutive_failures: int = option(
        Count(),
        20,
        help="Stop (exit 4) when the same error repeats on this many images in a row.",
        reader=POOL,
        retry=True,
    )
    deadline: str | None = option(
        TimeOfDay(),
        None,
        help="Local time after which no new image starts; exits 4, resumable.",
        reader=RUNNER,
        retry=True,
    )
    max_runtime: float | None = option(
        Duration(), None, help="Like --deadline, as a duration: 6h, 90m, 1h30m.", reader=RUNNER, retry=True
    )
    backend: str = option(
        Choice("local", "ray"),
        "local",
        help="local: worker processes on this machine; ray: Ray actors, one per GPU of the cluster "
        "(pip install 'batchseg[ray]').",
        reader=RUNNER,
        retry=True,
    )
    ray_address: str | None = option(
        Text(),
        None,
        help="With --backend ray: the cluster to join.",
        reader=RUNNER,
        retry=True,
        default_text="a Ray started for this run",
    )
    # --- which images, and the output folder's life ------------------------------------------------
    include: tuple[str, ...] = option(
        TextList("glob patterns", "GLOB"),
        (),
        help="Only paths matching this glob (relative, forward slashes); repeatable.",
        reader=RUNNER,
    )
    exclude: tuple[str, ...] = option(
        TextList("glob patterns", "GLOB"),
        (),
        help="Skip paths matching this glob; repeatable.",
        reader=RUNNER,
    )
    hash: bool = option(
        Flag(), False, help="Detect changed images by content hash as well as size and mtime.", reader=RUNNER
    )
    new_run: bool = option(
        Flag(),
        False,
        help="Start a fresh run in OUTPUT; the old run's files are moved to OUTPUT/previous-runs/.",
        reader=RUNNER,
    )
    log_keep: int = option(Count(), 30, help="Log files kept in OUTPUT/logs.", reader=RUNNER, retry=True)
    manifest_interval: float = option(
        Duration(1.0), 300.0, help="Time between manifest exports during a run.", reader=RUNNER, retry=True
    )
    progress_interval: float = option(
        Duration(0.1),
        60.0,
        help="Time between progress lines when not on a terminal.",
        reader=RUNNER,
        retry=True,
    )
    # --- what a person looks at in the morning -----------------------------------------------------
    previews: bool = option(
        Flag(),
        False,
        help="Overlay JPEGs in OUTPUT/previews/ and OUTPUT/report.html at the end of the run.",
        reader=RUNNER,
        retry=True,
    )
    report: bool = option(
        Flag(),
        False,
        help="Write OUTPUT/report.html at the end of the run (always done with --previews).",
        reader=RUNNER,
        retry=True,
    )
    preview_size: int = option(
        Count(64), 1024, help="Long side of a preview, pixels.", reader=RUNNER, retry=True
    )

    # --- georeferenced inputs (the batchseg[geo] extra) --------------------------------------------
    bands: tuple[int, ...] | None = option(
        BandList(),
        None,
        help="Georeferenced inputs: bands for red, green, blue (1,2,3), or one band as grey.",
        reader=ENGINE,
        fingerprint=True,
        upgrade=None,
        default_text="the RGB colour interpretation, else the first three",
    )
    vectors: bool = option(
        Flag(),
        False,
        help="One polygon per detection in manifest/polygons.parquet (GeoParquet, the image's CRS).",
        reader=ENGINE,
        retry=True,
    )
    simplify: float = option(
        Number(0.0, exclusive=False),
        0.0,
        help="With --vectors: simplify outlines by this tolerance, pixels (0: exact pixel edges).",
        reader=ENGINE,
        fingerprint=True,
        upgrade=0.0,
    )


def _declared() -> tuple[Option, ...]:
    found = []
    for f in fields(RunOptions):
        declared: Option = f.metadata["option"]
        default = REQUIRED if f.default is MISSING else f.default
        found.append(replace(declared, name=f.name, default=default))
    return tuple(found)


#: Every run option, in the order of ``--help`` and the README.
OPTIONS: tuple[Option, ...] = _declared()
_BY_NAME = {o.name: o for o in OPTIONS}


def by_name(name: str) -> Option:
    return _BY_NAME[name]


def fingerprint_options() -> tuple[Option, ...]:
    """The options that decide the content of the outputs: fixed for an output folder."""
    return tuple(o for o in OPTIONS if o.fingerprint)


def retry_options() -> tuple[Option, ...]:
    """The options ``batchseg retry`` accepts; the rest come from the stored configuration."""
    return tuple(o for o in OPTIONS if o.retry)


#: Fingerprint fields added after the first release, with the value that means what earlier
#: versions did: a stored fingerprint that lacks one reads as this, so old output folders resume.
FINGERPRINT_UPGRADES: dict[str, Any] = {
    o.name: o.kind.to_fingerprint(o.upgrade)
    for o in fingerprint_options()
    if o.upgrade is not NO_UPGRADE and not o.quiet
}
