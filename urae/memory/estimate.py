"""Peak device memory, host memory and traffic of one FLUX.1-dev training step, per MemoryOptions.

The peak is a sum of parts that follow from the model's sizes, plus one fitted part: the working memory
of one block's recompute and backward (plus the step's non-block activations), which grows with the
number of tokens. Its two coefficients come from the fake-tensor measurement of the all-resident step
(`python benchmarks/bench_memory.py --configs resident`); the other rows of that table check the sum.

Host memory is counted as urae.memory allocates it: pinned buffers are exact (urae.memory.pinned: the
payload, each tensor aligned to 256 bytes, each buffer to a 4 KiB page), swapped weights stay in the page
cache when the file holds them in the training dtype, and only converted weights take a host copy.
Weight loads follow the block-swap schedule itself (`swap_loads` replays its rules), so the counts equal
what `TransferStats` reports on a real run.
"""

from __future__ import annotations

import functools

from urae.memory.activations import DISK_RING
from urae.memory.block_swap import DEVICE_BUFFERS, RING
from urae.memory.options import MemoryOptions
from urae.memory.pinned import aligned, page_bytes

# FLUX.1-dev's FluxTransformer2DModel, counted on the meta device: parameters per block and in its Linears.
DOUBLE_PARAMS, DOUBLE_LINEAR = 339_831_296, 339_830_784
SINGLE_PARAMS, SINGLE_LINEAR = 141_591_808, 141_591_552
OTHER_PARAMS = 64_124_992  # embedders, final norm and projection: always resident, never fp8
N_DOUBLE, N_SINGLE = 19, 38
HIDDEN = 3072
TXT_TOKENS = 512
URAE_TARGETS = 190  # 3072 x 3072 Linears
# Adapter bytes per rank: down [r, 3072] + up [3072, r] per target, fp32 parameter, frozen copy, gradient and
# Prodigy's four states (the recipes' optimizer; AdamW keeps two).
ADAPTER_BYTES_PER_RANK = URAE_TARGETS * 2 * HIDDEN * 4 * 7

# Fitted to the all-resident rows of `python benchmarks/bench_memory.py` (1024², 2048², 4096²; residuals
# under 0.001 GiB), less the adapter as that count holds it (bf16, AdamW: 10 bytes per parameter):
# working bytes = WORK_PER_TOKEN * tokens + WORK_FIXED.
WORK_PER_TOKEN = 173_858  # 0.000162 GiB per token
WORK_FIXED = -102_490_000  # -0.10 GiB
# Measured the same way (0.12 GiB at every size): fp8's upcast copies alive at the peak.
FP8_EXTRA = 130_000_000


PCIE_BYTES_PER_S = 25e9  # PCIe 4.0 x16 in practice
DISK_BYTES_PER_S = 2e9  # a good NVMe SSD, sustained
REFERENCE_FLOPS = 165e12  # dense bf16 of an RTX 4090 (the 24 GB class): the compute floor auto compares against


