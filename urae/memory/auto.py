"""memory = "auto": the configuration for a GPU of a given size.

The order of preference: nothing moved (all resident); then lossless configurations (activation offload,
block swap), fewest bytes moved per step first, since their copies overlap compute on a side stream;
fp8 storage only when no lossless configuration fits, because it changes the base weights' values.
A configuration fits when its estimated peak is within `usable_bytes(total)`: the estimate counts
tensors only, so the CUDA context, cuBLAS workspaces and the allocator's fragmentation get a margin.
"""

from __future__ import annotations

from urae.memory.estimate import N_DOUBLE, N_SINGLE, bytes_moved_per_step, estimate_peak_bytes
from urae.memory.options import MemoryConfigError, MemoryOptions

GiB = 2**30
MARGIN_BYTES = GiB  # CUDA context (0.3-0.6 GiB) and library workspaces
MARGIN_FRACTION = 0.05  # caching-allocator fragmentation


def usable_bytes(total_gpu_bytes: int) -> int:
    return int(total_gpu_bytes * (1 - MARGIN_FRACTION)) - MARGIN_BYTES


def candidates(n_blocks: int = N_DOUBLE + N_SINGLE):
    for fp8 in (False, True):
        for offload in (False, True):
            for swap in range(n_blocks):
                yield MemoryOptions(blocks_to_swap=swap, fp8_base=fp8, offload_activations=offload)


def choose_memory(total_gpu_bytes: int, width: int, height: int, batch_size: int = 1, rank: int = 16,
                  gradient_checkpointing: bool = True) -> tuple[MemoryOptions, int]:
    """(options, estimated peak bytes) for one FLUX.1-dev training process on a GPU of `total_gpu_bytes`."""
    if not gradient_checkpointing:
        raise MemoryConfigError("memory = auto needs gradient_checkpointing = true")
    budget = usable_bytes(total_gpu_bytes)
    best, smallest = None, None
    for options in candidates():
        peak = estimate_peak_bytes(options, width, height, batch_size, rank)
        smallest = peak if smallest is None else min(smallest, peak)
        if peak > budget:
            continue
        key = (options.fp8_base, bytes_moved_per_step(options, width, height, batch_size), options.blocks_to_swap)
        if best is None or key < best[0]:
            best = (key, options, peak)
    if best is None:
        raise MemoryConfigError(f"no memory configuration fits {total_gpu_bytes / GiB:.1f} GiB at {width}x{height} "
                                f"batch {batch_size}: the smallest needs ~{(smallest + MARGIN_BYTES) / GiB:.1f} GiB "
                                f"with the margin; lower the resolution or batch size, or use more GPUs (FSDP)")
    return best[1], best[2]
