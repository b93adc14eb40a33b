"""The SAM3 engine: the per-image work a worker process does, free of any pool specifics.

``load_engine(spec, slot)`` is the factory a worker calls once (``EngineSpec.factory``). The engine
loads the model, encodes every prompt's text once, then for each batch of images:

    read (imageio) -> encode images (processor on the original image, vision features once)
    -> decode every prompt on those features -> post-process (score filter, top-k, bounded-memory
    masks, one label map) -> write the label map, RLE per detection -> ItemResult

Each step is a small method so a tiling loop (many crops of one image) or another backend can reuse
them. Per-image problems come back as results: ``invalid_input`` for unreadable images, ``error``
with the traceback for anything else; an unwritable output folder is reported as ``OutputError``.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import imageio, rle
from .config import RunConfig
from .engine import EngineSpec
from .errors import ConfigError, InvalidImageError, OutputError
from .model import load_model, max_prompt_tokens, resolve_device, resolve_dtype, set_threads
from .postprocess import Candidates, ImageSegmentation, compose, merge, select, split_outputs
from .records import Detection, Item, ItemResult, Status

__all__ = ["EncodedImages", "PromptText", "Sam3Engine", "load_engine", "pick_device"]


def load_engine(spec: EngineSpec, slot: int) -> Sam3Engine:
    """Factory called once per worker: model on its device, prompts encoded, ready to process."""
    config = spec.config
    set_threads(config.threads)
    device = pick_device(config.device, slot)
    dtype, reason = resolve_dtype(device, config.dtype)
    model, processor = load_model(config.model, device, dtype)
    return Sam3Engine(model, processor, config, device, dtype, reason)


def pick_device(device: str, slot: int) -> str:
    """The torch device of worker ``slot``: an unindexed ``cuda`` spreads workers over the GPUs."""
    resolved = resolve_device(device)
    if resolved == "cuda":
        return f"cuda:{slot % torch.cuda.device_count()}"
    return resolved


@dataclass
class PromptText:
    """One prompt's text features, computed once per worker and reused for every image."""

    prompt: str
    features: torch.Tensor  # (1, tokens, hidden): the text encoder output after projection
    attention_mask: torch.Tensor  # (1, tokens)


@dataclass
class EncodedImages:
    """Vision features of a batch of images, with each image's original (height, width)."""

    vision: Any  # Sam3VisionEncoderOutput
    sizes: list[tuple[int, int]]


