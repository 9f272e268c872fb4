"""memory = "auto": the configuration for a GPU of a given size on a machine with a given host RAM.

A configuration fits when its estimated device peak is within `usable_bytes(total)` (the estimate counts
tensors only, so the CUDA context, cuBLAS workspaces and the allocator's fragmentation get a margin), its
pinned host memory within `host_budget_bytes`, and its pinned plus converted host memory within the RAM
the run may use (`host_ram_bytes`). Among those, lossless ones first (fp8 storage changes the base
weights' values), and among them the disk last (its writes wear the SSD); then the shortest step by its floors (urae.memory.estimate.step_costs: the compute,
with the extra forward of checkpoint segments; PCIe traffic; disk traffic, including weights read again
when the page cache cannot keep the swapped blocks), since copies overlap compute on a side stream;
then the fewest bytes moved.
"""

from __future__ import annotations

from urae.memory.estimate import N_DOUBLE, N_SINGLE, REFERENCE_FLOPS, estimate_peak_bytes, step_costs
from urae.memory.options import MemoryConfigError, MemoryOptions

GiB = 2**30
MARGIN_BYTES = int(1.25 * GiB)  # CUDA context (0.3-0.6 GiB), cuBLAS/attention workspaces, a spare
MARGIN_FRACTION = 0.05  # caching-allocator fragmentation
SEGMENTS = range(2, 9)  # checkpoint_segments tried: sqrt(57) ~ 7.5 holds the fewest inputs


HOST_RESERVE_BYTES = 6 * GiB  # the system, the desktop and this process's own code, tensors and data loader
PINNED_FRACTION = 0.7  # pinned pages cannot be swapped out: leave the rest of the machine room
MAX_FRACTION = 0.9  # never plan past 90 % of the card: fragmentation grows with the activations' sizes


def usable_bytes(total_gpu_bytes: int) -> int:
    return min(int(total_gpu_bytes * (1 - MARGIN_FRACTION)) - MARGIN_BYTES, int(total_gpu_bytes * MAX_FRACTION))


def host_limits(total_ram_bytes: int, processes: int = 1, available_bytes: int | None = None) -> tuple[int, int]:
    """(pinned budget, RAM for pinned + converted + page-cached weights) of one of `processes` training processes
    on a machine with `total_ram_bytes` (and `available_bytes` free now, page cache included)."""
    ram = total_ram_bytes - HOST_RESERVE_BYTES
    if available_bytes is not None:
        ram = min(ram, available_bytes)
    return int(PINNED_FRACTION * total_ram_bytes / processes), max(0, ram // processes)


def candidates(n_blocks: int = N_DOUBLE + N_SINGLE):
    activations = [(False, 1), *((False, k) for k in SEGMENTS), (True, 1), ("disk", 1)]
    for fp8 in (False, True):
        for offload, k in activations:
            for swap in range(n_blocks):
                yield MemoryOptions(blocks_to_swap=swap, fp8_base=fp8, offload_activations=offload,
                                    checkpoint_segments=k)


def choose_memory(total_gpu_bytes: int, width: int, height: int, batch_size: int = 1, rank: int = 16,
                  gradient_checkpointing: bool = True, host_budget_bytes: int | None = None,
                  fixed: dict | None = None, host_ram_bytes: int | None = None, weights_in_page_cache: bool = True,
                  flops_per_s: float = REFERENCE_FLOPS) -> tuple[MemoryOptions, int]:
    """(options, estimated peak bytes) for one FLUX.1-dev training process on a GPU of `total_gpu_bytes`.

    `host_budget_bytes` bounds the pinned host memory; `host_ram_bytes` is the RAM this process may use for
    pinned, converted and page-cached weights (None: unbounded); `weights_in_page_cache`: the swapped weights
    can stay in the memory-mapped file (it holds them in the training dtype). `fixed` holds the options the
    user set explicitly ({"fp8_base": True}): auto chooses only the rest.
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
        cost = step_costs(options, width, height, batch_size, host_ram_bytes, weights_in_page_cache, flops_per_s)
        if host_budget_bytes is not None and cost["pinned"] > host_budget_bytes:
            continue
        if host_ram_bytes is not None and cost["pinned"] + cost["converted"] > host_ram_bytes:
            continue
        peak = estimate_peak_bytes(options, width, height, batch_size, rank)
        smallest = peak if smallest is None else min(smallest, peak)
        if peak > budget:
            continue
        # the disk last among lossless ones: hundreds of TB per run wear an SSD (README, "Fit your GPU")
        key = (options.fp8_base, options.offload_activations == "disk", round(cost["step_s"], 3), cost["pcie_bytes"] + cost["disk_bytes"],
               options.blocks_to_swap, options.checkpoint_segments)
        if best is None or key < best[0]:
            best = (key, options, peak)
    if best is None:
        host = f" within {host_budget_bytes / GiB:.1f} GiB of pinned host memory" if host_budget_bytes is not None else ""
        host += f" and {host_ram_bytes / GiB:.1f} GiB of RAM" if host_ram_bytes is not None else ""
        if smallest is None:
            raise MemoryConfigError(f"no memory configuration has {fixed}{host}")
        need = (smallest + MARGIN_BYTES) / (1 - MARGIN_FRACTION)
        raise MemoryConfigError(f"no memory configuration fits {total_gpu_bytes / GiB:.1f} GiB at {width}x{height} "
                                f"batch {batch_size}{host}: the smallest needs a {need / GiB:.1f} GiB GPU; lower the "
                                f"resolution or batch size, or shard the model over several GPUs (FSDP)")
    return best[1], best[2]
