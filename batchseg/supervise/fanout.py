"""Tiles as units of work: a big image's tiles spread over every worker, then one merge.

With several workers, a worker that plans a whole image as tiles answers with the tiles still to
run (``ItemResult.fan_out``) instead of running them itself. The ledger then queues one item per
tile (a window of the image, ``Item.tiling`` naming the tile) in front of the fresh work, so every
worker takes a share; each worker keeps the tiles it finished on disk (``tiles.progress``) and
answers with a result that holds no detections. When the image's last tile is in, the image goes
out once more as a merge (``TileJob`` with no tile): the worker that takes it reads the kept tiles,
runs any that are missing, merges them and writes the label map, and that is the image's one
result. A tile is retried alone like any item (``max_attempts``, each time on another worker); a
tile that fails for good fails its image, and the message names the tile. Parent side, torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..records import FailureCategory, FanOut, Item, ItemResult, Status, TileJob, failure_result

__all__ = ["TiledImages", "tile_failure"]


@dataclass
class _Image:
    item: Item  # the whole image's
    plan: tuple[int, int, int, int]
    pending: set[str]
    started: float


class TiledImages:
    """The images whose tiles are out as items, until each is merged or failed."""

    def __init__(self) -> None:
        self._images: dict[str, _Image] = {}

    def split(self, item: Item, fan: FanOut, started: float) -> list[Item]:
        """One item per tile still to run for the image ``item``, planned at ``started``."""
        self._images[item.path] = _Image(item, fan.plan, {tile for tile, _ in fan.todo}, started)
        return [replace(item, window=window, tiling=TileJob(fan.plan, tile)) for tile, window in fan.todo]

    def dropped(self, item: Item) -> bool:
        """A tile of an image that already failed (by another tile): not worth running."""
        tiling = item.tiling
        return tiling is not None and tiling.tile is not None and item.path not in self._images

    def settle_tile(self, tile: Item, result: ItemResult) -> Item | ItemResult | None:
        """A tile's final result: the image's merge item after its last tile, the image's failure
        when the tile failed, None while tiles are still out (or for a tile of a failed image)."""
        tiling = tile.tiling
        image = self._images.get(tile.path)
        if image is None or tiling is None or tiling.tile is None:
            return None
        if result.status is not Status.OK:
            del self._images[tile.path]
            failed = tile_failure(image.item, tiling.tile, tile.window or (0, 0, 0, 0), result, image.started)
            failed.attempts = result.attempts
            return failed
        image.pending.discard(tiling.tile)
        if image.pending:
            return None
        del self._images[tile.path]
        return replace(image.item, tiling=TileJob(image.plan))


def tile_failure(
    item: Item, tile_id: str, window: tuple[int, int, int, int], result: ItemResult, started: float
) -> ItemResult:
    """The image's failure from its failing tile: the tile's status, category and error, the
    message naming the tile and its window."""
    x0, y0, x1, y1 = window
    where = f"tile {tile_id} (window x {x0}-{x1}, y {y0}-{y1})"
    failed = failure_result(
        item,
        result.status,
        error_type=result.error_type or result.status.value,
        message=f"{where}: {result.error_message or result.status.value}",
        category=result.category or FailureCategory.IMAGE,
        exit_code=result.exit_code,
        device=result.device,
        started_at=started,
    )
    failed.traceback = result.traceback
    failed.worker_pid = result.worker_pid
    return failed
