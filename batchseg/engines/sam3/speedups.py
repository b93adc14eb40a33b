"""The CUDA speed-ups of the SAM3 engine, apart from the per-image pipeline they speed up.

The vision backbone at one batch size (``FixedBatchBackbone``: its layers compiled and/or replayed
as a CUDA graph), the prompts' decoders compiled (``compile_decoders``, with ``warm_sizes`` for
the engine's warm-up), the high-priority streams the decoders and post-processing run on
(``priority_stream``), and the fused kernels (``fused.py``: the rotary embedding, the MLPs' GELU).
``speed_up`` applies them for the engine and for the model-only benchmark alike. What each one
brought is in docs/performance.md.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .fused import fuse_gelu, fuse_rope, restore_gelu, restore_rope

__all__ = [
    "FixedBatchBackbone",
    "compile_decoders",
    "compile_layers",
    "decoders_compiled",
    "priority_stream",
    "release_text_tower",
    "speed_up",
    "warm_sizes",
]


def speed_up(
    model: Any,
    device: torch.device,
    batch: int,
    *,
    compile: bool,
    cuda_graphs: bool,
    fuse: bool,
    gelu: bool,
) -> tuple[FixedBatchBackbone | None, bool]:
    """The CUDA speed-ups applied to ``model`` as batchseg runs it (the engine, and the model-only
    benchmark): the backbone wrapped at one batch size when compiled or captured, the prompts'
    decoders compiled too with ``compile``, the rotary embedding fused (``fuse``; not with
    ``compile``, which fuses it anyway) and the MLPs' GELU made part of their first product
    (``gelu``). Returns the wrapper, if any, and whether the fused rotary embedding is in use."""
    restore_rope()  # a function of transformers' module, shared by the process
    vit = model.config.vision_config.backbone_config
    heads = int(vit.num_attention_heads)
    fused = fuse and not compile and fuse_rope(device, heads, int(vit.hidden_size) // heads) is None
    restore_gelu(model.vision_encoder.backbone)
    if gelu and device.type == "cuda":
        fuse_gelu(model.vision_encoder.backbone)
    if device.type != "cuda" or not (compile or cuda_graphs):
        return None, fused
    if compile:
        compile_decoders(model)
    backbone = FixedBatchBackbone(model.vision_encoder.backbone, batch, compile, cuda_graphs)
    model.vision_encoder.backbone = backbone
    return backbone, fused


def compile_layers(backbone: torch.nn.Module) -> int:
    """``torch.compile`` each layer of the ViT in place, at fixed shapes; returns how many.

    The 32 layers share two compiled graphs (windowed and global attention: the weights are the
    graphs' inputs): 6.8 s to the first forward on an H100 that had compiled nothing, where the
    whole backbone took 43 s, and faster too: the norms, residual adds, window partitions and
    rotary embedding of a layer are fused around its products and attention (docs/performance.md
    has both). Each new batch size compiles again, which is why a compiled backbone pads short
    batches."""
    import torch._dynamo.config as dynamo_config

    # One cache entry per graph kind and batch size; the default limit (8) would fall back to
    # eager after a few halvings of the batch.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), 64))
    layers = list(getattr(backbone, "layers", ()))
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


#: The prompt-side modules ``--compile`` compiles: they run once per prompt and sub-batch.
DECODERS = ("detr_encoder", "detr_decoder", "dot_product_scoring", "mask_decoder")


def compile_decoders(model: Any) -> None:
    """``torch.compile`` the prompt-side decoders in place: their norms, residual adds and
    elementwise passes are fused around the products and attention, about a quarter off a
    prompt's decoding (docs/performance.md). Shapes are left to torch: a second batch size
    compiles once more with the size dynamic, not once per size. The engine's warm-up meets the
    sizes a run brings (``warm_sizes``), so nothing compiles after the load."""
    for name in DECODERS:
        getattr(model, name).compile()


def decoders_compiled(model: Any) -> bool:
    """Whether ``compile_decoders`` compiled ``model``'s decoders."""
    return getattr(model.detr_encoder, "_compiled_call_impl", None) is not None


def warm_sizes(model: Any, full: int) -> list[int]:
    """The sub-batch sizes the engine's warm-up runs: the full batch, and with compiled decoders
    then half of it, one image and the full batch again. The half makes the batch size dynamic in
    their compiled code and one image has code of its own, so a run's short sub-batches compile
    nothing. The full batch comes again because with one prompt the DETR encoder's first pass
    left no compiled code for it (transformers 5.25, found with ``TORCH_LOGS=recompiles``): the
    run's first full sub-batch compiled again, a stall of seconds on a GPU."""
    if not decoders_compiled(model):
        return [full]
    sizes = [full, max(full // 2, 1), 1, full]
    return [n for k, n in enumerate(sizes) if k == 0 or n != sizes[k - 1]]


def release_text_tower(model: Any, device: torch.device) -> None:
    """Move the text encoder off the GPU once every prompt is encoded: the engine keeps the
    prompts' features and never runs it again, and on a 4 GiB card its weights are memory the
    images need (docs/performance.md has the figures)."""
    if device.type != "cuda" or getattr(model, "text_encoder", None) is None:
        return
    model.text_encoder.to("cpu")
    torch.cuda.empty_cache()


def priority_stream(device: torch.device) -> Any:
    """A CUDA stream of high priority: the decoders' short kernels are scheduled ahead of the next
    sub-batch's encoder instead of queuing behind it, so the model's thread (which waits for them)
    gets back to queuing work sooner."""
    return torch.cuda.Stream(device, priority=-1)  # type: ignore[no-untyped-call]


class FixedBatchBackbone(torch.nn.Module):
    """The ViT backbone run at one batch size, so that it can be compiled once and captured once: a
    short batch is padded and its output cut back when compiled, and runs as it comes otherwise.

    ``compile``: ``torch.compile`` of each ViT layer in place (``compile_layers``).
    ``graph``: the backbone's kernels are captured once as a CUDA graph and replayed with one
    launch, so the thread that runs the model spends no time launching its several hundred kernels
    per sub-batch and is free to decode and post-process the previous sub-batch meanwhile (it
    shares the GIL with the I/O threads). The graph keeps its own memory for the backbone's
    activations. A short sub-batch (the last tiles of an image: 40 tiles are 16, 16 and 8) gets a
    graph of its own size, up to ``SHORT_GRAPHS`` sizes, in the same memory pool (the graphs are
    replayed one at a time and each output is copied out at once), instead of launching its
    kernels one by one. Out of memory while capturing is raised (the engine halves the batch, and
    the next call captures at the new size); any other capture failure warns and falls back to
    launching as usual."""

    #: Short sub-batch sizes captured as graphs of their own, beyond the full batch.
    SHORT_GRAPHS = 4

    def __init__(
        self, backbone: torch.nn.Module, batch: int, compile: bool = False, graph: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.compiled = compile
        if compile:
            compile_layers(backbone)
        self.run = backbone
        self.graph = graph
        self._batch = batch
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self._pool: Any = None  # the memory pool the graphs share, once the first is captured

    @property
    def batch(self) -> int:
        return self._batch

    @batch.setter
    def batch(self, batch: int) -> None:
        # A new size: compiled again (once) and captured again on the next call.
        self._batch = batch
        self._graphs = {}
        self._pool = None

    @property
    def _captured(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Any] | None:
        """The graph of the full batch, if captured."""
        return self._graphs.get(self._batch)

    def get_input_embeddings(self) -> Any:
        backbone: Any = self.backbone  # a transformers model: nn.Module's typing does not know it
        return backbone.get_input_embeddings()

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        n = pixel_values.shape[0]
        if n > self._batch:  # a sub-batch made before the batch was halved: as it comes
            return self.run(pixel_values, **kwargs)
        # A compiled backbone pads a short batch to its one compiled size; a graph can be
        # captured at the short size instead (cheaper than computing padding rows).
        size = self._batch if self.compiled else n
        if self.graph and not kwargs and self._may_capture(size):
            if size not in self._graphs:
                self._capture(pixel_values, size)
            if size in self._graphs:
                return self._replay(pixel_values, size)
        if n == self._batch or not self.compiled:
            # Without compilation a short batch runs as it comes: an image retried alone costs one
            # image, not a padded batch.
            return self.run(pixel_values, **kwargs)
        pad = pixel_values.new_zeros((self._batch - n, *pixel_values.shape[1:]))
        out = self.run(torch.cat([pixel_values, pad]), **kwargs)
        out.last_hidden_state = out.last_hidden_state[:n]
        return out

    def _may_capture(self, size: int) -> bool:
        """Whether a sub-batch of ``size`` images replays a graph: the full batch always, a short
        one while fewer than ``SHORT_GRAPHS`` short sizes have their own."""
        if size == self._batch or size in self._graphs:
            return True
        return len([k for k in self._graphs if k != self._batch]) < self.SHORT_GRAPHS

    def _replay(self, pixel_values: torch.Tensor, size: int) -> Any:
        graph, static_in, static_out = self._graphs[size]
        n = pixel_values.shape[0]
        # Images are independent in the ViT: rows past n (a short compiled batch) only cost time.
        static_in[:n].copy_(pixel_values)
        graph.replay()
        # The next replay overwrites the graph's output while this sub-batch waits to be decoded.
        return type(static_out)(last_hidden_state=static_out.last_hidden_state[:n].clone())

    def _capture(self, like: torch.Tensor, size: int) -> None:
        static_in = torch.zeros((size, *like.shape[1:]), dtype=like.dtype, device=like.device)
        try:
            # Lazy initialisations (and compilation) must happen before the capture, on a side stream.
            side = torch.cuda.Stream(like.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(like.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.run(static_in)
            torch.cuda.current_stream(like.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()  # type: ignore[no-untyped-call, unused-ignore]
            # thread_local: the I/O threads may pin host memory while the model's thread captures.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
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
        self._graphs[size] = (graph, static_in, static_out)
        if self._pool is None:
            self._pool = graph.pool()
