"""Peak device memory and host <-> device traffic of one FLUX.1-dev training step, per MemoryOptions.

The peak is a sum of parts that follow from the model's sizes, plus one fitted part: the working memory
of one block's recompute and backward (plus the step's non-block activations), which grows with the
number of tokens. Its two coefficients come from the fake-tensor measurement of the all-resident step
(`python benchmarks/bench_memory.py --configs resident`); the other rows of that table check the sum.
"""

from __future__ import annotations

from urae.memory.options import MemoryOptions

# FLUX.1-dev's FluxTransformer2DModel, counted on the meta device: parameters per block and in its Linears.
DOUBLE_PARAMS, DOUBLE_LINEAR = 339_831_296, 339_830_784
SINGLE_PARAMS, SINGLE_LINEAR = 141_591_808, 141_591_552
OTHER_PARAMS = 64_124_992  # embedders, final norm and projection: always resident, never fp8
N_DOUBLE, N_SINGLE = 19, 38
HIDDEN = 3072
TXT_TOKENS = 512
URAE_TARGETS = 190  # 3072 x 3072 Linears
# Adapter bytes per rank and target: down [r, 3072] + up [3072, r] in fp32 (parameter, frozen copy, gradient,
# two AdamW moments).
ADAPTER_BYTES_PER_RANK = URAE_TARGETS * 2 * HIDDEN * 4 * 5

# Fitted: working bytes = WORK_PER_TOKEN * tokens + WORK_FIXED (bench_memory.py, resident rows at 1024/2048/4096).
WORK_PER_TOKEN = 0
WORK_FIXED = 0


def tokens(width: int, height: int, batch_size: int = 1) -> int:
    return batch_size * ((width // 16) * (height // 16) + TXT_TOKENS)


def _block_bytes(i: int, fp8: bool) -> int:
    params, linear = (DOUBLE_PARAMS, DOUBLE_LINEAR) if i < N_DOUBLE else (SINGLE_PARAMS, SINGLE_LINEAR)
    return (params - linear) * 2 + linear * (1 if fp8 else 2)


def swapped_bytes(options: MemoryOptions) -> list[int]:
    n = N_DOUBLE + N_SINGLE
    return [_block_bytes(i, options.fp8_base) for i in range(n - options.blocks_to_swap, n)]


def weight_bytes(options: MemoryOptions) -> int:
    """Weights on the device: non-block parts, resident blocks, and the two swapped blocks in flight."""
    n = N_DOUBLE + N_SINGLE
    resident = sum(_block_bytes(i, options.fp8_base) for i in range(n - options.blocks_to_swap))
    window = sorted(swapped_bytes(options), reverse=True)[:2]
    return OTHER_PARAMS * 2 + resident + sum(window)


def checkpoint_bytes(width: int, height: int, batch_size: int = 1) -> int:
    """The inputs every checkpointed block keeps for backward (bf16 hidden states of all its tokens)."""
    return (N_DOUBLE + N_SINGLE) * tokens(width, height, batch_size) * HIDDEN * 2


def estimate_peak_bytes(options: MemoryOptions, width: int, height: int, batch_size: int = 1, rank: int = 16,
                        gradient_checkpointing: bool = True) -> int:
    """Device bytes at the peak of one training step (no CUDA context, no fragmentation: see auto.MARGIN_*)."""
    if not gradient_checkpointing:
        raise ValueError("the estimate covers training with gradient checkpointing only (the URAE recipes)")
    n_tok = tokens(width, height, batch_size)
    per_block_input = n_tok * HIDDEN * 2
    peak = weight_bytes(options) + ADAPTER_BYTES_PER_RANK * rank + WORK_PER_TOKEN * n_tok + WORK_FIXED
    if options.offload_activations:
        peak += 2 * per_block_input  # the block in backward and the prefetched previous one
    else:
        peak += checkpoint_bytes(width, height, batch_size)
    if options.fp8_base:
        peak += DOUBLE_LINEAR * 2  # one block's upcast weights live through its recompute and backward
    return int(peak)


def bytes_moved_per_step(options: MemoryOptions, width: int, height: int, batch_size: int = 1) -> int:
    """Host <-> device bytes of one step: swapped blocks come in for forward and again for backward (the last
    one stays between them); checkpointed inputs go out and come back."""
    sw = swapped_bytes(options)
    moved = 2 * sum(sw) - (sw[-1] if sw else 0)
    if options.offload_activations:
        moved += 2 * checkpoint_bytes(width, height, batch_size)
    return moved
