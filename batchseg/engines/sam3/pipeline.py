"""The SAM3 engine's per-image work: read, encode, decode every prompt, post-process.

    read (imageio) -> encode images (processor on the original image, vision features once)
    -> decode every prompt on those features -> post-process (score filter, top-k, bounded-memory
    masks, one label map) -> the image's instances (``contract.Segmentation``), which the worker's
    writer writes in this engine's I/O threads (label map, RLE per detection, ItemResult)

Each step is a method of ``Sam3Engine`` so a tiling loop (many crops of one image) or another
backend can reuse them; ``task.Task`` runs them as a pipeline, ``ladder.OutOfMemoryLadder`` after a
failure. Per-image problems come back as results: ``invalid_input`` for unreadable images,
``error`` with the traceback for anything else; whose failure a write is, the writer decides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ... import imageio
from ...config import RunConfig
from ...errors import ConfigError
from ...exemplars import load_exemplars, run_prompts
from ...prompting import EXEMPLAR_PROMPT, threshold_of
from ...records import Item, ItemResult, Status, failure_result
from ...values import show
from ...worker.contract import Capabilities, HeartbeatFn, Instance, Outcome, Segmentation
from ...worker.reading import VALID_KEY, ImageReader, georef_of, valid_of
from .exemplar_boxes import EXEMPLARS_KEY, VISUAL_TEXT, Placer, forward_prompt, nothing_scored
from .features import EncodedImages, PromptText, TextEmbeds
from .gpu_jpeg import load_in_background
from .ladder import OutOfMemoryLadder
from .model import max_prompt_tokens, resolve_device
from .postprocess import (
    Candidates,
    ImageSegmentation,
    Scored,
    choose,
    compose,
    compose_many,
    fold,
    merge,
    score_outputs,
)
from .sizing import batch_for_free_memory, task_size
from .speedups import priority_stream, release_text_tower, speed_up, warm_sizes
from .task import Task, WriteFn

__all__ = ["Sam3Engine", "pick_device", "plan_gpu_use"]

#: ``image.info`` key of a window's image: (width, height) of the whole upright image.
WHOLE_SIZE = "batchseg_whole_size"

#: Threads reading images and writing masks beside the forward pass (PIL and zlib release the GIL).
IO_THREADS = int(os.environ.get("BATCHSEG_IO_THREADS", 0)) or max(1, min(8, (os.cpu_count() or 2) // 2))


#: Seconds the engine's load waits for nvJPEG's (about 1 s) before the backbone's capture.
NVJPEG_WAIT_S = 30.0

#: ``0`` runs a short sub-batch at its own size the first time its size comes too (see
#: ``Sam3Engine.pad_rows``): a benchmark's comparison.
PAD_SHORT = os.environ.get("BATCHSEG_PAD_SHORT", "1") != "0"


def plan_gpu_use(device: torch.device) -> int:
    """Images per forward pass that the free memory of ``device`` allows (``sizing``)."""
    free, _total = torch.cuda.mem_get_info(device)
    return batch_for_free_memory(free)


def pick_device(device: str, slot: int) -> str:
    """The torch device of worker ``slot``: an unindexed ``cuda`` spreads workers over the GPUs."""
    resolved = resolve_device(device)
    if resolved == "cuda":
        return f"cuda:{slot % torch.cuda.device_count()}"
    return resolved


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
        # On a GPU a big JPEG cut into tiles is decoded there by nvJPEG (``gpu_jpeg``), which loads
        # (about 1 s) while the prompts are encoded and the speed-ups applied; until then, Pillow.
        jpeg, loading = load_in_background(self.torch_device, (config.tile or "auto") != "off")
        # --prompt, then the prompts the exemplar boxes add (those run only where they have boxes).
        self.exemplars = load_exemplars(config)
        names = run_prompts(config, self.exemplars)
        self.prompts = self.encode_prompts(names)
        release_text_tower(model, self.torch_device)  # the features above are all it gives
        self.boxes_only = [name not in config.prompts for name in names]
        self.placer = (
            Placer(self.exemplars, names, config.prompts, Path(config.input)) if self.exemplars else None
        )
        cuda = self.torch_device.type == "cuda"
        # Images per forward pass: --batch-size, else 1 on CPU (a batch of 2 was slower than two
        # singles there) and what free memory allows on a GPU; halved for good after CUDA OOM.
        batch = config.batch_size or (plan_gpu_use(self.torch_device) if cuda else 1)
        self._backbone, self.fused_rope = speed_up(
            model,
            self.torch_device,
            batch,
            compile=config.compile,
            cuda_graphs=config.cuda_graphs,
            fuse=config.fuse_rope,
            gelu=config.fuse_gelu,
        )
        self._pinned_pixels: dict[int, torch.Tensor] = {}  # uint8 pixels ``read`` left in pinned memory
        # On a GPU the vision encoder runs on the current stream, the prompts' decoders and the
        # post-processing on streams of their own: the decoders hold a blocking copy (a host wait
        # for their stream) and post-processing waits for its results, and neither may leave the
        # device without queued work (see ``task.Task``).
        self._decode_stream = priority_stream(self.torch_device) if cuda else None
        # Decode sub-batch k-1 after queuing sub-batch k's encoder (see ``task.Task``). A CPU has no
        # queue to keep full, so there each sub-batch is decoded at once: one in memory, not two.
        self.overlap = cuda
        self._post_stream = priority_stream(self.torch_device) if cuda else None
        self.ladder = OutOfMemoryLadder(self, batch, self._backbone)
        # Short sub-batch sizes a task has run (``pad_rows``); padding only where the backbone is
        # captured or compiled at the full batch (a GPU).
        self.pad_short = PAD_SHORT and self._backbone is not None
        self._short_sizes: set[int] = set()
        if loading is not None:
            # No CUDA work of another thread while the backbone is captured; a load that hangs
            # (a driver's fault) holds the worker's load up for at most NVJPEG_WAIT_S, and its
            # JPEGs are Pillow's meanwhile.
            loading.join(NVJPEG_WAIT_S)
        if self._backbone is not None:
            # Compile and capture during the load (its own timeout), not in the first image's.
            self.warm_up()
        size = self.processor.image_processor.size
        self.capabilities = Capabilities(
            device=self.device,
            task_size=task_size(self.max_batch, cuda),
            heartbeat_every=self.max_batch,  # a heartbeat after each sub-batch
            gpu_count=torch.cuda.device_count() if cuda else 0,
            model_input=max(int(size["height"]), int(size["width"])),  # 1008 for SAM3
        )
        # Read by the worker until it reads ``capabilities``.
        self.preferred_task_size = self.capabilities.task_size
        self.heartbeat_every = self.capabilities.heartbeat_every
        # A JPEG may be decoded at 1/2 to 1/8 scale while it stays twice the model's input side
        # (within 3 grey levels after the processor's resize: tests/test_segment.py checks it).
        self.draft_side = 2 * max(
            self.processor.image_processor.size["height"], self.processor.image_processor.size["width"]
        )
        self.io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="batchseg-io")
        # Pixels in: whole images and windows (a tiled image stays open while its windows are read).
        self.reader = ImageReader(config, jpeg)

    @property
    def max_batch(self) -> int:
        """Images per forward pass now (the ladder halves it after CUDA out-of-memory)."""
        return self.ladder.batch

    # --- the Engine contract ------------------------------------------------------------------

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn) -> list[Outcome]:
        """One outcome per item, in order, as a pipeline (``task.Task``)."""
        if all(item.window is None for item in items):
            self.reader.close()  # a tiled image is done: its pixels are not kept while others run
        return Task(self, items, heartbeat).run()

    def prefetch(self, item: Item) -> None:
        """The image of ``item`` comes next as tiles: open (decode) it while the current one runs."""
        self.reader.prefetch(item)

    def close(self) -> None:
        """Drop the model; on CUDA hand the cached memory back."""
        self.io.shutdown(wait=True)
        self.reader.close()
        self.model = None
        self.prompts = []
        self.release_memory()

    # --- the steps ----------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptText]:
        """Text features of each prompt, one prompt at a time so every prompt's features are the
        same whatever else is asked for. Too long a prompt raises ConfigError before any image."""
        limit = max_prompt_tokens(self.model)
        encoded = []
        for prompt in prompts:
            # Boxes alone (no --prompt): the processor's own text for a visual prompt.
            alone = prompt == EXEMPLAR_PROMPT and not self.config.prompts
            tokens = self.processor(text=VISUAL_TEXT if alone else prompt, return_tensors="pt")
            n_tokens = int(tokens["attention_mask"].sum())
            if tokens["input_ids"].shape[-1] > limit:
                raise ConfigError(
                    f"prompt {show(prompt)} is {n_tokens} tokens long (start and end tokens "
                    f"included) but the model reads at most {limit}: shorten it"
                )
            input_ids = tokens["input_ids"].to(self.torch_device)
            mask = tokens["attention_mask"].to(self.torch_device)
            with torch.inference_mode():
                text = self.model.get_text_features(input_ids=input_ids, attention_mask=mask)
            features = text.pooler_output
            encoded.append(PromptText(prompt, features, mask))
        return encoded

    def read(self, item: Item) -> Image.Image | ItemResult:
        """An item's image (on a GPU its pixels also pinned for the copy), or its failure result.
        A window's image carries the whole image's size (``info[WHOLE_SIZE]``) and its nodata."""
        picture = self.reader.read(item, draft_side=self.draft_side)  # windows: never draft-decoded
        if isinstance(picture, ItemResult):
            return picture
        image = picture.image
        try:
            if picture.size is not None:
                image.info[WHOLE_SIZE] = picture.size
            if picture.valid is not None:  # nodata: cleared from its masks by the writer
                image.info[VALID_KEY] = picture.valid
            if self.placer is not None:  # the image's exemplar boxes, in its own pixels
                image.info[EXEMPLARS_KEY] = self.placer.boxes(item, image, image.info.get(WHOLE_SIZE))
            if self.torch_device.type == "cuda":
                self._pinned_pixels[id(image)] = self._pinned(image)
            return image
        except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
            return self.failure(item, exc, picture.started_at)

    def pad_rows(self, n: int) -> int:
        """Rows to add to a task's sub-batch of ``n`` images: up to the full batch the first time a
        short size comes, none after. A short size's first run would capture the backbone's graph
        for it and make cuDNN's attention plans for the decoders at that size: 1.2 s of the host's
        time for the 9 last tiles of a 10000x10000 JPEG on an H100 (``benchmarks/trace_engine.py
        --cold``), against about 0.12 s of the device's for 7 padding rows. An image's last tiles
        or a run's last images come once; a size that comes again is worth its graph."""
        full = self.max_batch  # the backbone's batch too (the ladder halves both)
        if not self.pad_short or n >= full or n in self._short_sizes:
            return 0
        self._short_sizes.add(n)
        return full - n

    def encode_images(self, images: Sequence[Image.Image], pad: int = 0) -> EncodedImages:
        """Vision features of the images, each resized by the processor from its original size;
        ``pad`` rows repeat the last image (``pad_rows``)."""
        # On a GPU the processor's resize runs there too: a large image is resized in a
        # millisecond instead of tens on the CPU that also feeds the next image.
        if self.torch_device.type == "cuda":
            # uint8 pixels go to the GPU from the I/O threads, several at once; the processor then
            # resizes and normalises there.
            pinned = [self._pinned_pixels.pop(id(image), None) for image in images]
            pixels_in: list[Any] = [
                self._to_device(image) if pixels is None else pixels.to(self.torch_device, non_blocking=True)
                for image, pixels in zip(images, pinned, strict=True)
            ]
            batch = self.processor(images=pixels_in, return_tensors="pt", device=self.torch_device)
        else:
            batch = self.processor(images=list(images), return_tensors="pt")
        seen = [(int(h), int(w)) for h, w in batch["original_sizes"].tolist()]
        if seen != _sizes(images):
            raise RuntimeError(f"the processor saw sizes {seen}, the images are {_sizes(images)}")
        pixels = batch["pixel_values"].to(self.torch_device, self.dtype)
        with torch.inference_mode():
            if pad:
                pixels = torch.cat([pixels, pixels[-1:].expand(pad, *pixels.shape[1:])])
            vision = self.model.get_vision_features(pixel_values=pixels)
        # Masks and boxes are made at the full size, also for a JPEG decoded at a reduced scale.
        full = [imageio.original_size(image)[::-1] for image in images]
        boxes = [image.info.get(EXEMPLARS_KEY) or {} for image in images]
        # Padding rows are the last image again, its exemplar boxes too: they take its path through
        # the decoders, at the full batch's size.
        encoded = EncodedImages(
            vision, full + full[-1:] * pad, boxes=boxes + boxes[-1:] * pad, real=len(images)
        )
        if self._decode_stream is not None:
            encoded.done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            encoded.done.record()
        return encoded

    def launch_prompts(self, encoded: EncodedImages) -> list[Scored]:
        """Every prompt on the shared vision features, one ``Scored`` per prompt. On a GPU this runs
        on the decoder stream after the encoder's work; the host waits there only for that stream.
        ``encoded`` must stay referenced until the results are ``ready``."""
        stream = self._decode_stream
        batch = len(encoded.sizes)
        scored = []
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                stream.wait_event(encoded.done)
            for index, text in enumerate(self.prompts):
                threshold = threshold_of(self.config, text.prompt)
                boxed = any(boxes.get(index) for boxes in encoded.boxes)
                with torch.inference_mode():
                    if not boxed and self.boxes_only[index]:
                        outputs = None  # a prompt of boxes alone, none in this sub-batch
                    elif not boxed:  # text alone: one forward
                        outputs = self.model(
                            vision_embeds=encoded.vision,
                            text_embeds=TextEmbeds(text.features.expand(batch, -1, -1)),
                            attention_mask=text.attention_mask.expand(batch, -1),
                        )
                    else:
                        outputs = forward_prompt(
                            self.model, encoded.vision, text, encoded.boxes, index, encoded.sizes,
                            self.boxes_only[index], self.dtype,
                        )  # fmt: skip
                    if outputs is None:
                        scored.append(nothing_scored(index, batch, self.torch_device))
                    else:
                        scored.append(score_outputs(outputs, index, encoded.sizes, threshold))
                del outputs
        return scored

    def select(self, scored: Sequence[Scored], sizes: Sequence[tuple[int, int]]) -> list[list[Candidates]]:
        """Per image, per prompt, the kept candidates (score filter and top-k done, so only their
        low-resolution masks stay on the device)."""
        limit = self.config.max_detections
        return [[choose(s, b, h, w, limit) for s in scored] for b, (h, w) in enumerate(sizes)]

    def decode_prompts(self, encoded: EncodedImages) -> list[list[Candidates]]:
        """``launch_prompts`` then ``select``: the kept candidates of every image and prompt."""
        return self.select(self.launch_prompts(encoded), encoded.image_sizes)

    def postprocess(self, parts: Sequence[Candidates], size: tuple[int, int]) -> ImageSegmentation:
        """One image's candidates of every prompt -> its label map, detections in label order."""
        return compose(self.merged(parts), size[0], size[1], self.config.mask_threshold)

    def merged(self, parts: Sequence[Candidates]) -> Candidates:
        """An image's candidates of every prompt, best first; duplicates across prompts folded
        with --suppress-iou."""
        found = merge(parts)
        iou = self.config.suppress_iou
        return found if iou is None else fold(found, iou, self.config.mask_threshold)

    def land(
        self, scored: Sequence[Scored], sizes: Sequence[tuple[int, int]], post_on_cpu: bool = False
    ) -> list[ImageSegmentation]:
        """Post-process launched forward passes: select, upsample, paint. On a GPU this runs on the
        post-processing stream, so a sub-batch queued after this one keeps the device busy."""
        stream = self._post_stream
        if stream is None:
            return self._land(scored, sizes, post_on_cpu)
        with torch.cuda.stream(stream):
            for s in scored:
                stream.wait_event(s.ready)
            try:
                return self._land(scored, sizes, post_on_cpu)
            finally:
                # The outputs were made on the decoders' stream: none may be freed (and its memory
                # reused there) while this stream still reads it, also after a failure.
                stream.synchronize()

    def _land(
        self, scored: Sequence[Scored], sizes: Sequence[tuple[int, int]], post_on_cpu: bool
    ) -> list[ImageSegmentation]:
        parts = self.select(scored, sizes)
        if post_on_cpu:
            parts = [[Candidates(c.instances, c.masks.cpu()) for c in part] for part in parts]
        # Every image's label map queued before one wait for all of them (dense scenes: see
        # docs/performance.md).
        return compose_many([self.merged(p) for p in parts], sizes, self.config.mask_threshold)

    def segment(self, images: Sequence[Image.Image], post_on_cpu: bool = False) -> list[ImageSegmentation]:
        """Encode, decode every prompt, post-process: the whole model side for a batch of images."""
        return self.decode(self.encode_images(images), post_on_cpu)

    def decode(self, encoded: EncodedImages, post_on_cpu: bool = False) -> list[ImageSegmentation]:
        """Decode every prompt on encoded images and post-process them."""
        scored = self.launch_prompts(encoded)
        return self.land(scored, encoded.image_sizes, post_on_cpu=post_on_cpu)

    def found(self, item: Item, image: Image.Image, seg: ImageSegmentation, started: float) -> Segmentation:
        """One image's (or window's) instances as the worker's writer takes them; ``image`` (from
        ``read``) says the whole image's size, its georeference and its nodata pixels."""
        instances = [
            Instance(
                self.prompts[inst.prompt_index].prompt,
                inst.score,
                inst.box,
                tuple(self.prompts[k].prompt for k in inst.folded),
            )
            for inst in seg.instances
        ]
        return Segmentation(
            seg.labels,
            instances,
            size=image.info.get(WHOLE_SIZE) or imageio.original_size(image),
            georef=georef_of(image),
            valid=valid_of(image),
            started_at=started,
            areas=seg.areas,
        )

    def finish(
        self, item: Item, image: Image.Image, seg: ImageSegmentation, started: float, write: WriteFn | None
    ) -> Outcome:
        """``found``, and written by ``write`` (the worker's, in this I/O thread) when there is one."""
        try:
            segmentation = self.found(item, image, seg, started)
        except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
            return self.failure(item, exc, started)
        return segmentation if write is None else write(item, segmentation)

    def failure(
        self, item: Item, exc: BaseException, started: float, status: Status = Status.ERROR
    ) -> ItemResult:
        """The failure result of ``item``: this image's (the engine writes no file)."""
        return failure_result(item, status, exc=exc, device=self.device, started_at=started)

    # --- device memory ------------------------------------------------------------------------

    def warm_up(self) -> None:
        """The backbone once at full batch (compiled and captured here), then the prompts' decoders
        on its features; out of memory halves the batch until it fits (at batch 1 the images' own
        fallbacks take over)."""
        size = self.processor.image_processor.size
        pixels: torch.Tensor | None = None
        vision: Any = None
        while True:
            shape = (self.max_batch, 3, size["height"], size["width"])
            try:
                with torch.inference_mode():
                    pixels = torch.zeros(shape, dtype=self.dtype, device=self.torch_device)
                for n in warm_sizes(self.model, self.max_batch):
                    vision = None  # the previous size's features, before the next are made
                    with torch.inference_mode():
                        vision = self.model.get_vision_features(pixel_values=pixels[:n])
                    self._warm_decoders(vision, n, (int(size["height"]), int(size["width"])))
                return
            except torch.cuda.OutOfMemoryError:
                pass  # retried outside the except block, once the failed attempt's memory is free
            pixels = vision = None  # the features of a backbone that fitted, when the decoders did not
            self.release_memory()
            if self.max_batch == 1:
                return
            self.ladder.halve(self.max_batch)

    def _warm_decoders(self, vision: Any, batch: int, size: tuple[int, int]) -> None:
        """Every prompt's decoders once, on their own stream as a task runs them: the first use of
        their kernels there (cuDNN attention plans, cuBLAS on a new stream) is paid in the load,
        not by the first image, which for one big image cut into tiles is most of the run."""
        encoded = EncodedImages(vision, [size] * batch, boxes=[{} for _ in range(batch)])
        if self._decode_stream is not None:
            encoded.done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            encoded.done.record()
        _held = self.launch_prompts(encoded)  # its results, like ``encoded``, held until the device is done
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def release_memory(self) -> None:
        """Hand the CUDA cache back (after a failure, before the images go again)."""
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def forget_pinned(self) -> None:
        """Drop the pinned pixels of images no step took (a task's end)."""
        self._pinned_pixels.clear()

    def _to_device(self, image: Image.Image) -> torch.Tensor:
        """An RGB image as a (3, H, W) uint8 tensor on the engine's device."""
        return self._pinned(image).to(self.torch_device, non_blocking=True)

    @staticmethod
    def _pinned(image: Image.Image) -> torch.Tensor:
        """An RGB image as a (3, H, W) uint8 tensor in pinned host memory, ready for an asynchronous
        copy. Done in the I/O threads; the copy itself is queued by the thread running the model,
        so no other thread ever waits on (or stalls) the GPU's queue."""
        pixels = torch.empty((image.height, image.width, 3), dtype=torch.uint8, pin_memory=True)
        pixels.numpy()[...] = np.asarray(image)  # PIL's array is read-only: copied, not wrapped
        return pixels.permute(2, 0, 1)


def _sizes(images: Sequence[Image.Image]) -> list[tuple[int, int]]:
    return [(image.height, image.width) for image in images]


def _describe_device(device: str, dtype: str) -> str:
    if device.startswith("cuda"):
        return f"{device} {torch.cuda.get_device_name(device)} {dtype}"
    return f"{device} {dtype}"
