"""Fit training into the GPU's memory: block swap, fp8 base weights, activation offload, and the choice.

    options = MemoryOptions(blocks_to_swap=20, fp8_base=False, offload_activations=True)
    check_memory_options(options, transformer, device)        # MemoryConfigError: one line for the user
    handle = setup_memory(transformer, options, device)       # after apply_to and the minor SVD
    ...train...                                               # handle.stats: transfers so far
    handle.remove()                                           # before the adapter's restore()
    estimate_peak_bytes(options, 4096, 4096)                   # one FLUX.1-dev training step, device bytes
    options, peak = choose_memory(torch.cuda.get_device_properties(0).total_memory, 4096, 4096,
                                  fixed={"fp8_base": False})  # the keys the user set; auto picks the rest

setup_memory moves what stays resident to the device itself: keep the transformer in host memory until
then, so a 16 or 24 GiB GPU never holds all 22 GiB of bf16 weights at once. The minor SVD must run before
it (it reads the full-precision weights, and a swapped block's weights are not on the device).

- `blocks_to_swap = N`: the last N of the 57 blocks (execution order) keep their weights in pinned host
  memory; each is copied in on a side stream just before its forward and its recompute, stays for its
  backward, then its device memory is released. Lossless. Needs gradient checkpointing.
- `fp8_base`: the blocks' Linear layers (weights and biases) are stored as float8_e4m3fn and upcast per
  layer (diffusers' layerwise casting). Lossy: see benchmarks/bench_fp8_minor.py for its size next to the
  minor components.
- `offload_activations`: the checkpointed block inputs wait in pinned host memory for backward and are
  prefetched one block ahead. Lossless. Needs gradient checkpointing.
- `choose_memory` (memory = "auto"): the lossless configuration that moves the fewest bytes per step and
  whose estimate plus the margin fits (and, given `host_budget_bytes`, whose pinned host memory fits);
  fp8 only when nothing lossless fits.
"""

from urae.memory.auto import MARGIN_BYTES, MARGIN_FRACTION, choose_memory, usable_bytes
from urae.memory.estimate import bytes_moved_per_step, estimate_peak_bytes, host_bytes
from urae.memory.install import MemoryHandle, setup_memory, transformer_blocks
from urae.memory.options import MemoryConfigError, MemoryOptions, check_memory_options

__all__ = [
    "MARGIN_BYTES", "MARGIN_FRACTION", "MemoryConfigError", "MemoryHandle", "MemoryOptions", "bytes_moved_per_step",
    "check_memory_options", "choose_memory", "estimate_peak_bytes", "host_bytes", "setup_memory", "transformer_blocks",
    "usable_bytes",
]
