"""Where the GPU waits inside ``Sam3Engine.process``: a torch.profiler trace of whole tasks.

    python benchmarks/trace_engine.py --model-dir .bench/models/full-bf16 \
        --images-dir .bench/images-2048x1536 --batch-size 16 --tasks 1 [--task-size 128]

Runs one warm-up task (none with ``--cold``: a fresh worker's first task), then profiles
``--tasks`` tasks of the engine's preferred size (or ``--task-size`` images: a 512-image trace is
large) with reads, forward passes, post-processing and writes as in a real run, without the pool.
Prints the task's wall time, the time the GPU ran kernels, and the GPU's idle time split by what the
thread running the model was doing meanwhile (each engine step is wrapped in a ``record_function``
label). ``--trace FILE`` also writes the Chrome trace (open it in ui.perfetto.dev). ``--ops N``
lists the N operators with the most GPU time (run it with ``--no-cuda-graphs``: a replayed graph
hides its operators), and ``--no-cuda-graphs``, ``--no-fuse-rope``, ``--no-priority`` and
``--compile`` compare settings.

``--tiled`` traces a folder of big images instead, run as the worker runs a task of them
(``worker.process.run_items`` with the run's ``Tiler``: tiles, the merge helper, the label map), so
the GPU's gaps between one image's last tile and the next image's first are attributed too:

    python benchmarks/trace_engine.py --model-dir .bench/models/full-bf16 \
        --images-dir .bench/jpegs-6000x4000 --batch-size 16 --tiled --tasks 8
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

#: Engine methods whose time on the model's thread is attributed to GPU gaps.
STEPS = ("process", "encode_images", "launch_prompts", "land", "postprocess", "finish", "read", "prefetch")
#: The worker's steps around a tiled image (``--tiled``): class, method.
TILED_STEPS = (
    ("batchseg.worker.tiling:Tiler", "plan"),
    ("batchseg.worker.tiling:Tiler", "progress"),
    ("batchseg.worker.tile_stream:TileStream", "run"),
    ("batchseg.worker.tile_stream:TileStream", "_finish"),
    ("batchseg.worker.tile_stream:Handover", "keep"),
    ("batchseg.tiles.merge_process:MergeProcess", "begin"),
    ("batchseg.tiles.merge_process:RemoteMerge", "result"),
    ("batchseg.worker.writer:OutputWriter", "write_merged"),
)


DURATIONS: dict[str, list[float]] = defaultdict(list)
#: CUDA runtime calls in which the model's thread may wait for the device.
HOST_WAITS = {
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpyAsync",
    "cudaMemcpy",
    "cudaStreamWaitEvent",
}


def _quiet(*_args: Any) -> None:
    """The heartbeat: nobody listens here."""


def _label(engine: Any, name: str) -> None:
    """Wrap ``engine.name`` (an object's method, or a class's function) in a profiler label."""
    import torch

    method = getattr(engine, name, None)
    if method is None:
        return
    if isinstance(engine, type):  # a class: its function, called with self
        method = engine.__dict__[name]

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"step:{name}"):
                return method(*args, **kwargs)
        finally:
            DURATIONS[name].append(time.perf_counter() - start)

    setattr(engine, name, wrapped)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def analyse(prof: Any) -> dict[str, Any]:
    """GPU busy time and the GPU's gaps attributed to the innermost step label on the main thread."""
    from torch.autograd import DeviceType

    events = prof.events()
    outer = next(e for e in events if e.name == "tasks")
    lo, hi, main_tid = outer.time_range.start, outer.time_range.end, outer.thread
    kernels, labels, launches, waits = [], [], [], []
    by_kernel: dict[str, float] = defaultdict(float)
    for event in events:
        start, end = event.time_range.start, event.time_range.end
        annotation = event.name.startswith("step:") or event.name == "tasks"
        if event.device_type == DeviceType.CUDA and not annotation:
            if lo <= start < hi:
                kernels.append((start, end))
                by_kernel[event.name[:70]] += (end - start) / 1000
        elif annotation and event.device_type == DeviceType.CPU:
            labels.append((start, end, event.name[5:], event.thread))
        elif event.thread == main_tid and event.self_device_time_total > 0 and lo <= start < hi:
            launches.append((start, event.self_device_time_total / 1000))
        if event.thread == main_tid and event.name in HOST_WAITS and lo <= start < hi:
            waits.append((start, (end - start) / 1000))
    busy = _union([(max(s, lo), min(e, hi)) for s, e in kernels if e > lo and s < hi])
    gaps, cursor = [], lo
    for start, end in busy:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < hi:
        gaps.append((cursor, hi))
    main = sorted((s, e, n) for s, e, n, t in labels if t == main_tid)
    by_step: dict[str, float] = defaultdict(float)
    for g0, g1 in gaps:
        # Split each gap by the main thread's innermost label covering each microsecond slice.
        points = sorted({g0, g1, *[p for s, e, _ in main for p in (s, e) if g0 < p < g1]})
        for a, b in zip(points, points[1:], strict=False):
            mid = (a + b) / 2
            inner = [(e - s, n) for s, e, n in main if s <= mid < e]
            by_step[min(inner)[1] if inner else "(no step)"] += (b - a) / 1000
    gpu_by_step: dict[str, float] = defaultdict(float)
    for start, ms in launches:
        inner = [(e - s, n) for s, e, n in main if s <= start < e]
        gpu_by_step[min(inner)[1] if inner else "(no step)"] += ms
    wait_by_step: dict[str, float] = defaultdict(float)
    for start, ms in waits:
        inner = [(e - s, n) for s, e, n in main if s <= start < e]
        wait_by_step[min(inner)[1] if inner else "(no step)"] += ms
    wall = (hi - lo) / 1000
    busy_ms = sum(e - s for s, e in busy) / 1000
    return {
        "wall_ms": round(wall, 1),
        "gpu_busy_ms": round(busy_ms, 1),
        "gpu_busy_pct": round(100 * busy_ms / wall, 1),
        "gpu_idle_ms_by_main_thread_step": {
            k: round(v, 1) for k, v in sorted(by_step.items(), key=lambda kv: -kv[1])
        },
        "host_waits_ms_by_step": {
            k: round(v, 1) for k, v in sorted(wait_by_step.items(), key=lambda kv: -kv[1])
        },
        "gaps_over_1ms": sum(1 for a, b in gaps if b - a > 1000),
        "step_ms_mean": {k: round(1000 * sum(v) / len(v), 2) for k, v in DURATIONS.items()},
        "gpu_ms_by_launching_step": {
            k: round(v, 1) for k, v in sorted(gpu_by_step.items(), key=lambda kv: -kv[1])
        },
        "top_gpu_events_ms": {
            k: round(v, 1) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]
        },
    }


