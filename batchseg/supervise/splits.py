"""Split items: parts spread over every worker, then one join.

With several workers, a worker may answer an item with its parts (``ItemResult.split``) instead of
running them itself; tiling does this for a big image (the parts are its tiles). The ledger then
queues one item per part (``Item.part`` naming it, the item's window its region) in front of the
fresh work, so every worker takes a share; a part's result holds no detections (the worker keeps
what it needs). When the last part is in, the item goes out once more as its join (``Part`` with
no key): the worker that takes it makes the item's one result. A part is retried alone like any
item (``max_attempts``, each time on another worker); a part that fails for good fails its item,
and the message names the part. The pool learns nothing about what a part is. Parent side,
torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..records import Item, ItemResult, Part, Split, Status, part_failure

__all__ = ["SplitItems"]


@dataclass
class _Split:
    item: Item  # the whole item's
    split: Split
    pending: set[str]
    started: float


class SplitItems:
    """The items whose parts are out as items, until each is joined or failed."""

    def __init__(self) -> None:
        self._items: dict[str, _Split] = {}

    def split(self, item: Item, split: Split, started: float) -> list[Item]:
        """One item per part still to run of ``item``, split at ``started``."""
        self._items[item.path] = _Split(item, split, {key for key, _ in split.parts}, started)
        return [
            replace(item, window=window, part=Part(split.plan, key, split.noun))
            for key, window in split.parts
        ]

    def dropped(self, item: Item) -> bool:
        """A part of an item that already failed (by another part): not worth running."""
        part = item.part
        return part is not None and part.key is not None and item.path not in self._items

    def settle_part(self, part_item: Item, result: ItemResult) -> Item | ItemResult | None:
        """A part's final result: the item's join after its last part, the item's failure when
        the part failed, None while parts are still out (or for a part of a failed item)."""
        part = part_item.part
        whole = self._items.get(part_item.path)
        if whole is None or part is None or part.key is None:
            return None
        if result.status is not Status.OK:
            del self._items[part_item.path]
            window = part_item.window or (0, 0, 0, 0)
            failed = part_failure(whole.item, part.noun, part.key, window, result, whole.started)
            failed.attempts = result.attempts
            return failed
        whole.pending.discard(part.key)
        if whole.pending:
            return None
        del self._items[part_item.path]
        return replace(whole.item, part=Part(whole.split.plan, None, whole.split.noun))
