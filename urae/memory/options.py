"""The memory options of a training run and the checks that refuse impossible combinations."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


class MemoryConfigError(ValueError):
    """An impossible memory setting; the message is one line for the user."""


@dataclass(frozen=True)
class MemoryOptions:
    blocks_to_swap: int = 0  # the last N blocks (in execution order) live in host memory, copied in before they run
    fp8_base: bool = False  # frozen Linear weights of the blocks stored as float8_e4m3fn, upcast per layer
    offload_activations: bool | str = False  # checkpointed block inputs wait in pinned host memory, or "disk"
    checkpoint_segments: int = 1  # k > 1: keep one block input in k, rebuild the others in backward

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"blocks_to_swap = {self.blocks_to_swap}"] if self.blocks_to_swap else []
        parts += ["fp8_base"] if self.fp8_base else []
        parts += (["offload_activations = disk"] if self.offload_activations == "disk" else
                  ["offload_activations"] if self.offload_activations else [])
        parts += [f"checkpoint_segments = {self.checkpoint_segments}"] if self.checkpoint_segments > 1 else []
        return ", ".join(parts) or "all resident"


def block_count(transformer_or_count) -> int:
    if isinstance(transformer_or_count, int):
        return transformer_or_count
    if isinstance(transformer_or_count, (tuple, list)):
        return sum(int(n) for n in transformer_or_count)
    return len(transformer_or_count.transformer_blocks) + len(transformer_or_count.single_transformer_blocks)


def float8_problem(device) -> str | None:
    """Why `device` cannot store float8 weights and cast them back, or None. A real cast, not a version table:
    storage needs only the cast kernels, which some backends (MPS, old builds) lack."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        return f"this torch {torch.__version__} has no float8_e4m3fn"
    try:
        x = torch.tensor([0.5, -1.0], device=device)
        back = x.to(dtype).to(torch.bfloat16)
        if torch.device(device).type != "meta" and back.float().cpu().tolist() != [0.5, -1.0]:
            return "a float8 round trip changes exact values"
    except Exception as e:  # noqa: BLE001 - any failure means no float8 storage here
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_memory_options(options: MemoryOptions, transformer_or_block_counts, device,
                         gradient_checkpointing: bool = True) -> None:
    """Raise MemoryConfigError with one line for a setting that cannot work; silent otherwise."""
    n = block_count(transformer_or_block_counts)
    swap = options.blocks_to_swap
    if not isinstance(swap, int) or isinstance(swap, bool) or swap < 0:
        raise MemoryConfigError(f"blocks_to_swap = {swap!r}: expected a whole number >= 0")
    if swap >= n:
        raise MemoryConfigError(f"blocks_to_swap = {swap}: the transformer has {n} blocks, so at most {n - 1} "
                                f"can be swapped (one block must stay on the device)")
    if options.offload_activations not in (False, True, "disk"):
        raise MemoryConfigError(f"offload_activations = {options.offload_activations!r}: expected true, false or "
                                f"\"disk\"")
    k = options.checkpoint_segments
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise MemoryConfigError(f"checkpoint_segments = {k!r}: expected a whole number from 1 (off) to {n}")
    if k > 1 and options.offload_activations:
        raise MemoryConfigError("checkpoint_segments and offload_activations are two answers to the same shortage "
                                "of memory for the block inputs: choose one")
    if not gradient_checkpointing:
        # Without recompute, autograd keeps every block's weights for backward: swapping would free nothing and
        # there are no checkpointed inputs to offload.
        if swap:
            raise MemoryConfigError("blocks_to_swap needs gradient_checkpointing = true for training")
        if options.offload_activations:
            raise MemoryConfigError("offload_activations needs gradient_checkpointing = true (it offloads the "
                                    "checkpointed block inputs)")
        if k > 1:
            raise MemoryConfigError("checkpoint_segments needs gradient_checkpointing = true")
    if options.fp8_base:
        why = float8_problem(device)
        if why:
            raise MemoryConfigError(f"fp8_base: {device} cannot store float8 weights ({why}); set fp8_base = false")