TILE = 1008


def _plan_of(path: Path) -> Any:
    from PIL import Image

    from batchseg.tiles import parse_overlap, plan_tiles

    with Image.open(path) as image:
        return plan_tiles(*image.size, TILE, parse_overlap(None, TILE))


def _tiled(engine: Any, config: Any, writer: Any, paths: list[Path], tasks: int) -> tuple[Any, list[Any]]:
    """``process`` and its tasks for ``--tiled``: one image a task for the warm-up, then ``tasks``
    images in one task, run by the worker's own ``run_items`` (heartbeats drained by a thread)."""
    import importlib
    import threading
    from multiprocessing import Pipe

    from batchseg.records import Item
    from batchseg.worker.task_items import Beat, run_items
    from batchseg.worker.tiling import Tiler

    for where, name in TILED_STEPS:
        module, cls = where.split(":")
        _label(getattr(importlib.import_module(module), cls), name)
    tiler = Tiler.for_run(config, engine.capabilities)
    ours, theirs = Pipe()

    def drain() -> None:
        while True:
            try:
                theirs.recv()
            except (EOFError, OSError):
                return

    threading.Thread(target=drain, daemon=True).start()
    if len(paths) < tasks + 1:
        raise SystemExit(f"--tiled --tasks {tasks} needs {tasks + 1} images in the folder")
    items = [Item(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]

    def process(task: list[Any]) -> list[Any]:
        beat = Beat(ours, 1, engine.capabilities, live=True)
        return run_items(engine, engine.capabilities, task, beat, tiler, writer)

    return process, [items[:1], items[1 : tasks + 1]]


def top_ops(prof: Any, n: int) -> dict[str, float]:
    """The ``n`` operators (with their input shapes) whose own kernels ran longest on the GPU."""
    rows = [
        (row.self_device_time_total / 1000, f"{row.key} {row.input_shapes}"[:160])
        for row in prof.key_averages(group_by_input_shape=True)
        if row.self_device_time_total > 0
    ]
    return {name: round(ms, 1) for ms, name in sorted(rows, reverse=True)[:n]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--images-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--task-size", type=int, default=None, help="images per task [the engine's]")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--no-priority", action="store_true", help="decoder streams at normal priority")
    parser.add_argument("--ops", type=int, default=0, help="also list the N ops with most GPU time")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="launch the backbone's kernels")
    parser.add_argument("--no-fuse-rope", action="store_true", help="transformers' own rotary embedding")
    parser.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (s)")
    parser.add_argument("--tiled", action="store_true", help="big images as tiles: --tasks images")
    parser.add_argument("--cold", action="store_true", help="no warm-up task: a fresh worker's first")
    args = parser.parse_args()

    import sys

    import torch

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.no_priority:
        import batchseg.engines.sam3.pipeline

        # The decoders' and post-processing's streams at the default priority (the comparison).
        batchseg.engines.sam3.pipeline.priority_stream = lambda device: torch.cuda.Stream(device)

    from batchseg.config import RunConfig
    from batchseg.engines.sam3.engine import load_engine
    from batchseg.records import Item
    from batchseg.worker.contract import EngineSpec
    from batchseg.worker.writer import OutputWriter, WritingBeat

    config = RunConfig(
        input=args.images_dir.resolve(),
        prompts=("roof",),
        model=str(args.model_dir),
        output=Path(tempfile.mkdtemp(prefix="batchseg-trace-")),
        device=args.device,
        dtype=args.dtype,
        threshold=args.threshold,
        batch_size=args.batch_size,
        compile=args.compile,
        cuda_graphs=not args.no_cuda_graphs,
        fuse_rope=not args.no_fuse_rope,
    )
    if args.tiled:
        config = replace(config, tile=str(TILE))
    engine = load_engine(EngineSpec(config=config), 0)
    for name in STEPS:
        _label(engine, name)
    paths = sorted(args.images_dir.glob("*.jpg"))
    size = args.task_size or engine.capabilities.task_size
    tasks = [
        [Item(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths[i * size : (i + 1) * size]]
        for i in range(args.tasks + 1)
    ]
    writer = OutputWriter(config, engine.device)

    def process(task: list[Any]) -> list[Any]:  # as the worker runs it: label maps written
        writing = WritingBeat(writer, task, _quiet)
        return writing.results(engine.process(task, writing))

    if args.tiled:
        process, tasks = _tiled(engine, config, writer, paths, args.tasks)

    if not args.cold:
        process(tasks[0])  # warm-up: allocator, cuDNN/cuBLAS choices
    DURATIONS.clear()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=bool(args.ops)) as prof:
        with torch.profiler.record_function("tasks"):
            start = time.perf_counter()
            results = [r for task in tasks[1:] for r in process(task)]
            sync()
            seconds = time.perf_counter() - start
    report = analyse(prof)
    if args.ops:
        report["top_ops_self_gpu_ms"] = top_ops(prof, args.ops)
    images = sum(len(t) for t in tasks[1:])
    if args.tiled:
        report["tiles_per_image"] = tiles = len(_plan_of(paths[0]).tiles)
        report["tiles_per_s_profiled"] = round(images * tiles / seconds, 1)
    detections = sum(len(r.detections) for r in results) / max(1, len(results))
    report.update(
        images=images,
        detections_per_image=round(detections, 1),
        img_per_s_profiled=round(images / seconds, 1),
        batch_size=engine.max_batch,
    )
    print(json.dumps(report, indent=1))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
