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
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ... import imageio, rle
from ...config import RunConfig
from ...errors import ConfigError, InvalidImageError, OutputError
from ...records import Detection, Item, ItemResult, Status
from ...supervise.contract import EngineSpec, HeartbeatFn
from .fused import fuse_rope, restore_rope
from .model import load_model, max_prompt_tokens, resolve_device, resolve_dtype, set_threads
from .postprocess import (
    Candidates,
    ImageSegmentation,
    Scored,
    choose,
    compose,
    compose_many,
    merge,
    score_outputs,
)

__all__ = [
    "EncodedImages",
    "PromptText",
    "Sam3Engine",
    "load_engine",
    "pick_device",
    "plan_gpu_use",
    "speed_up",
]

#: Threads reading images and writing masks beside the forward pass (PIL and zlib release the GIL).
IO_THREADS = int(os.environ.get("BATCHSEG_IO_THREADS", 0)) or max(1, min(8, (os.cpu_count() or 2) // 2))
#: GPU memory of a forward pass beyond the weights, in GiB: GIB_BASE + GIB_PER_IMAGE x batch
#: (H100, bf16, 1008 px: 2.6 GiB peak at batch 1 and 7.1 GiB at batch 16 with 1.7 GiB of weights).
GIB_BASE = 0.55
GIB_PER_IMAGE = 0.36
MAX_AUTO_BATCH = 16
#: Sub-batches in one task on a GPU: the reads of the first and the writes of the last are the
#: only I/O not hidden behind a forward pass. Results travel after each sub-batch (heartbeats), so
#: a long task delays no checkpoint and a crash reruns only what was in flight.
SUB_BATCHES_PER_TASK = 32
#: The same on a CPU, where one full-size image takes seconds: a drain (Ctrl-C, --deadline) waits
#: for the task in flight, so it stays short; 4 already hide most reads and writes of small models.
CPU_SUB_BATCHES_PER_TASK = 4
#: Fraction of the free memory a worker plans to use; CUDA out-of-memory halves the batch anyway.
GPU_MEMORY_HEADROOM = 0.7


def load_engine(spec: EngineSpec, slot: int) -> Sam3Engine:
    """Factory called once per worker: model on its device, prompts encoded, ready to process."""
    config = spec.config
    set_threads(config.threads)
    imageio.configure_pillow(config.max_pixels)
    device = pick_device(config.device, slot)
    dtype, reason = resolve_dtype(device, config.dtype)
    model, processor = load_model(config.model, device, dtype)
    return Sam3Engine(model, processor, config, device, dtype, reason)


def plan_gpu_use(device: torch.device) -> int:
    """Images per forward pass that the free memory of ``device`` allows (at least 1, at most
    ``MAX_AUTO_BATCH``): a forward pass takes about ``GIB_BASE + GIB_PER_IMAGE x batch`` beyond the
    weights (measured on an H100, full-size SAM3, 1008 px, bf16)."""
    free, _total = torch.cuda.mem_get_info(device)
    share = free / 2**30 * GPU_MEMORY_HEADROOM
    return max(1, min(MAX_AUTO_BATCH, int((share - GIB_BASE) / GIB_PER_IMAGE)))


def speed_up(
    model: Any, device: torch.device, batch: int, *, compile: bool, cuda_graphs: bool, fuse: bool
) -> tuple[FixedBatchBackbone | None, bool]:
    """The CUDA speed-ups applied to ``model`` as batchseg runs it (the engine, and the model-only
    benchmark): the backbone wrapped at one batch size when compiled or captured, and the rotary
    embedding fused (not with ``compile``, which fuses it anyway). Returns the wrapper, if any, and
    whether the fused rotary embedding is in use."""
    restore_rope()  # a function of transformers' module, shared by the process
    fused = fuse and not compile and fuse_rope(device) is None
    if device.type != "cuda" or not (compile or cuda_graphs):
        return None, fused
    backbone = FixedBatchBackbone(model.vision_encoder.backbone, batch, compile, cuda_graphs)
    model.vision_encoder.backbone = backbone
    return backbone, fused


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
    done: Any = None  # torch.cuda.Event recorded after the vision encoder's work, on a GPU


@dataclass
class _Flight:
    """A sub-batch encoded (its vision encoder queued on the device) and not yet decoded."""

    positions: list[int]  # in the task
    encoded: EncodedImages | None  # None once decoded or failed: the vision features are freed


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
        cuda = self.torch_device.type == "cuda"
        # Images per forward pass: --batch-size, else 1 on CPU (a batch of 2 was slower than two
        # singles there) and what free memory allows on a GPU; halved for good after CUDA OOM.
        self.max_batch = config.batch_size or (plan_gpu_use(self.torch_device) if cuda else 1)
        # Suggestions for the pool (see batchseg.supervise.worker.Ready): a task of several sub-batches keeps
        # the GPU busy while the I/O threads read the next sub-batch and write the last one.
        per_task = SUB_BATCHES_PER_TASK if cuda else CPU_SUB_BATCHES_PER_TASK
        self.preferred_task_size = self.max_batch * per_task
        self.heartbeat_every = self.max_batch
        self._backbone, self.fused_rope = speed_up(
            model,
            self.torch_device,
            self.max_batch,
            compile=config.compile,
            cuda_graphs=config.cuda_graphs,
            fuse=config.fuse_rope,
        )
        if self._backbone is not None:
            # Compile and capture during the load (its own timeout), not in the first image's.
            self._warm_up()
        # A JPEG may be decoded at 1/2 to 1/8 scale while it stays twice the model's input side:
        # 3x faster for small inputs, within 3 grey levels after the processor's resize (measured).
        self.draft_side = 2 * max(
            self.processor.image_processor.size["height"], self.processor.image_processor.size["width"]
        )
        self._pinned_pixels: dict[int, torch.Tensor] = {}  # uint8 pixels _read left in pinned memory
        # On a GPU the vision encoder runs on the current stream, the prompts' decoders and the
        # post-processing on streams of their own: the decoders hold a blocking copy (a host wait
        # for their stream) and post-processing waits for its results, and neither may leave the
        # device without queued work (see ``process``).
        self._decode_stream = _stream(self.torch_device) if cuda else None
        # Decode sub-batch k-1 after queuing sub-batch k's encoder (see ``process``). A CPU has no
        # queue to keep full, so there each sub-batch is decoded at once: one in memory, not two.
        self.overlap = cuda
        self._post_stream = _stream(self.torch_device) if cuda else None
        self._io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="batchseg-io")

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
                raise ConfigError(
                    f"prompt {prompt!r} is {n_tokens} tokens long (start and end tokens "
                    f"included) but the model reads at most {limit}: shorten it"
                )
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
            vision = self.model.get_vision_features(pixel_values=pixels)
        # Masks and boxes are made at the full size, also for a JPEG decoded at a reduced scale.
        full = [imageio.original_size(image)[::-1] for image in images]
        encoded = EncodedImages(vision, full)
        if self._decode_stream is not None:
            encoded.done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            encoded.done.record()
        return encoded

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
                with torch.inference_mode():
                    outputs = self.model(
                        vision_embeds=encoded.vision,
                        text_embeds=_TextEmbeds(text.features.expand(batch, -1, -1)),
                        attention_mask=text.attention_mask.expand(batch, -1),
                    )
                    scored.append(score_outputs(outputs, index, encoded.sizes, self.config.threshold))
                del outputs
        return scored

    def select(self, scored: Sequence[Scored], sizes: Sequence[tuple[int, int]]) -> list[list[Candidates]]:
        """Per image, per prompt, the kept candidates (score filter and top-k done, so only their
        low-resolution masks stay on the device)."""
        limit = self.config.max_detections
        return [[choose(s, b, h, w, limit) for s in scored] for b, (h, w) in enumerate(sizes)]

    def decode_prompts(self, encoded: EncodedImages) -> list[list[Candidates]]:
        """``launch_prompts`` then ``select``: the kept candidates of every image and prompt."""
        return self.select(self.launch_prompts(encoded), encoded.sizes)

    def postprocess(self, parts: Sequence[Candidates], size: tuple[int, int]) -> ImageSegmentation:
        """One image's candidates of every prompt -> its label map, detections in label order."""
        return compose(merge(parts), size[0], size[1], self.config.mask_threshold)

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
        return compose_many([merge(p) for p in parts], sizes, self.config.mask_threshold)

    def segment(self, images: Sequence[Image.Image], post_on_cpu: bool = False) -> list[ImageSegmentation]:
        """Encode, decode every prompt, post-process: the whole model side for a batch of images."""
        return self.decode(self.encode_images(images), post_on_cpu)

    def decode(self, encoded: EncodedImages, post_on_cpu: bool = False) -> list[ImageSegmentation]:
        """Decode every prompt on encoded images and post-process them."""
        scored = self.launch_prompts(encoded)
        return self.land(scored, encoded.sizes, post_on_cpu=post_on_cpu)

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

    def process(self, items: Sequence[Item], heartbeat: HeartbeatFn | None = None) -> list[ItemResult]:
        """One result per item, in order, as a pipeline. I/O threads read (and on a GPU pin) images
        one sub-batch ahead and write results behind. Each turn queues the vision encoder of
        sub-batch k, then decodes and post-processes sub-batch k-1: on a GPU the host's waits
        (the decoders' blocking copy, the post-processing) fall while sub-batch k's encoder runs,
        so the device is not left idle. ``heartbeat`` (see ``Engine.process``) is called after
        each finished sub-batch, with the results written since, so a watchdog can give each
        sub-batch its own time budget and a crash later in the task loses none of them; and
        before reads go further than already said."""
        started = time.time()
        results: dict[int, ItemResult] = {}
        loads: dict[int, Future[Image.Image | ItemResult]] = {}
        writes: dict[int, Future[ItemResult]] = {}
        held: dict[int, Image.Image] = {}  # images read and not yet handed to a write
        pending: _Flight | None = None
        reported: set[int] = set()

        def beat(reached: int | None = None) -> None:
            if heartbeat is None:
                return
            finished = [(i, r) for i, r in results.items() if i not in reported]
            finished += [(i, f.result()) for i, f in writes.items() if i not in reported and f.done()]
            reported.update(i for i, _ in finished)
            heartbeat(finished, reached)

        def read_ahead(upto: int) -> None:
            upto = min(upto, len(items))
            if upto > len(loads):
                beat(reached=upto)  # said before any of these items is touched
            for i in range(len(loads), upto):
                loads[i] = self._io.submit(self._read, items[i])

        def settle(segs: dict[int, ImageSegmentation | ItemResult]) -> None:
            for i, seg in segs.items():
                image = held.pop(i)
                if isinstance(seg, ItemResult):
                    results[i] = seg
                else:
                    writes[i] = self._io.submit(self._finish, items[i], image, seg, started)
            beat()

        def decode_pending() -> None:
            nonlocal pending
            if pending is not None:
                flight, pending = pending, None
                settle(self._decode_flight(items, held, flight, started))

        done = 0
        while done < len(items):
            chunk = range(done, min(done + self.max_batch, len(items)))
            read_ahead(chunk[-1] + 1 + self.max_batch)
            for i in chunk:
                loaded = loads[i].result()
                if isinstance(loaded, ItemResult):
                    results[i] = loaded
                else:
                    held[i] = loaded
            positions = [i for i in chunk if i in held]
            if positions:
                # Failures are handled after the except blocks: a live exception's traceback
                # would keep the failed encoder's GPU memory in use while the images go again.
                failure: str | None = None
                queued: _Flight | None = None
                try:
                    queued = _Flight(positions, self.encode_images([held[i] for i in positions]))
                except torch.cuda.OutOfMemoryError:
                    failure = "out of memory"
                except Exception:  # noqa: BLE001 - one bad image must not fail its neighbours
                    failure = "error"
                decode_pending()  # sub-batch k-1, while sub-batch k's encoder runs
                pending, queued = queued, None
                if not self.overlap:
                    decode_pending()
                if failure is not None:
                    self._release_memory()
                    if failure == "out of memory" and len(positions) > 1:
                        self._shrink_batch(len(positions))
                        continue  # the same images again, in smaller sub-batches
                    settle(self._in_sub_batches(items, held, positions, started, size=1))
            done = chunk[-1] + 1
        decode_pending()
        results.update({i: future.result() for i, future in writes.items()})
        # Pinned pixels are keyed by id(image): none may outlive its image (an id can be reused).
        self._pinned_pixels.clear()
        return [results[i] for i in range(len(items))]

    def _decode_flight(
        self, items: Sequence[Item], images: dict[int, Image.Image], flight: _Flight, started: float
    ) -> dict[int, ImageSegmentation | ItemResult]:
        """An encoded sub-batch decoded and post-processed; on failure its images again without
        the pipeline (smaller sub-batches after out-of-memory, one by one after another error)."""
        positions, encoded = flight.positions, flight.encoded
        flight.encoded = None  # whoever still holds the flight, its features die with ``encoded``
        assert encoded is not None, "a sub-batch is decoded once"
        try:
            return dict(zip(positions, self.decode(encoded), strict=True))
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        except Exception:  # noqa: BLE001 - one bad image must not fail its neighbours
            out_of_memory = False
        del encoded  # the vision features go before the images go again
        self._release_memory()
        size = None if out_of_memory else 1
        return self._in_sub_batches(items, images, positions, started, size, out_of_memory)

    def _in_sub_batches(
        self,
        items: Sequence[Item],
        images: dict[int, Image.Image],
        positions: list[int],
        started: float,
        size: int | None = None,
        out_of_memory: bool = False,
    ) -> dict[int, ImageSegmentation | ItemResult]:
        """Images segmented ``size`` (default ``max_batch``) at a time, each sub-batch done before
        the next: the way back after a failure. ``out_of_memory``: ``positions`` ran out of GPU
        memory together, so the batch is halved first. CUDA out-of-memory halves it again; one
        image alone gets ``_last_try``; any other error is the image's own (``_one``)."""
        if out_of_memory and len(positions) > 1:
            self._shrink_batch(len(positions))
        segs: dict[int, ImageSegmentation | ItemResult] = {}
        step = size or self.max_batch
        for start in range(0, len(positions), step):
            part = positions[start : start + step]
            if len(part) == 1:
                segs[part[0]] = self._one(items[part[0]], images[part[0]], started)
                continue
            try:
                segs.update(zip(part, self._segment_guarded([images[i] for i in part]), strict=True))
                continue
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            except Exception:  # noqa: BLE001
                out_of_memory = False
            # Outside the except blocks, so the failed attempt's memory is free for the next.
            size = None if out_of_memory else 1
            segs.update(self._in_sub_batches(items, images, part, started, size, out_of_memory))
        return segs

    def _read(self, item: Item) -> Image.Image | ItemResult:
        started = time.time()
        try:
            image = imageio.read_image(
                self.input_root / item.path, self.config.max_pixels, draft_side=self.draft_side
            )
            if self.torch_device.type == "cuda":
                self._pinned_pixels[id(image)] = self._pinned(image)
            return image
        except InvalidImageError as exc:
            return self._failure(item, exc, started, Status.INVALID_INPUT)
        except Exception as exc:  # noqa: BLE001 - any per-image failure is that image's result
            return self._failure(item, exc, started)

    def _segment_guarded(
        self, images: Sequence[Image.Image], post_on_cpu: bool = False
    ) -> list[ImageSegmentation]:
        try:
            return self.segment(images, post_on_cpu=post_on_cpu)
        except BaseException:
            self._release_memory()
            raise

    def _one(self, item: Item, image: Image.Image, started: float) -> ImageSegmentation | ItemResult:
        """An image alone, after its batch failed: its own error, or its segmentation."""
        try:
            return self._segment_guarded([image])[0]
        except torch.cuda.OutOfMemoryError:
            pass  # the last try comes after this block, once the failed attempt's memory is free
        except Exception as exc:  # noqa: BLE001
            return self._failure(item, exc, started)
        self._release_memory()
        return self._last_try(item, image, started)

    def _last_try(self, item: Item, image: Image.Image, started: float) -> ImageSegmentation | ItemResult:
        """An image that alone ran out of GPU memory: once more with the masks upsampled and painted
        on the CPU (the forward pass stays on the GPU), then a clear error."""
        try:
            return self._segment_guarded([image], post_on_cpu=True)[0]
        except torch.cuda.OutOfMemoryError as exc:
            failure = self._failure(item, exc, started)
            failure.error_message = (
                f"out of GPU memory even alone and with post-processing on the CPU ({image.width}x"
                f"{image.height}); try --dtype float16, a lower --max-detections, or --device cpu"
            )
            return failure
        except Exception as exc:  # noqa: BLE001
            return self._failure(item, exc, started)

    def _warm_up(self) -> None:
        """The backbone once at full batch (compiled and captured here); out of memory halves the
        batch until it fits (at batch 1 the images' own fallbacks take over)."""
        size = self.processor.image_processor.size
        pixels: torch.Tensor | None = None
        while True:
            shape = (self.max_batch, 3, size["height"], size["width"])
            try:
                with torch.inference_mode():
                    pixels = torch.zeros(shape, dtype=self.dtype, device=self.torch_device)
                    self.model.get_vision_features(pixel_values=pixels)
                return
            except torch.cuda.OutOfMemoryError:
                pass  # retried outside the except block, once the failed attempt's memory is free
            pixels = None
            self._release_memory()
            if self.max_batch == 1:
                return
            self._shrink_batch(self.max_batch)

    def _shrink_batch(self, tried: int) -> None:
        """CUDA ran out of memory on ``tried`` images: halve, and keep the smaller size from now on.
        A sub-batch made before an earlier halving (larger than ``max_batch``) changes nothing."""
        if tried > self.max_batch:
            return
        self.max_batch = max(1, tried // 2)
        if self._backbone is not None:
            self._backbone.batch = self.max_batch  # compiled and captured again at the new size
        warnings.warn(
            f"out of GPU memory at batch {tried}; continuing with batch {self.max_batch}",
            RuntimeWarning,
            stacklevel=2,
        )

    def _finish(self, item: Item, image: Image.Image, seg: ImageSegmentation, started: float) -> ItemResult:
        try:
            mask_rel, detections = self.write(item, seg)
        except Exception as exc:  # noqa: BLE001 - OutputError included: the runner decides if it is fatal
            return self._failure(item, exc, started)
        width, height = imageio.original_size(image)
        return ItemResult(
            path=item.path,
            status=Status.OK,
            width=width,
            height=height,
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
        self._io.shutdown(wait=True)
        self.model = None
        self.prompts = []
        self._release_memory()


class FixedBatchBackbone(torch.nn.Module):
    """The ViT backbone run at one batch size, so that it can be compiled once and captured once: a
    short batch is padded and its output cut back when compiled, and runs as it comes otherwise.

    ``compile``: ``torch.compile`` of the whole backbone (H100, batch 16, bf16, end to end: 48 -> 53
    img/s over the fused rotary embedding alone; about a minute of compilation per worker).
    ``graph``: the backbone's kernels are captured once as a CUDA graph and replayed with one
    launch, so the thread that runs the model spends no time launching its several hundred kernels
    per sub-batch and is free to decode and post-process the previous sub-batch meanwhile (it
    shares the GIL with the I/O threads). The graph keeps its own memory for the backbone's
    activations. Out of memory while capturing is raised (the engine halves the batch, and the
    next call captures at the new size); any other capture failure warns and falls back to
    launching as usual."""

    def __init__(
        self, backbone: torch.nn.Module, batch: int, compile: bool = False, graph: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.compiled = compile
        self.run = torch.compile(backbone) if compile else backbone
        self.graph = graph
        self._batch = batch
        self._captured: tuple[torch.cuda.CUDAGraph, torch.Tensor, Any] | None = None

    @property
    def batch(self) -> int:
        return self._batch

    @batch.setter
    def batch(self, batch: int) -> None:
        # A new size: compiled again (once) and captured again on the next call.
        self._batch = batch
        self._captured = None

    def get_input_embeddings(self) -> Any:
        return self.backbone.get_input_embeddings()

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        n = pixel_values.shape[0]
        if n > self._batch or (n < self._batch and not self.compiled):
            # As it comes: a sub-batch made before the batch was halved, or a short one without
            # compilation (an image retried alone costs one image, not a padded batch).
            return self.run(pixel_values, **kwargs)
        if self.graph and not kwargs:
            if self._captured is None:
                self._capture(pixel_values)
            if self._captured is not None:
                return self._replay(pixel_values)
        if n < self._batch:
            pad = pixel_values.new_zeros((self._batch - n, *pixel_values.shape[1:]))
            pixel_values = torch.cat([pixel_values, pad])
        out = self.run(pixel_values, **kwargs)
        if n < self._batch:
            out.last_hidden_state = out.last_hidden_state[:n]
        return out

    def _replay(self, pixel_values: torch.Tensor) -> Any:
        graph, static_in, static_out = self._captured  # type: ignore[misc]
        n = pixel_values.shape[0]
        # Images are independent in the ViT: rows past n (a short compiled batch) only cost time.
        static_in[:n].copy_(pixel_values)
        graph.replay()
        # The next replay overwrites the graph's output while this sub-batch waits to be decoded.
        return type(static_out)(last_hidden_state=static_out.last_hidden_state[:n].clone())

    def _capture(self, like: torch.Tensor) -> None:
        static_in = torch.zeros((self._batch, *like.shape[1:]), dtype=like.dtype, device=like.device)
        try:
            # Lazy initialisations (and compilation) must happen before the capture, on a side stream.
            side = torch.cuda.Stream(like.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(like.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.run(static_in)
            torch.cuda.current_stream(like.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()  # type: ignore[no-untyped-call]
            # thread_local: the I/O threads may pin host memory while the model's thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.run(static_in)
        except torch.cuda.OutOfMemoryError:
            # The engine halves the batch, which captures again at the smaller size.
            del static_in
            torch.cuda.empty_cache()
            raise
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: launch as usual instead
            self.graph = False
            torch.cuda.empty_cache()
            warnings.warn(
                f"CUDA graph capture of the vision backbone failed ({type(exc).__name__}: {exc}); "
                "launching its kernels one by one instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self._captured = (graph, static_in, static_out)


class _TextEmbeds:
    """What ``Sam3Model.forward(text_embeds=...)`` reads: an object with ``pooler_output``."""

    def __init__(self, pooler_output: torch.Tensor) -> None:
        self.pooler_output = pooler_output


def _stream(device: torch.device) -> Any:
    # High priority: the decoders' short kernels are scheduled ahead of the next sub-batch's
    # encoder instead of queuing behind it, so the model's thread (which waits for them) gets
    # back to queuing work sooner. H100, batch 16: the GPU busy 96% of a task instead of 84%.
    return torch.cuda.Stream(device, priority=-1)  # type: ignore[no-untyped-call]


def _sizes(images: Sequence[Image.Image]) -> list[tuple[int, int]]:
    return [(image.height, image.width) for image in images]


def _describe_device(device: str, dtype: str) -> str:
    if device.startswith("cuda"):
        return f"{device} {torch.cuda.get_device_name(device)} {dtype}"
    return f"{device} {dtype}"
