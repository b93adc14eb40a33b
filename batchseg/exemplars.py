"""Exemplar boxes (``--exemplars FILE``): examples of what to find, each placed on the image it falls in.

Two forms (docs/prompts.md):

* a CSV with the columns ``path,x0,y0,x1,y1,label`` and an optional ``prompt``: pixel edges of
  the upright image at ``path`` (relative to the input folder, forward slashes); ``label`` 1 is a
  positive example, 0 a negative one;
* any vector file GDAL reads (GeoJSON, GeoPackage, Shapefile) in map coordinates, one polygon per
  box, with a ``label`` (1 or 0; without the field every box is positive) and an optional
  ``prompt`` attribute. A box is reprojected to each georeferenced image's CRS and applies where
  its pixel bounds fall wholly inside the image. Needs the geo extra (imported only here, lazily).

A box applies to the image it falls in wholly and, for an image run in tiles, to each tile that
holds it whole (a box wider than a tile's overlap may lie whole in no tile: that image's tiles then
run without it). The file's content (not its path) is part of the run's fingerprint. Torch-free.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadValueError, ConfigError
from .prompt_values import ExemplarFile, ExemplarsKind, file_digest
from .prompting import EXEMPLAR_PROMPT
from .values import show

if TYPE_CHECKING:
    from .config import RunConfig
    from .geo.georef import Georef

__all__ = [
    "Exemplar",
    "ExemplarFile",
    "ExemplarSet",
    "ExemplarsKind",
    "Placed",
    "file_digest",
    "unplaced_lines",
    "load_exemplars",
    "run_prompts",
    "unplaced",
]

CSV_COLUMNS = ("path", "x0", "y0", "x1", "y1", "label")
_SIDECARS = (".shx", ".dbf", ".prj", ".cpg")
#: Files read as CSV; anything else goes to GDAL (pyogrio).
CSV_SUFFIXES = (".csv", ".txt")
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Exemplar:
    """One box: a CSV row (``path`` and a pixel ``box``) or a vector feature (``points``: its
    outline's vertices in the file's CRS). ``where``: the line or feature, for messages."""

    where: str
    positive: bool
    prompt: str | None
    path: str | None = None
    box: Box | None = None
    points: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Placed:
    """An exemplar on one image: its box in the image's pixels (edges, upright)."""

    exemplar: Exemplar
    box: Box

    @property
    def positive(self) -> bool:
        return self.exemplar.positive


@dataclass
class ExemplarSet:
    """Every box of an exemplar file, with the vector file's CRS (WKT; None for a CSV)."""

    source: Path
    items: list[Exemplar]
    crs_wkt: str | None = None
    map_coordinates: bool = False
    _transformers: dict[str, Any] = field(default_factory=dict, repr=False)
    _by_path: dict[str | None, list[Exemplar]] | None = field(default=None, repr=False)

    def prompts(self, text_prompts: Sequence[str]) -> list[str]:
        """The prompts the boxes add to ``text_prompts``: named ones not among them, in order, and
        ``exemplar`` for boxes that name none when there is no text prompt."""
        found = [e.prompt for e in self.items if e.prompt and e.prompt not in text_prompts]
        if not text_prompts and any(not e.prompt for e in self.items):
            found.append(EXEMPLAR_PROMPT)
        return list(dict.fromkeys(found))

    def for_prompt(self, placed: Sequence[Placed], prompt: str, text_prompts: Sequence[str]) -> list[Placed]:
        """The boxes that go with ``prompt``: those naming it, and those naming none (they go with
        every text prompt, or form the prompt ``exemplar``)."""
        bare = prompt in text_prompts or (prompt == EXEMPLAR_PROMPT and not text_prompts)
        return [p for p in placed if p.exemplar.prompt == prompt or (bare and not p.exemplar.prompt)]

    def place(self, rel: str, width: int, height: int, georef: Georef | None) -> list[Placed]:
        """The boxes that fall wholly in the image ``rel`` (``width`` x ``height``, upright)."""
        if self._by_path is None:  # pixel boxes by image: a run looks each image's up once
            self._by_path = {}
            for exemplar in self.items:
                self._by_path.setdefault(exemplar.path, []).append(exemplar)
        found = []
        for exemplar in self.items if self.map_coordinates else self._by_path.get(rel, []):
            box = self._box_on(exemplar, rel, georef)
            if box is not None and _inside(box, (0.0, 0.0, float(width), float(height))):
                found.append(Placed(exemplar, box))
        return found

    def _box_on(self, exemplar: Exemplar, rel: str, georef: Georef | None) -> Box | None:
        if exemplar.box is not None:
            return exemplar.box if exemplar.path == rel else None
        if georef is None:
            return None
        xs, ys = zip(*exemplar.points, strict=True)
        if self.crs_wkt is not None and georef.crs_wkt is not None:
            transformer = self._transformer(georef.crs_wkt)
            xs, ys = transformer.transform(list(xs), list(ys))
        inverse = ~georef.affine
        cols, rows = zip(*(inverse @ (x, y) for x, y in zip(xs, ys, strict=True)), strict=True)
        return (min(cols), min(rows), max(cols), max(rows))

    def _transformer(self, target_wkt: str) -> Any:
        known = self._transformers.get(target_wkt)
        if known is None:
            import pyproj

            source = pyproj.CRS.from_wkt(self.crs_wkt) if self.crs_wkt else None
            known = pyproj.Transformer.from_crs(source, pyproj.CRS.from_wkt(target_wkt), always_xy=True)
            self._transformers[target_wkt] = known
        return known