def tokens(width: int, height: int, batch_size: int = 1) -> int:
    return batch_size * ((width // 16) * (height // 16) + TXT_TOKENS)


def _block_bytes(i: int, fp8: bool) -> int:
    params, linear = (DOUBLE_PARAMS, DOUBLE_LINEAR) if i < N_DOUBLE else (SINGLE_PARAMS, SINGLE_LINEAR)
    return (params - linear) * 2 + linear * (1 if fp8 else 2)


def swapped_bytes(options: MemoryOptions) -> list[int]:
    n = N_DOUBLE + N_SINGLE
    return [_block_bytes(i, options.fp8_base) for i in range(n - options.blocks_to_swap, n)]


def weight_bytes(options: MemoryOptions) -> int:
    """Weights on the device: non-block parts, resident blocks, and the two buffers swapped blocks take turns in."""
    n = N_DOUBLE + N_SINGLE
    resident = sum(_block_bytes(i, options.fp8_base) for i in range(n - options.blocks_to_swap))
    sw = swapped_bytes(options)
    return OTHER_PARAMS * 2 + resident + (DEVICE_BUFFERS * max(sw) if sw else 0)


def block_input_bytes(width: int, height: int, batch_size: int = 1) -> int:
    """One block's checkpointed inputs: bf16 hidden states of the image and the text tokens."""
    return tokens(width, height, batch_size) * HIDDEN * 2


def _input_parts(width: int, height: int, batch_size: int) -> list[int]:
    n_img = batch_size * (width // 16) * (height // 16)
    return [n_img * HIDDEN * 2, batch_size * TXT_TOKENS * HIDDEN * 2]


def segment_starts(n: int, k: int) -> list[int]:
    return list(range(0, n, max(1, k)))


def live_inputs(options: MemoryOptions, n: int = N_DOUBLE + N_SINGLE) -> int:
    """Block inputs held on the device at the peak: all n, or with segments of k, while segment j is rebuilt in
    backward, the starts of segments 0..j and the inputs rebuilt inside segment j (about n/k + k)."""
    k = options.checkpoint_segments
    if k <= 1:
        return n
    starts = segment_starts(n, k)
    return max(j + 1 + min(k, n - s) - 1 for j, s in enumerate(starts))


def replayed_blocks(n: int, k: int) -> list[int]:
    """Blocks run once more in backward to rebuild a segment's inputs (all but each segment's last)."""
    if k <= 1:
        return []
    return [i for s in segment_starts(n, k) for i in range(s, min(s + k, n) - 1)]


def checkpoint_bytes(width: int, height: int, batch_size: int = 1, options: MemoryOptions | None = None) -> int:
    """The checkpointed block inputs kept on the device for backward."""
    live = live_inputs(options) if options is not None else N_DOUBLE + N_SINGLE
    return live * block_input_bytes(width, height, batch_size)


def estimate_peak_bytes(options: MemoryOptions, width: int, height: int, batch_size: int = 1, rank: int = 16,
                        gradient_checkpointing: bool = True) -> int:
    """Device bytes at the peak of one training step (no CUDA context, no fragmentation: see auto.MARGIN_*)."""
    if not gradient_checkpointing:
        raise ValueError("the estimate covers training with gradient checkpointing only (the URAE recipes)")
    n_tok = tokens(width, height, batch_size)
    per_block_input = n_tok * HIDDEN * 2
    work = max(0, WORK_PER_TOKEN * n_tok + WORK_FIXED)
    peak = weight_bytes(options) + ADAPTER_BYTES_PER_RANK * rank + work
    if options.blocks_to_swap or options.offload_activations or options.checkpoint_segments > 1:
        # urae.memory's checkpoint function holds a block's output gradients and input gradients at once
        # (measured: 2 block inputs more than torch's non-reentrant checkpoint)
        peak += 2 * per_block_input
    if options.offload_activations:
        peak += 2 * per_block_input  # the block in backward and the prefetched previous one
    else:
        peak += checkpoint_bytes(width, height, batch_size, options)
    if options.fp8_base:
        peak += FP8_EXTRA
    return int(peak)


@functools.lru_cache(maxsize=4096)
def swap_loads(n: int, swapped: int, segments: int = 1) -> tuple[int, ...]:
    """How many times each block is copied in during one step, by the rules of urae.memory.block_swap (forward,
    the segment rebuilds and the recompute of backward), replayed on block indices."""
    first = n - swapped
    loads = [0] * n
    loaded, pending, occupant = set(), set(), [None] * DEVICE_BUFFERS

    def prefetch(i):
        if 0 <= i < n and i >= first and i not in loaded and i not in pending:
            s = i % DEVICE_BUFFERS
            if occupant[s] not in (None, i):
                pending.discard(occupant[s])
                loaded.discard(occupant[s])
            occupant[s] = i
            pending.add(i)
            loads[i] += 1

    def run(i, recomputing):
        if i >= first and i not in loaded:
            prefetch(i)
            pending.discard(i)
            loaded.add(i)
        prefetch(i - 1 if recomputing else i + 1)
        if not recomputing and i != n - 1:
            loaded.discard(i)

    for i in range(n):
        run(i, False)
    starts, rebuilt = set(segment_starts(n, segments)), set()
    for i in reversed(range(n)):
        if segments > 1 and i not in starts and i not in rebuilt:
            s = max(j for j in starts if j <= i)
            for j in range(s, i):
                run(j, False)
            rebuilt.update(range(s + 1, i + 1))
        run(i, True)
        loaded.discard(i)
    return tuple(loads)


def weight_bytes_moved(options: MemoryOptions) -> int:
    n = N_DOUBLE + N_SINGLE
    loads = swap_loads(n, options.blocks_to_swap, options.checkpoint_segments)
    return sum(c * _block_bytes(i, options.fp8_base) for i, c in enumerate(loads))


def host_memory(options: MemoryOptions, width: int, height: int, batch_size: int = 1,
                weights_in_page_cache: bool = True) -> dict:
    """Host memory of the options, by kind (bytes):

    pinned: the staging ring of block swap, the offloaded block inputs (or the disk's staging ring), exact;
    converted: swapped weights that differ from the file (fp8 storage, another dtype), one plain buffer;
    page_cache: swapped weights read from the memory-mapped file (evictable; re-read from disk if RAM is short);
    disk: the activation file's size.
    """
    sw = swapped_bytes(options)
    # the ring holds RING of the largest swapped block (FLUX's tensors are all multiples of 256 bytes: no padding)
    pinned = page_bytes(RING * max(sw)) if sw else 0
    converted = page_bytes(sum(sw)) if sw and (options.fp8_base or not weights_in_page_cache) else 0
    page_cache = sum(sw) if sw and not converted else 0
    parts = [aligned(b) for b in _input_parts(width, height, batch_size)]
    n = N_DOUBLE + N_SINGLE
    disk = 0
    if options.offload_activations == "disk":
        pinned += page_bytes(DISK_RING * sum(parts))
        disk = n * sum(parts)
    elif options.offload_activations:
        pinned += page_bytes(n * sum(parts))
    return {"pinned": pinned, "converted": converted, "page_cache": page_cache, "disk": disk}


def host_bytes(options: MemoryOptions, width: int, height: int, batch_size: int = 1) -> int:
    """Pinned host memory the options hold, exactly as urae.memory.pinned allocates it."""
    return host_memory(options, width, height, batch_size)["pinned"]


def bytes_moved_per_step(options: MemoryOptions, width: int, height: int, batch_size: int = 1) -> int:
    """Host <-> device bytes of one step: swapped blocks as their schedule loads them; offloaded inputs out
    and back."""
    moved = weight_bytes_moved(options)
    if options.offload_activations:
        moved += 2 * (N_DOUBLE + N_SINGLE) * block_input_bytes(width, height, batch_size)
    return moved


def step_flops(width: int, height: int, batch_size: int = 1, segments: int = 1) -> float:
    """Matmul FLOPs of one step: forward, recompute and the input-gradient backward (3 passes over the blocks;
    frozen weights need no weight gradient), plus the segment rebuilds."""
    n, d, t = N_DOUBLE + N_SINGLE, HIDDEN, tokens(width, height, batch_size)
    per_block = 24 * d * d * t + 4 * d * t * t
    return per_block * (3 * n + len(replayed_blocks(n, segments)))


def step_costs(options: MemoryOptions, width: int, height: int, batch_size: int = 1,
               host_ram_bytes: int | None = None, weights_in_page_cache: bool = True,
               flops_per_s: float = REFERENCE_FLOPS) -> dict:
    """What one step costs beyond its memory: traffic, and the time floors it sets (transfers overlap compute,
    so the step takes at least the largest of them). When `host_ram_bytes` cannot hold the pinned and converted
    memory plus the swapped weights' pages, those pages are read from disk again at every load."""
    host = host_memory(options, width, height, batch_size, weights_in_page_cache)
    pcie = bytes_moved_per_step(options, width, height, batch_size)
    disk = 2 * host["disk"]  # written in forward, read back in backward
    reread = 0
    if host_ram_bytes is not None and host["pinned"] + host["converted"] + host["page_cache"] > host_ram_bytes:
        reread = weight_bytes_moved(options)
    flops = step_flops(width, height, batch_size, options.checkpoint_segments)
    floors = {"compute_s": flops / flops_per_s, "pcie_s": pcie / PCIE_BYTES_PER_S,
              "disk_s": (disk + reread) / DISK_BYTES_PER_S}
    return {**host, "pcie_bytes": pcie, "disk_bytes": disk, "reread_bytes": reread, "flops": flops, **floors,
            "step_s": max(floors.values()),
            "extra_flops": flops / step_flops(width, height, batch_size) - 1}

