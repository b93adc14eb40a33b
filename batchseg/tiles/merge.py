"""One detection per object from the detections of overlapping tiles.

Each tile's detections arrive as COCO RLE of the tile's window. Merging never builds a full-size
array: masks become ``SparseMask`` runs of the whole image. The rules, exact for an engine whose
per-tile masks are the object cut to the window (the colour-threshold engine):

1. A detection is *cut* when its mask touches an edge of its tile that lies inside the image, and
   *whole* otherwise (image borders do not cut).
2. Two detections of the same prompt in overlapping tiles *match* when, inside the overlap of the
   two windows, their intersection covers at least ``match`` (default 0.5) of the smaller of the
   two masks there; boxes are compared first so most pairs cost nothing. Two cut detections that
   share pixels but fall short are compared again piece by piece (connected pieces inside the
   overlap), since two tiles may split a large object differently there.
3. Matches link detections into groups. A group with a whole detection is an object some tile
   held whole: its cut detections are dropped (they are the same object seen through a
   neighbour's edge) and whole duplicates are folded into the best-scoring one, keeping the mask
   of the view farthest from a tile edge (a union of views would inflate the shape).
4. A group of cut detections only is an object larger than what one tile holds whole: each tile
   contributes its mask inside its core (the window cut at the middle of each overlap, so each
   pixel comes from exactly one tile) and the pieces are joined across every seam. A model's
   tiles disagree: where the tile owning a pixel gave no view to the group (it missed the
   object, or saw it as another one), the pixel is taken from the views that saw it (their
   union there). So a group is never empty, even when all its views lie outside their own cores.
5. Objects are numbered 1..N by descending score; on overlap the better score owns a pixel
   (``area_px`` and the RLE describe ``label map == index``, as for whole images); an object left
   without a pixel (better objects took them all) is no detection. ``tiles`` says how many tiles
   had a detection folded into it. There is no cap: N is at most the sum of the tiles' detections
   (each tile capped by ``--max-detections`` before any upsampling).

6. With ``fold_iou`` (``--suppress-iou``), one object under one prompt across tiles too: of two
   objects of different prompts whose masks' IoU is at least ``fold_iou``, the better-scored one
   keeps the object and names the other's prompt in ``folded`` (with the prompts its tiles'
   detections had folded already), before rule 5 numbers them.

A failure says where: ``MergeError`` names the tile being added, or the tiles of the object being
made, and what went wrong (``describe``).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import rle
from .grid import Tile, TilePlan
from .sparse import SparseMask, boxes_meet, intersection_areas, meeting_pairs, piecewise_ratios, uncovered

__all__ = [
    "DEFAULT_MATCH",
    "MergeError",
    "MergeRules",
    "MergedDetection",
    "TileDetection",
    "TileMerger",
    "describe",
    "merge_tiles",
]

#: Intersection over the smaller mask inside the overlap above which two tiles saw one object.
DEFAULT_MATCH = 0.5
#: Bits of a part's key for its position among its tile's detections (the rest: the tile's place).
_POSITION_BITS = 32
#: Grid cell (pixels) used to find the better-scored objects that may overlap an object.
_CELL = 256
#: Tiles named in a failing object's message.
_NAMED_TILES = 4


class MergeError(RuntimeError):
    """A merge that failed: ``where`` (a tile, or the tiles of an object) and the ``cause``."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{describe(cause)} ({where})")
        self.where, self.cause = where, cause


def describe(exc: BaseException) -> str:
    """``Class: message`` of a failure, for a user: an exception without a message (a bare
    ``assert``) is named by the line that raised it, never as an empty ``AssertionError:``."""
    if isinstance(exc, MergeError):
        return str(exc)
    text = str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    if not text and frames:
        last = frames[-1]
        text = f"raised in {last.name} ({Path(last.filename).name}, line {last.lineno})"
    return f"{type(exc).__name__}: {text or repr(exc)}"


