"""Fit training into the GPU's memory: block swap, fp8 base weights, activation offload (pinned or disk),
two-level checkpointing, and the choice.

    options = MemoryOptions(blocks_to_swap=20, fp8_base=False, offload_activations=True)  # or "disk"
    check_memory_options(options, transformer, device)        # MemoryConfigError: one line for the user
    handle = setup_memory(transformer, options, device)       # after apply_to and the minor SVD
    ...train...                                               # handle.step_stats(): transfers of this step
    handle.remove()                                           # before the adapter's restore()
    estimate_peak_bytes(options, 4096, 4096)                   # one FLUX.1-dev training step, device bytes
    options, peak = choose_memory(torch.cuda.get_device_properties(0).total_memory, 4096, 4096,
                                  fixed={"fp8_base": False})  # the keys the user set; auto picks the rest

setup_memory moves what stays resident to the device itself: keep the transformer in host memory until
then, so a 16 or 24 GiB GPU never holds all 22 GiB of bf16 weights at once. The minor SVD must run before
it (it reads the full-precision weights, and a swapped block's weights are not on the device).

- `blocks_to_swap = N`: the last N of the 57 blocks (execution order) keep their weights on the host, in
  the memory-mapped file's pages when the file holds the training dtype (else one exact-size converted
  copy); each passes through a two-buffer pinned staging ring into one of two reusable device buffers
  just before its forward and its recompute, and stays for its backward. Lossless. Needs checkpointing.
- `fp8_base`: the blocks' Linear layers (weights and biases) are stored as float8_e4m3fn and upcast per
  layer (diffusers' layerwise casting). Lossy: see benchmarks/bench_fp8_minor.py for its size next to the
  minor components.
- `offload_activations`: the checkpointed block inputs (the blocks' hidden states) wait in pinned host
  memory, or with "disk" in an unlinked file, for backward and are prefetched one block ahead. Lossless.
- `checkpoint_segments = k`: one block input in k is kept; backward rebuilds a segment's inputs with one
  more forward of its blocks. Lossless, about one extra forward per step. Needs gradient checkpointing.
- Pinned host memory is exact (urae.memory.pinned: registered host buffers, not torch's power-of-two
  blocks), and `host_bytes` / `host_memory` count what those buffers hold.
- `choose_memory` (memory = "auto"): among configurations whose estimate plus the margin fits the GPU and
  whose host memory fits the pinned budget and the RAM, the lossless one with the shortest step floor
  (estimate.step_costs), the disk last; fp8 only when nothing lossless fits.
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
