"""The way back after a batch of images fails: the out-of-memory ladder, one rung at a time.

1. halve the batch: CUDA ran out of memory on several images together. The smaller size is kept
   for good (and the CUDA graph captured again at it); the images go again at that size.
2. one by one: any other failure of several images, so one bad image fails alone.
3. post-process on the CPU: one image alone ran out of GPU memory; the forward pass stays on the
   GPU, the masks are upsampled and painted on the CPU.
4. give up: that image's ``error`` names what to try.

A failure is only noted in its ``except`` block; the next rung starts after it, once the failed
attempt's GPU memory is free (a live exception's traceback keeps its tensors).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from PIL import Image

from ...records import ItemResult
from .postprocess import ImageSegmentation

__all__ = ["Failure", "FailFn", "OutOfMemoryLadder", "Outcome"]

#: An image's segmentation, or the result that says why it has none.
Outcome = ImageSegmentation | ItemResult
#: ``fail(position, exc, message=None)``: the ``error`` result of the image at ``position``.
FailFn = Callable[[int, BaseException, "str | None"], ItemResult]


class Failure(enum.Enum):
    """How an attempt on a batch of images failed."""

    OUT_OF_MEMORY = "out of memory"
    ERROR = "error"


class _Segmenter(Protocol):
    def segment(
        self, images: Sequence[Image.Image], post_on_cpu: bool = False
    ) -> list[ImageSegmentation]: ...

    def release_memory(self) -> None: ...


class _Resizable(Protocol):
    batch: int


class OutOfMemoryLadder:
    """The engine's batch size and the rungs it steps down after a failure (module docstring).

    ``images`` below map a position in the task to its image, in order."""

    def __init__(self, engine: _Segmenter, batch: int, backbone: _Resizable | None = None) -> None:
        self.engine = engine
        self.batch = batch
        self.backbone = backbone

    def halve(self, tried: int) -> None:
        """Rung 1: CUDA ran out of memory on ``tried`` images: halve, and keep the smaller size
        from now on. A sub-batch made before an earlier halving (larger than ``batch``) changes
        nothing."""
        if tried > self.batch:
            return
        self.batch = max(1, tried // 2)
        if self.backbone is not None:
            self.backbone.batch = self.batch  # compiled and captured again at the new size
        warnings.warn(
            f"out of GPU memory at batch {tried}; continuing with batch {self.batch}",
            RuntimeWarning,
            stacklevel=2,
        )

    def recover(
        self, images: Mapping[int, Image.Image], failure: Failure, fail: FailFn
    ) -> dict[int, Outcome]:
        """``images`` failed together with ``failure``: again, from the rung that fits."""
        if failure is Failure.OUT_OF_MEMORY and len(images) > 1:
            self.halve(len(images))
            return self._in_batches(images, self.batch, fail)
        return self.one_by_one(images, fail)

    def one_by_one(self, images: Mapping[int, Image.Image], fail: FailFn) -> dict[int, Outcome]:
        """Rung 2: each image alone, so that only the image that breaks fails."""
        return self._in_batches(images, 1, fail)

    def _in_batches(self, images: Mapping[int, Image.Image], size: int, fail: FailFn) -> dict[int, Outcome]:
        """``size`` images at a time, each batch done before the next; a batch that fails goes
        down the ladder on its own."""
        outcomes: dict[int, Outcome] = {}
        positions = list(images)
        for start in range(0, len(positions), size):
            part = {i: images[i] for i in positions[start : start + size]}
            if len(part) == 1:
                [(position, image)] = part.items()
                outcomes[position] = self._alone(position, image, fail)
                continue
            segs, failure = self._attempt(list(part.values()))
            if failure is None:
                outcomes.update(zip(part, segs, strict=True))
            else:
                outcomes.update(self.recover(part, failure, fail))
        return outcomes

    def _alone(self, position: int, image: Image.Image, fail: FailFn) -> Outcome:
        """An image alone: its segmentation, its own error, or rung 3 after out of memory."""
        try:
            return self._segment([image])[0]
        except torch.cuda.OutOfMemoryError:
            pass  # rung 3 comes after this block, once the failed attempt's memory is free
        except Exception as exc:  # noqa: BLE001 - the image's own error
            return fail(position, exc, None)
        self.engine.release_memory()
        return self._on_cpu(position, image, fail)

    def _on_cpu(self, position: int, image: Image.Image, fail: FailFn) -> Outcome:
        """Rung 3, then 4: the masks upsampled and painted on the CPU, else a clear error."""
        try:
            return self._segment([image], post_on_cpu=True)[0]
        except torch.cuda.OutOfMemoryError as exc:
            return fail(
                position,
                exc,
                f"out of GPU memory even alone and with post-processing on the CPU ({image.width}x"
                f"{image.height}); try --dtype float16, a lower --max-detections, or --device cpu",
            )
        except Exception as exc:  # noqa: BLE001
            return fail(position, exc, None)

    def _attempt(self, images: list[Image.Image]) -> tuple[list[ImageSegmentation], Failure | None]:
        """Segment ``images`` together: their segmentations, or how it failed (noted only)."""
        try:
            return self._segment(images), None
        except torch.cuda.OutOfMemoryError:
            return [], Failure.OUT_OF_MEMORY
        except Exception:  # noqa: BLE001 - the next rung finds the image that breaks
            return [], Failure.ERROR

    def _segment(self, images: Sequence[Image.Image], post_on_cpu: bool = False) -> list[ImageSegmentation]:
        try:
            return self.engine.segment(images, post_on_cpu=post_on_cpu)
        except BaseException:
            self.engine.release_memory()
            raise