class Sam3Engine:
    """SAM3 loaded once; ``process`` turns items into results (see the module docstring)."""

    def __init__(
        self, model: Any, processor: Any, config: RunConfig, device: str, dtype: str, dtype_reason: str
    ) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.torch_device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.dtype_reason = dtype_reason
        self.device = _describe_device(device, dtype)
        self.input_root = Path(config.input)
        self.output_dir = Path(config.output_dir)
        self.prompts = self.encode_prompts(config.prompts)

    # --- the steps ---------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptText]:
        """Text features of each prompt, one prompt at a time so every prompt's features are the
        same whatever else is asked for. Too long a prompt raises ConfigError before any image."""
        limit = max_prompt_tokens(self.model)
        encoded = []
        for prompt in prompts:
            tokens = self.processor(text=prompt, return_tensors="pt")
            n_tokens = int(tokens["attention_mask"].sum())
            if tokens["input_ids"].shape[-1] > limit:
                raise ConfigError(f"prompt {prompt!r} is {n_tokens} tokens long (start and end tokens "
                                  f"included) but the model reads at most {limit}: shorten it")
            input_ids = tokens["input_ids"].to(self.torch_device)
            mask = tokens["attention_mask"].to(self.torch_device)
            with torch.inference_mode():
                text = self.model.get_text_features(input_ids=input_ids, attention_mask=mask)
            features = text.pooler_output
            encoded.append(PromptText(prompt, features, mask))
        return encoded

    def encode_images(self, images: Sequence[Image.Image]) -> EncodedImages:
        """Vision features of the images, each resized by the processor from its original size."""
        # On a GPU the processor's resize runs there too: a large image is resized in a
        # millisecond instead of tens on the CPU that also feeds the next image.
        options = {"device": self.torch_device} if self.torch_device.type == "cuda" else {}
        batch = self.processor(images=list(images), return_tensors="pt", **options)
        sizes = [(int(h), int(w)) for h, w in batch["original_sizes"].tolist()]
        if sizes != _sizes(images):
            raise RuntimeError(f"the processor saw sizes {sizes}, the images are {_sizes(images)}")
        pixels = batch["pixel_values"].to(self.torch_device, self.dtype)
        with torch.inference_mode():
            vision = self.model.get_vision_features(pixel_values=pixels)
        return EncodedImages(vision, sizes)

    def decode_prompts(self, encoded: EncodedImages) -> list[list[Candidates]]:
        """Every prompt on the shared vision features; per image, per prompt, the kept candidates
        (score filter and top-k done, so only their low-resolution masks stay in memory)."""
        config = self.config
        batch = len(encoded.sizes)
        per_image: list[list[Candidates]] = [[] for _ in range(batch)]
        for index, text in enumerate(self.prompts):
            with torch.inference_mode():
                outputs = self.model(
                    vision_embeds=encoded.vision,
                    text_embeds=_TextEmbeds(text.features.expand(batch, -1, -1)),
                    attention_mask=text.attention_mask.expand(batch, -1),
                )
            for b, pred in enumerate(split_outputs(outputs, index)):
                height, width = encoded.sizes[b]
                per_image[b].append(select(pred, height, width, config.threshold, config.max_detections))
            del outputs
        return per_image

    def postprocess(self, parts: Sequence[Candidates], size: tuple[int, int]) -> ImageSegmentation:
        """One image's candidates of every prompt -> its label map, detections in label order."""
        return compose(merge(parts), size[0], size[1], self.config.mask_threshold)

    def segment(self, images: Sequence[Image.Image]) -> list[ImageSegmentation]:
        """Encode, decode every prompt, post-process: the whole model side for a batch of images."""
        encoded = self.encode_images(images)
        parts = self.decode_prompts(encoded)
        sizes = encoded.sizes
        del encoded  # the vision features are the largest tensors: free them before upsampling
        return [self.postprocess(p, size) for p, size in zip(parts, sizes, strict=True)]

    def write(self, item: Item, seg: ImageSegmentation) -> tuple[str, list[Detection]]:
        """Save the label map atomically and describe each detection (RLE, area, box, score)."""
        mask_rel = imageio.mask_relpath(item.path)
        target = imageio.safe_output_path(self.output_dir, mask_rel)
        try:
            imageio.save_label_map(target, seg.labels)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
        counts = rle.encode_labels(seg.labels, n_labels=len(seg.instances))
        detections = [
            Detection(
                prompt=self.prompts[inst.prompt_index].prompt,
                index=k,
                score=inst.score,
                box=inst.box,
                area_px=int(seg.areas[k - 1]),
                mask_rle=counts[k],
            )
            for k, inst in enumerate(seg.instances, start=1)
        ]
        return mask_rel, detections

    # --- the Engine protocol -----------------------------------------------------------------

    def process(self, items: Sequence[Item]) -> list[ItemResult]:
        """One result per item, in order. Readable images go through the model together."""
        started = time.time()
        results: dict[int, ItemResult] = {}
        images: dict[int, Image.Image] = {}
        for i, item in enumerate(items):
            try:
                images[i] = imageio.read_image(self.input_root / item.path, self.config.max_pixels)
            except InvalidImageError as exc:
                results[i] = self._failure(item, exc, started, Status.INVALID_INPUT)
            except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
                results[i] = self._failure(item, exc, started)
        if images:
            results.update(self._run_images([items[i] for i in images], list(images.values()), started,
                                            list(images)))
        return [results[i] for i in range(len(items))]

    def _run_images(
        self, items: Sequence[Item], images: Sequence[Image.Image], started: float, positions: Sequence[int]
    ) -> dict[int, ItemResult]:
        try:
            segs = self.segment(images)
        except Exception as exc:  # noqa: BLE001 - see below
            if len(images) == 1:
                self._release_memory()
                return {positions[0]: self._failure(items[0], exc, started)}
            # One bad image (or memory) failing a whole batch: try each image alone.
            self._release_memory()
            out: dict[int, ItemResult] = {}
            for item, image, pos in zip(items, images, positions, strict=True):
                out.update(self._run_images([item], [image], started, [pos]))
            return out
        out = {}
        for item, image, seg, pos in zip(items, images, segs, positions, strict=True):
            out[pos] = self._finish(item, image, seg, started)
        return out

    def _finish(self, item: Item, image: Image.Image, seg: ImageSegmentation, started: float) -> ItemResult:
        try:
            mask_rel, detections = self.write(item, seg)
        except Exception as exc:  # noqa: BLE001 - OutputError included: the runner decides if it is fatal
            return self._failure(item, exc, started)
        return ItemResult(
            path=item.path,
            status=Status.OK,
            width=image.width,
            height=image.height,
            detections=detections,
            mask_path=mask_rel,
            started_at=started,
            finished_at=time.time(),
            worker_pid=os.getpid(),
            device=self.device,
        )

    def _failure(
        self, item: Item, exc: BaseException, started: float, status: Status = Status.ERROR
    ) -> ItemResult:
        return ItemResult(
            path=item.path,
            status=status,
            error_type=type(exc).__name__,
            error_message=str(exc) or repr(exc),
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            started_at=started,
            finished_at=time.time(),
            worker_pid=os.getpid(),
            device=self.device,
        )

    def _release_memory(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the model; on CUDA hand the cached memory back."""
        self.model = None
        self.prompts = []
        self._release_memory()


class _TextEmbeds:
    """What ``Sam3Model.forward(text_embeds=...)`` reads: an object with ``pooler_output``."""

    def __init__(self, pooler_output: torch.Tensor) -> None:
        self.pooler_output = pooler_output


def _sizes(images: Sequence[Image.Image]) -> list[tuple[int, int]]:
    return [(image.height, image.width) for image in images]


def _describe_device(device: str, dtype: str) -> str:
    if device.startswith("cuda"):
        return f"{device} {torch.cuda.get_device_name(device)} {dtype}"
    return f"{device} {dtype}"

