"""The resume plan: the discovered images against the stored rows, sorted into what is left to do.

* an image is *done* when its row is final (``ok``, ``error``, ``timeout``, ``crashed``,
  ``invalid_input``) for the same size and mtime (content hash with ``--hash``) and, for ``ok``, its
  mask file is in place. Failed images are done: a plain resume does not redo them, ``batchseg retry``
  does;
* a new or changed input is pending; ``running`` rows left by a crash are pending again;
* a row whose file is no longer discovered becomes ``missing`` (its outputs stay in place); if the file
  comes back unchanged, its earlier status is restored.

Pure decisions: :meth:`Checkpoint.plan <batchseg.store.checkpoint.Checkpoint.plan>` reads the rows,
runs a :class:`Planner` and writes its outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..records import Item, Status
from .tables import DONE_STATUSES, PENDING, RUNNING

__all__ = ["Plan", "Planner", "PLAN_COUNTS", "Row"]

_OK = Status.OK.value
_MISSING = Status.MISSING.value

#: Keys of Plan.counts.
PLAN_COUNTS = (
    "done",
    "failed",
    "new",
    "changed",
    "resumed",
    "in_flight_reset",
    "mask_missing",
    "restored",
    "missing",
    "pending",
    "orphan_masks",
)


@dataclass
class Plan:
    """What a run has left to do. ``pending`` keeps the input order.

    ``counts`` keys: ``done`` (final, unchanged, files in place; includes ``failed``), ``failed``,
    ``new``, ``changed``, ``resumed`` (discovered earlier, never finished), ``in_flight_reset``
    (``running`` at a crash), ``mask_missing`` (``ok`` but its mask file is gone), ``restored``
    (missing earlier, back unchanged), ``missing`` (rows whose file is no longer discovered; outputs
    left in place), ``pending`` (= len(pending)), ``orphan_masks`` (mask files no row names, removed).
    """

    pending: list[Item]
    counts: dict[str, int] = field(default_factory=dict)


#: A stored row as the planner reads it: (size, mtime, hash, status, whether the mask file the row
#: names is gone, prior status).
Row = tuple[Any, ...]


class Planner:
    """Sorts discovered items against the stored rows (``match``)."""

    def __init__(self, use_hash: bool) -> None:
        self.use_hash = use_hash
        self.pending: list[Item] = []
        self.new: list[Item] = []
        self.changed: list[Item] = []
        self.touch: list[Item] = []
        self.reopen: list[str] = []
        self.restore: list[tuple[str, str]] = []
        self.missing: list[str] = []
        self.counts = dict.fromkeys(PLAN_COUNTS, 0)

    def match(
        self, items: list[Item], keys: list[str], rows: Iterator[tuple[str, Row]], ordered: bool
    ) -> None:
        """Sort every item (stored under the path text ``keys[i]``) against ``rows`` (path text,
        row). ``ordered``: the keys ascend strictly and ``rows`` come in the same order (SQLite's
        ``ORDER BY path`` is code point order for UTF-8 text), so one merge pass pairs them and no
        row is held (a million rows: the memory of none); otherwise the rows are looked up by path."""
        if not ordered:
            known = dict(rows)
            for item, key in zip(items, keys, strict=True):
                self.add(item, key, known.pop(key, None))
            for key, row in known.items():
                self.vanished(key, row)
        else:
            stored = next(rows, None)
            for item, key in zip(items, keys, strict=True):
                while stored is not None and stored[0] < key:
                    self.vanished(*stored)
                    stored = next(rows, None)
                if stored is not None and stored[0] == key:
                    self.add(item, key, stored[1])
                    stored = next(rows, None)
                else:
                    self.add(item, key, None)
            while stored is not None:
                self.vanished(*stored)
                stored = next(rows, None)
        self.counts["missing"] = len(self.missing)
        self.counts["pending"] = len(self.pending)

    def add(self, item: Item, key: str, row: Row | None) -> None:
        """Sort ``item``, stored under the path text ``key`` in ``row`` (None: no row)."""
        if row is None:
            self._pend(item, "new", self.new)
            return
        size, mtime, digest, status, mask_gone, prior = row
        if self._changed(item, size, mtime, digest):
            self._pend(item, "changed", self.changed)
            return
        if mtime != item.mtime_ns or (item.content_hash is not None and digest != item.content_hash):
            self.touch.append(item)  # same content by hash: keep the new mtime and hash
        restored = status == _MISSING
        if restored:
            status = prior if prior is not None else PENDING
        mask_gone = mask_gone and status == _OK
        if status in DONE_STATUSES and not mask_gone:
            self.counts["done"] += 1
            self.counts["failed"] += status != _OK
            if restored:
                self.counts["restored"] += 1
                self.restore.append((key, status))
            return
        if status in DONE_STATUSES:
            reason = "mask_missing"
        elif status == RUNNING:
            reason = "in_flight_reset"
        else:
            reason = "resumed"
        self.counts[reason] += 1
        self.pending.append(item)
        if status != PENDING or restored:
            self.reopen.append(key)

    def vanished(self, key: str, row: Row) -> None:
        """A stored row whose file was not discovered: ``missing`` (unless it is already)."""
        if row[3] != _MISSING:
            self.missing.append(key)

    def _pend(self, item: Item, reason: str, bucket: list[Item]) -> None:
        self.counts[reason] += 1
        bucket.append(item)
        self.pending.append(item)

    def _changed(self, item: Item, size: int, mtime: int, digest: str | None) -> bool:
        if size != item.size_bytes:
            return True
        if self.use_hash and digest is not None and item.content_hash is not None:
            # With --hash the content decides: a copied folder with new mtimes is not redone.
            return bool(digest != item.content_hash)
        return bool(mtime != item.mtime_ns)