class TileDetection(Protocol):
    """What merging needs of an engine's detection on a tile (``records.Detection`` fits)."""

    @property
    def prompt(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def mask_rle(self) -> str: ...
    @property
    def folded(self) -> tuple[str, ...]: ...  # prompts the tile's engine folded into it


@dataclass(frozen=True, eq=False)
class MergedDetection:
    """One object of the merged image. ``mask`` is ``label map == index``; ``box`` is the tight
    box of the object's whole mask, (x0, y0, x1, y1) in pixels, ends exclusive."""

    index: int
    prompt: str
    score: float
    box: tuple[float, float, float, float]
    area_px: int
    tiles: int
    mask: SparseMask
    folded: tuple[str, ...] = ()  # prompts whose detection of this object was folded into it

    def mask_rle(self, width: int) -> str:
        """COCO RLE counts of ``label map == index`` over the whole image."""
        return self.mask.to_rle(width)


@dataclass(eq=False)
class _Part:
    """One tile's detection, in whole-image coordinates."""

    key: int
    tile: Tile
    prompt: str
    score: float
    mask: SparseMask
    bbox: tuple[int, int, int, int]
    cut: bool
    folded: tuple[str, ...] = ()  # prompts the tile's engine folded into this detection
    links: dict[int, float] = field(default_factory=dict)  # matched part key -> overlap ratio


@dataclass(frozen=True)
class MergeRules:
    """How an image's tiles merge: ``match`` (rule 2) and ``fold_iou`` (rule 6; None: off)."""

    match: float = DEFAULT_MATCH
    fold_iou: float | None = None

    def merger(self, plan: TilePlan) -> TileMerger:
        return TileMerger(plan, match=self.match, fold_iou=self.fold_iou)


def merge_tiles(
    plan: TilePlan,
    results: Mapping[str, Sequence[TileDetection]],
    *,
    match: float = DEFAULT_MATCH,
    fold_iou: float | None = None,
) -> list[MergedDetection]:
    """Merge every tile's detections (``results[tile.id]``; a missing id is a tile without
    detections) into the image's detections, numbered 1..N by descending score."""
    merger = TileMerger(plan, match=match, fold_iou=fold_iou)
    for tile in plan.tiles:
        if tile.id in results:
            merger.add(tile.id, results[tile.id])
    return merger.finish()


class TileMerger:
    """A merge that starts before the last tile is in: ``add`` each finished tile (in any order)
    and its detections are read and matched with its finished neighbours at once; ``finish`` makes
    the objects. A worker feeds it (in its merge helper process) while the engine runs the next
    tiles, so a dense image's merge is mostly done when its last tile is. The result does not
    depend on the order of ``add``: parts are keyed by their tile's place in the plan."""

    def __init__(
        self, plan: TilePlan, *, match: float = DEFAULT_MATCH, fold_iou: float | None = None
    ) -> None:
        if not 0.0 < match <= 1.0:
            raise ValueError(f"the match threshold must be in (0, 1], not {match}")
        # Nothing per tile here: a strip's 100,000 tiles cost nothing before they come.
        self.plan, self.match, self.fold_iou = plan, match, fold_iou
        self._parts: dict[str, list[_Part]] = {}

    def __contains__(self, tile_id: object) -> bool:
        """Whether the tile was added."""
        return tile_id in self._parts

    def add(self, tile_id: str, detections: Sequence[TileDetection]) -> None:
        """One finished tile's detections (RLE of its window); each tile once."""
        if tile_id in self._parts:
            raise ValueError(f"tile {tile_id} was added twice")
        try:
            tile = self.plan.by_id(tile_id)
        except KeyError:
            raise ValueError(f"{tile_id!r} is not a tile of this plan") from None
        try:
            ordinal = tile.row * len(self.plan.xs) + tile.col
            ours = _parts(self.plan, tile, ordinal, detections)
            for other in self.plan.overlapping(tile):
                if other.id in self._parts:
                    _link(ours, self._parts[other.id], tile, other, self.match)
        except Exception as exc:
            raise MergeError(_tile_where(tile), exc) from exc
        self._parts[tile_id] = ours

    def finish(self) -> list[MergedDetection]:
        """The image's detections, numbered 1..N by descending score (tiles never added had none)."""
        parts = {part.key: part for tile_parts in self._parts.values() for part in tile_parts}
        objects = []
        for group in _groups(parts):
            try:
                objects += _objects(self.plan, group)
            except Exception as exc:
                raise MergeError(_group_where(group), exc) from exc
        try:
            if self.fold_iou is not None:
                objects = _fold(objects, self.fold_iou)
            return _number(self.plan, objects)
        except Exception as exc:
            raise MergeError(f"numbering the {len(objects)} merged objects", exc) from exc


def _tile_where(tile: Tile) -> str:
    return f"tile {tile.id}, window x {tile.x0}-{tile.x1}, y {tile.y0}-{tile.y1}"


def _group_where(group: list[_Part]) -> str:
    """The object a group makes, by prompt and the tiles that saw it (the first few)."""
    tiles = sorted({p.tile.id: p.tile for p in group}.values(), key=lambda t: (t.row, t.col))
    named = "; ".join(_tile_where(t) for t in tiles[:_NAMED_TILES])
    more = f"; and {len(tiles) - _NAMED_TILES} more" if len(tiles) > _NAMED_TILES else ""
    return f"the {group[0].prompt!r} object seen by {named}{more}"


def _parts(plan: TilePlan, tile: Tile, ordinal: int, detections: Sequence[TileDetection]) -> list[_Part]:
    """One tile's non-empty detections in image coordinates, keyed by (tile's place, position)."""
    parts: list[_Part] = []
    left, top, right, bottom = plan.interior_edges(tile)
    for position, det in enumerate(detections):
        if rle.is_empty(det.mask_rle, tile.y1 - tile.y0, tile.x1 - tile.x0):
            continue  # most of a dense scene's low scores: skipped before any parsing
        mask = SparseMask.from_rle(det.mask_rle, tile.window, plan.height)
        if mask.bbox is None:
            continue  # no pixel in this tile: nothing to merge or to draw
        x0, y0, x1, y1 = mask.bbox
        cut = (
            (left and x0 == tile.x0)
            or (top and y0 == tile.y0)
            or (right and x1 == tile.x1)
            or (bottom and y1 == tile.y1)
        )
        key = ordinal << _POSITION_BITS | position
        parts.append(
            _Part(key, tile, det.prompt, float(det.score), mask, mask.bbox, bool(cut), tuple(det.folded))
        )
    return parts


def _link(ours: list[_Part], theirs: list[_Part], a: Tile, b: Tile, match: float) -> None:
    """Record the matches between two overlapping tiles' parts (rule 2)."""
    shared = (max(a.x0, b.x0), max(a.y0, b.y0), min(a.x1, b.x1), min(a.y1, b.y1))
    mine, other = _inside(ours, shared), _inside(theirs, shared)
    if not mine or not other:
        return
    prompts = {p.prompt: k for k, p in enumerate(ours + theirs)}
    candidates = np.nonzero(
        boxes_meet(
            np.array([m.bbox for _, m in mine])[:, None], np.array([m.bbox for _, m in other])[None, :]
        )
        & (
            np.array([prompts[p.prompt] for p, _ in mine])[:, None]
            == np.array([prompts[q.prompt] for q, _ in other])[None, :]
        )
    )
    pairs = [(mine[i], other[j]) for i, j in zip(*(c.tolist() for c in candidates), strict=True)]
    if not pairs:
        return
    masks = [(mp, mq) for (_, mp), (_, mq) in pairs]
    ratios = intersection_areas(masks) / np.array([min(mp.area, mq.area) for mp, mq in masks])
    # Two tiles can split one large object differently inside the overlap (a piece joined outside
    # it in one tile is two pieces in the other): cut masks that share pixels but fall short are
    # compared again piece by piece, all such pairs at once.
    again = [k for k, ((p, _), (q, _)) in enumerate(pairs) if 0 < ratios[k] < match and p.cut and q.cut]
    if again:
        ratios[again] = piecewise_ratios([masks[k] for k in again])
    for ((p, _), (q, _)), ratio in zip(pairs, ratios.tolist(), strict=True):
        if ratio >= match:
            p.links[q.key] = q.links[p.key] = ratio


def _inside(parts: list[_Part], window: tuple[int, int, int, int]) -> list[tuple[_Part, SparseMask]]:
    """The parts with pixels inside ``window``, each with its mask cut to it."""
    out = []
    for part in parts:
        if _boxes_meet(part.bbox, window):
            mask = part.mask.clip(window)
            if mask:
                out.append((part, mask))
    return out


def _groups(parts: dict[int, _Part]) -> list[list[_Part]]:
    """Connected groups of the match graph, in key order, each in key order."""
    seen: set[int] = set()
    groups = []
    for part in sorted(parts.values(), key=lambda p: p.key):
        if part.key in seen:
            continue
        stack, group = [part.key], []
        seen.add(part.key)
        while stack:
            key = stack.pop()
            group.append(parts[key])
            for other in parts[key].links:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        groups.append(sorted(group, key=lambda p: p.key))
    return groups


@dataclass(eq=False)
class _Object:
    prompt: str
    score: float
    mask: SparseMask
    tiles: set[str]
    folded: set[str] = field(default_factory=set)


def _objects(plan: TilePlan, group: list[_Part]) -> list[_Object]:
    """The objects of one match group (rules 3 and 4)."""
    wholes = sorted((p for p in group if not p.cut), key=lambda p: (-p.score, p.key))
    if not wholes:
        tiles = {p.tile.id for p in group}
        mask = group[0].mask.union(*(p.mask for p in group[1:])) if len(tiles) == 1 else _joined(plan, group)
        if not mask:  # cannot happen (parts have pixels, ``_joined`` keeps some), and must not pass unseen
            raise ValueError("the views of an object joined to an empty mask")
        folded = {name for p in group for name in p.folded}
        return [_Object(group[0].prompt, max(p.score for p in group), mask, tiles, folded)]
    # Work through links, never all pairs: a dense scene's group can hold thousands of views
    # (measured: 72,900 tile detections took 45 s in an all-pairs loop here, now under one).
    remaining = {p.key: p for p in wholes}  # best score first
    objects: list[tuple[_Part, list[_Part]]] = []
    for best in wholes:
        if remaining.pop(best.key, None) is None:
            continue  # a view of an earlier object
        # At most one view per other tile: the one overlapping ``best`` most (ties: best score).
        per_tile: dict[str, _Part] = {}
        linked = (remaining[k] for k in best.links if k in remaining and remaining[k].tile is not best.tile)
        for w in sorted(linked, key=lambda w: (-best.links[w.key], -w.score, w.key)):
            per_tile.setdefault(w.tile.id, w)
        for view in per_tile.values():
            del remaining[view.key]
        objects.append((best, [best, *per_tile.values()]))
    owner = {view.key: k for k, (_, views) in enumerate(objects) for view in views}
    members: list[list[_Part]] = [list(views) for _, views in objects]
    for part in (p for p in group if p.cut):
        # A cut view joins the object it overlaps most (directly linked), else the best object.
        chosen, most = 0, 0.0
        for key, ratio in part.links.items():
            k = owner.get(key)
            if k is not None and (ratio > most or (ratio == most and k < chosen)):
                chosen, most = k, ratio
        members[chosen].append(part)
    out = []
    for (best, views), parts in zip(objects, members, strict=True):
        central = min(views, key=lambda v: (-_edge_distance(plan, v), -v.score, v.key))
        tiles, folded = {p.tile.id for p in parts}, {name for p in parts for name in p.folded}
        out.append(_Object(best.prompt, max(p.score for p in parts), central.mask, tiles, folded))
    return out


def _joined(plan: TilePlan, group: list[_Part]) -> SparseMask:
    """Rule 4: each view inside its own tile's core and, inside the core of a tile that gave the
    group no view, every view that saw those pixels (the cores partition the image, so this is
    each pixel from its owner's view when there is one, else from the views that saw it). A pixel
    is lost only where its owner's view says no; should that leave nothing (views that agree
    nowhere), the union of the views is the object: a group is never empty."""
    viewed = {p.tile.id for p in group}
    pieces = []
    for part in group:
        for tile in (part.tile, *plan.overlapping(part.tile)):
            core = plan.core(tile)
            if (tile is part.tile or tile.id not in viewed) and _boxes_meet(part.bbox, core):
                pieces.append(part.mask.clip(core))
    joined = pieces[0].union(*pieces[1:])
    return joined if joined else group[0].mask.union(*(p.mask for p in group[1:]))


def _edge_distance(plan: TilePlan, part: _Part) -> int:
    """Pixels between the part's box and the nearest edge of its tile inside the image (where a
    model's view is least reliable); image borders do not count."""
    x0, y0, x1, y1 = part.bbox
    t = part.tile
    gaps = zip(plan.interior_edges(t), (x0 - t.x0, y0 - t.y0, t.x1 - x1, t.y1 - y1), strict=True)
    return min((gap for inner, gap in gaps if inner), default=plan.side)


def _fold(objects: list[_Object], iou: float) -> list[_Object]:
    """Rule 6: best score first (ties: top, left, prompt), each object either kept or folded into
    the best kept object of another prompt it overlaps by ``iou`` or more. Only objects whose boxes
    meet are compared (found on a grid, as for rule 5)."""
    boxed = [(o, o.mask.bbox) for o in objects if o.mask.bbox is not None]
    boxed.sort(key=lambda ob: (-ob[0].score, ob[1][1], ob[1][0], ob[0].prompt))
    ordered = [o for o, _ in boxed]
    if len(ordered) < 2:
        return ordered
    boxes = np.array([box for _, box in boxed], np.int64)
    later, earlier = meeting_pairs(boxes, _CELL)
    pairs = [
        (a, b)
        for a, b in zip(later.tolist(), earlier.tolist(), strict=True)
        if ordered[a].prompt != ordered[b].prompt
    ]
    shared = intersection_areas([(ordered[a].mask, ordered[b].mask) for a, b in pairs]).tolist()
    areas = [o.mask.area for o in ordered]
    partners: dict[int, list[int]] = {}  # each later object's better ones it overlaps enough, best first
    for (a, b), inter in sorted(zip(pairs, shared, strict=True)):
        if inter and inter >= iou * (areas[a] + areas[b] - inter):
            partners.setdefault(a, []).append(b)
    kept: list[_Object] = []
    into: dict[int, _Object] = {}
    for k, obj in enumerate(ordered):
        target = next((into[b] for b in partners.get(k, ()) if b in into), None)
        if target is None:
            into[k] = obj
            kept.append(obj)
        else:
            target.folded |= {obj.prompt, *obj.folded} - {target.prompt}
    return kept


def _number(plan: TilePlan, objects: list[_Object]) -> list[MergedDetection]:
    """Rule 5: order, indices, and the visible mask of each object (better scores own overlaps);
    an object without a visible pixel is no detection."""
    boxed = [(o, o.mask.bbox) for o in objects if o.mask.bbox is not None]  # all: objects have pixels
    boxed.sort(key=lambda ob: (-ob[0].score, ob[1][1], ob[1][0], ob[0].prompt))
    boxes = np.array([box for _, box in boxed], np.int64).reshape(-1, 4)
    visible = uncovered([o.mask for o, _ in boxed], boxes, _CELL)
    shown = [(o, box, v) for (o, box), v in zip(boxed, visible, strict=True) if v]
    return [
        MergedDetection(
            k,
            o.prompt,
            o.score,
            (float(x0), float(y0), float(x1), float(y1)),
            v.area,
            len(o.tiles),
            v,
            tuple(sorted(o.folded - {o.prompt})),
        )
        for k, (o, (x0, y0, x1, y1), v) in enumerate(shown, start=1)
    ]


def _boxes_meet(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
