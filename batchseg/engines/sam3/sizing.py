"""How many images the SAM3 engine puts in one forward pass and in one task.

Torch-free, so the factory module (imported in the parent) can name these numbers. The constants
come from measurements listed in docs/performance.md ("GPU memory per forward pass").
"""

from __future__ import annotations

__all__ = [
    "CPU_SUB_BATCHES_PER_TASK",
    "GIB_BASE",
    "GIB_PER_IMAGE",
    "GPU_MEMORY_HEADROOM",
    "MAX_AUTO_BATCH",
    "SUB_BATCHES_PER_TASK",
    "batch_for_free_memory",
    "task_size",
]

#: GPU memory of a forward pass beyond the weights, in GiB: GIB_BASE + GIB_PER_IMAGE x batch.
GIB_BASE = 0.55
GIB_PER_IMAGE = 0.36
MAX_AUTO_BATCH = 16
#: Fraction of the free memory a worker plans to use; CUDA out-of-memory halves the batch anyway.
GPU_MEMORY_HEADROOM = 0.7
#: Sub-batches in one task on a GPU: the reads of the first and the writes of the last are the
#: only I/O not hidden behind a forward pass. Results travel after each sub-batch (heartbeats), so
#: a long task delays no checkpoint and a crash reruns only what was in flight.
SUB_BATCHES_PER_TASK = 32
#: The same on a CPU, where one full-size image takes seconds: a drain (Ctrl-C, --deadline) waits
#: for the task in flight, so it stays short; 4 already hide most reads and writes of small models.
CPU_SUB_BATCHES_PER_TASK = 4


def batch_for_free_memory(free_bytes: int) -> int:
    """Images per forward pass that ``free_bytes`` of GPU memory allow: at least 1, at most
    ``MAX_AUTO_BATCH``, planning for ``GPU_MEMORY_HEADROOM`` of the free memory."""
    share = free_bytes / 2**30 * GPU_MEMORY_HEADROOM
    return max(1, min(MAX_AUTO_BATCH, int((share - GIB_BASE) / GIB_PER_IMAGE)))


def task_size(batch: int, cuda: bool) -> int:
    """Items per task the engine asks for: several sub-batches, so that the I/O threads read the
    next sub-batch and write the last one while the model runs."""
    return batch * (SUB_BATCHES_PER_TASK if cuda else CPU_SUB_BATCHES_PER_TASK)