def within(box: Box, window: tuple[int, int, int, int]) -> Box | None:
    """``box`` (whole-image pixels) in the frame of ``window`` (x0, y0, x1, y1) when the window
    holds it whole, else None."""
    left, top, right, bottom = (float(v) for v in window)
    if not _inside(box, (left, top, right, bottom)):
        return None
    return (box[0] - left, box[1] - top, box[2] - left, box[3] - top)


def _inside(box: Box, frame: Box) -> bool:
    eps = 1e-6  # a box drawn on the image's edge, reprojected, may stray by a rounding error
    return (
        box[0] >= frame[0] - eps
        and box[1] >= frame[1] - eps
        and box[2] <= frame[2] + eps
        and box[3] <= frame[3] + eps
    )


def load_exemplars(config: RunConfig) -> ExemplarSet | None:
    """The run's exemplar boxes, or None without ``--exemplars``. ConfigError when the file changed
    since the run's configuration was made (its fingerprint holds the content) or cannot be read."""
    given = config.exemplars
    if given is None:
        return None
    try:
        now = file_digest(given.path)
    except BadValueError as exc:
        raise ConfigError(str(exc)) from None
    if now != given.sha256:
        raise ConfigError(
            f"the exemplar file {given.path} changed since this run's configuration was made: "
            "give it again (--exemplars, with --new-run for an output folder that holds a run)"
        )
    if given.path.suffix.lower() in CSV_SUFFIXES:
        return ExemplarSet(given.path, _read_csv(given.path))
    return _read_vector(given.path)


def run_prompts(config: RunConfig, exemplars: ExemplarSet | None = None) -> list[str]:
    """Every prompt of the run, in order: ``--prompt``, then those the exemplar boxes add."""
    exemplars = exemplars if exemplars is not None else load_exemplars(config)
    added = exemplars.prompts(config.prompts) if exemplars is not None else []
    return [*config.prompts, *added]


def _label(value: str, where: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "positive", "pos"):
        return True
    if text in ("0", "0.0", "false", "negative", "neg"):
        return False
    raise ConfigError(f"{where}: label {show(value)} is neither 1 (positive) nor 0 (negative)")


def _read_csv(path: Path) -> list[Exemplar]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or ()]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise ConfigError(
                    f"{path}: the exemplar CSV lacks the column(s) {', '.join(missing)} "
                    f"(expected {','.join(CSV_COLUMNS)}[,prompt])"
                )
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read the exemplar file {path}: {exc}") from None
    found = []
    for line, row in enumerate(rows, start=2):
        where = f"{path.name} line {line}"
        try:
            box = tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1"))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: x0, y0, x1, y1 must be numbers (pixels)") from None
        x0, y0, x1, y1 = box
        if not all(math.isfinite(v) for v in box) or x1 <= x0 or y1 <= y0:
            raise ConfigError(f"{where}: a box needs x0 < x1 and y0 < y1 (pixel edges), got {box}")
        image = str(row["path"] or "").strip().replace("\\", "/").removeprefix("./")
        if not image:
            raise ConfigError(f"{where}: the path of the image is empty")
        prompt = (row.get("prompt") or "").strip() or None
        found.append(Exemplar(where, _label(row["label"] or "", where), prompt, image, (x0, y0, x1, y1)))
    return found


