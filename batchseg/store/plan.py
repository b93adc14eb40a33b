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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..records import Item, Status
from .tables import DONE_STATUSES, PENDING, RUNNING

__all__ = ["Plan", "Planner", "PLAN_COUNTS"]

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


class Planner:
    """Sorts discovered items against the known rows (path text -> (size, mtime, hash, status,
    mask path text, prior status)); ``mask_exists`` answers for a stored mask path."""

    def __init__(
        self, known: dict[str, tuple[Any, ...]], mask_exists: Callable[[str], bool], use_hash: bool
    ) -> None:
        self.known = known
        self.mask_exists = mask_exists
        self.use_hash = use_hash
        self.pending: list[Item] = []
        self.new: list[Item] = []
        self.changed: list[Item] = []
        self.touch: list[Item] = []
        self.reopen: list[str] = []
        self.restore: list[tuple[str, str]] = []
        self.missing: list[str] = []
        self.counts = dict.fromkeys(PLAN_COUNTS, 0)

    def add(self, item: Item, key: str) -> None:
        """Sort ``item``, stored under the path text ``key``."""
        row = self.known.pop(key, None)
        if row is None:
            self._pend(item, "new", self.new)
            return
        size, mtime, digest, status, mask_path, prior = row
        if self._changed(item, size, mtime, digest):
            self._pend(item, "changed", self.changed)
            return
        if mtime != item.mtime_ns or (item.content_hash is not None and digest != item.content_hash):
            self.touch.append(item)  # same content by hash: keep the new mtime and hash
        restored = status == _MISSING
        if restored:
            status = prior if prior is not None else PENDING
        mask_gone = status == _OK and mask_path is not None and not self.mask_exists(mask_path)
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

    def finish(self) -> None:
        self.missing = [path for path, row in self.known.items() if row[3] != _MISSING]
        self.counts["missing"] = len(self.missing)
        self.counts["pending"] = len(self.pending)

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
