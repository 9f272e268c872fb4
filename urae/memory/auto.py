"""memory = "auto": the configuration for a GPU of a given size.

The order of preference: nothing moved (all resident); then lossless configurations (activation offload,
block swap), fewest bytes moved per step first, since their copies overlap compute on a side stream;
fp8 storage only when no lossless configuration fits, because it changes the base weights' values.
A configuration fits when its estimated peak is within `usable_bytes(total)`: the estimate counts
tensors only, so the CUDA context, cuBLAS workspaces and the allocator's fragmentation get a margin.
"""

from __future__ import annotations

from urae.memory.estimate import N_DOUBLE, N_SINGLE, bytes_moved_per_step, estimate_peak_bytes, host_bytes
from urae.memory.options import MemoryConfigError, MemoryOptions

GiB = 2**30
MARGIN_BYTES = int(1.25 * GiB)  # CUDA context (0.3-0.6 GiB), cuBLAS/attention workspaces, a spare
MARGIN_FRACTION = 0.05  # caching-allocator fragmentation


def usable_bytes(total_gpu_bytes: int) -> int:
    return int(total_gpu_bytes * (1 - MARGIN_FRACTION)) - MARGIN_BYTES


def candidates(n_blocks: int = N_DOUBLE + N_SINGLE):
    for fp8 in (False, True):
        for offload in (False, True):
            for swap in range(n_blocks):
                yield MemoryOptions(blocks_to_swap=swap, fp8_base=fp8, offload_activations=offload)


def choose_memory(total_gpu_bytes: int, width: int, height: int, batch_size: int = 1, rank: int = 16,
                  gradient_checkpointing: bool = True, host_budget_bytes: int | None = None,
                  fixed: dict | None = None) -> tuple[MemoryOptions, int]:
    """(options, estimated peak bytes) for one FLUX.1-dev training process on a GPU of `total_gpu_bytes`.

    `host_budget_bytes` bounds the pinned host memory swapped blocks and offloaded inputs may take;
    `fixed` holds the options the user set explicitly ({"fp8_base": True}): auto chooses only the rest.
    """
    if not gradient_checkpointing:
        raise MemoryConfigError("memory = auto needs gradient_checkpointing = true")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(MemoryOptions().to_dict())
    if unknown:
        raise MemoryConfigError(f"unknown memory option(s) {sorted(unknown)}")
    budget = usable_bytes(total_gpu_bytes)
    best, smallest = None, None
    for options in candidates():
        if any(getattr(options, k) != v for k, v in fixed.items()):
            continue
        if host_budget_bytes is not None and host_bytes(options, width, height, batch_size) > host_budget_bytes:
            continue
        peak = estimate_peak_bytes(options, width, height, batch_size, rank)
        smallest = peak if smallest is None else min(smallest, peak)
        if peak > budget:
            continue
        key = (options.fp8_base, bytes_moved_per_step(options, width, height, batch_size), options.blocks_to_swap)
        if best is None or key < best[0]:
            best = (key, options, peak)
    if best is None:
        need = (smallest + MARGIN_BYTES) / (1 - MARGIN_FRACTION)
        host = f" within {host_budget_bytes / GiB:.1f} GiB of host memory" if host_budget_bytes is not None else ""
        if smallest is None:
            raise MemoryConfigError(f"no memory configuration has {fixed}{host}")
        raise MemoryConfigError(f"no memory configuration fits {total_gpu_bytes / GiB:.1f} GiB at {width}x{height} "
                                f"batch {batch_size}{host}: the smallest needs a {need / GiB:.1f} GiB GPU; lower the "
                                f"resolution or batch size, or shard the model over several GPUs (FSDP)")
    return best[1], best[2]
