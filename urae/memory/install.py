"""setup_memory: apply MemoryOptions to a transformer whose adapter is already attached."""

from __future__ import annotations

import tempfile

import torch

from urae.memory.activations import BlockCheckpoint
from urae.memory.block_swap import BlockSwap
from urae.memory.fp8 import Fp8Storage
from urae.memory.options import MemoryOptions, check_memory_options
from urae.memory.transfer import Mover, TransferStats


def transformer_blocks(transformer) -> list:
    """The blocks in execution order: 19 double-stream, then 38 single-stream for FLUX.1."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


class MemoryHandle:
    """What setup_memory installed; `remove()` undoes it (call it before the adapter's own restore)."""

    def __init__(self, transformer, options: MemoryOptions, mover: Mover):
        self.transformer, self.options, self.mover = transformer, options, mover
        self.fp8: Fp8Storage | None = None
        self.swap: BlockSwap | None = None
        self.checkpoint: BlockCheckpoint | None = None
        self._old_checkpointing = None

    @property
    def stats(self) -> TransferStats:
        return self.mover.stats

    def step_stats(self) -> dict:
        """Transfers since the last call: bytes, loads, replays and the waits (the trainer logs them per step)."""
        return self.mover.step()

    def pinned_bytes(self) -> int:
        """Pinned host memory held now (exact: urae.memory.pinned)."""
        return (self.swap.pinned_bytes if self.swap else 0) + (self.checkpoint.pinned_bytes if self.checkpoint else 0)

    def remove(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()
            for m, (enabled, func) in self._old_checkpointing.items():
                m.gradient_checkpointing = enabled
                if func is None:
                    m.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    m._gradient_checkpointing_func = func
            self.checkpoint = None
        if self.swap is not None:
            self.swap.remove()
            self.swap = None
        if self.fp8 is not None:
            self.fp8.remove()
            self.fp8 = None


def _to(module, device: torch.device) -> None:
    # only when something moves: a module already in place is left alone (and fake tensors cannot be re-set)
    if any(t.device != device for t in list(module.parameters()) + list(module.buffers())):
        module.to(device)


def setup_memory(transformer, options: MemoryOptions, device, gradient_checkpointing: bool = True,
                 disk_dir=None, source=None) -> MemoryHandle:
    """Put the resident weights on `device`, swapped blocks in host memory, quantise, install hooks.

    Call after the adapter is attached and its minor components were computed from the full-precision
    weights. `gradient_checkpointing` says whether the run trains with it (the trainer's flag): block swap,
    activation offload and checkpoint segments replace diffusers' checkpoint function with theirs and need it.
    `disk_dir`: the folder of offload_activations = "disk" (default: the system's temporary folder).
    `source(tensor)`: where a swapped weight's host copy already is (default: the memory-mapped file's pages).
    """
    device = torch.device(device)
    check_memory_options(options, transformer, device, gradient_checkpointing)
    blocks = transformer_blocks(transformer)
    mover = Mover(device)
    handle = MemoryHandle(transformer, options, mover)
    compute_dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point())
    if options.fp8_base:
        handle.fp8 = Fp8Storage(blocks, compute_dtype)
    swapped = blocks[len(blocks) - options.blocks_to_swap:] if options.blocks_to_swap else []
    swapped_ids = {id(b) for b in swapped}
    for name, child in transformer.named_children():
        if name not in ("transformer_blocks", "single_transformer_blocks"):
            _to(child, device)
    for b in blocks:
        if id(b) not in swapped_ids:
            _to(b, device)
    if swapped:
        handle.swap = BlockSwap(blocks, options.blocks_to_swap, mover, source)
    if options.blocks_to_swap or options.offload_activations or options.checkpoint_segments > 1:
        modules = [m for m in transformer.modules() if hasattr(m, "gradient_checkpointing")]
        handle._old_checkpointing = {m: (m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
                                     for m in modules}
        handle.checkpoint = BlockCheckpoint(mover, options.offload_activations, handle.swap, blocks[0],
                                            options.checkpoint_segments,
                                            disk_dir if disk_dir is not None else tempfile.gettempdir())
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=handle.checkpoint)
    return handle