def _read_vector(path: Path) -> ExemplarSet:
    from .geo._extra import missing_extra

    try:
        import pyogrio.raw
        import pyproj
        import shapely
    except ImportError as exc:
        raise missing_extra(exc, "an exemplar file in map coordinates") from exc
    try:
        meta, _fids, geometry, values = pyogrio.raw.read(path)
    except Exception as exc:  # noqa: BLE001 - GDAL's errors are many; the message says which
        raise ConfigError(f"cannot read the exemplar file {path} as a vector file: {exc}") from None
    columns = {str(name): column for name, column in zip(meta["fields"], values, strict=True)}
    crs = meta.get("crs")
    crs_wkt = pyproj.CRS.from_user_input(crs).to_wkt() if crs else None
    found = []
    for k, wkb in enumerate(geometry):
        where = f"{path.name} feature {k + 1}"
        shape = shapely.from_wkb(wkb) if wkb is not None else None
        if shape is None or shape.is_empty or shape.area <= 0:
            raise ConfigError(f"{where}: an exemplar needs a polygon (a box), not {show(str(shape))}")
        label = columns["label"][k] if "label" in columns else 1
        prompt = columns["prompt"][k] if "prompt" in columns else None
        prompt = str(prompt).strip() if prompt is not None and str(prompt).strip() else None
        points = tuple((float(x), float(y)) for x, y in shapely.get_coordinates(shape).tolist())
        found.append(Exemplar(where, _label(str(label), where), prompt, points=points))
    return ExemplarSet(path, found, crs_wkt, map_coordinates=True)


def unplaced(exemplars: ExemplarSet, input_root: Path, paths: Iterable[str]) -> list[Exemplar]:
    """The boxes that fall wholly in none of the images ``paths`` (relative to ``input_root``):
    said at the start of a run, never dropped silently. Reads each candidate image's size (and,
    for map coordinates, its georeference) from its header."""
    from . import imageio

    paths = list(paths)
    left = list(exemplars.items)
    if not exemplars.map_coordinates:
        wanted = {e.path for e in left}
        paths = [p for p in paths if p in wanted]
    for rel in paths:
        if not left:
            break
        georef = None
        try:
            if exemplars.map_coordinates:
                from .geo.georef import read_georef

                georef = read_georef(input_root / rel)
                if georef is None:
                    continue
                width, height = georef.width, georef.height
            else:
                with imageio.open_header(input_root / rel) as image:
                    width, height = imageio.oriented_size(image)
        except Exception:  # noqa: BLE001 - an unreadable image is the run's to report
            # Its header cannot be read here (damaged, or a remote input): its own boxes are not
            # said to fall in no image; the image's status will say what is wrong with it.
            left = [e for e in left if e.path != rel] if not exemplars.map_coordinates else left
            continue
        placed = {id(p.exemplar) for p in exemplars.place(rel, width, height, georef)}
        left = [e for e in left if id(e) not in placed]
    return left


def unplaced_lines(config: RunConfig, paths: Iterable[str], shown: int = 20) -> list[str]:
    """The run's warning about exemplar boxes that fall wholly in no image of ``paths`` (one line
    per box, the first ``shown``, then a count); empty without --exemplars or when all are placed."""
    exemplars = load_exemplars(config)
    if exemplars is None:
        return []
    left = unplaced(exemplars, Path(config.input), paths)
    if not left:
        return []
    kind = (
        "no georeferenced image holds it whole"
        if exemplars.map_coordinates
        else "its image is not an input, or does not hold it whole"
    )
    lines = [
        f"{len(left)} of {len(exemplars.items)} exemplar box(es) in {exemplars.source.name} fall in no image:"
    ]
    for exemplar in left[:shown]:
        image = f" ({exemplar.path})" if exemplar.path else ""
        lines.append(f"  {exemplar.where}{image}: {kind}; it is not used")
    if len(left) > shown:
        lines.append(f"  ... and {len(left) - shown} more")
    return lines
