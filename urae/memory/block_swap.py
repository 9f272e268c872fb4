"""Block swap: the last N transformer blocks keep their weights in host memory and borrow device memory
only while they run.

Why by hand: diffusers' group offloading and accelerate's hooks load a block before its forward and
drop it after, and prefetch in forward order. Training with gradient checkpointing runs each block a
second time in backward (recompute, then its backward, which needs the weights again) and in reverse
order. Here a block's weights come in before its forward and before its recompute, stay through its
backward, and leave when `after_backward` says that block is done; the next block in the direction of
travel is prefetched while the current one computes. The weights are frozen, so the host copy is the
master and nothing is ever copied back: a swapped block costs two host -> device copies per step.

A swapped-out parameter holds an empty device tensor, so a block that was not brought back fails loudly
instead of computing with stale numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from urae.memory.transfer import Mover, Pending


def _tensors(block: nn.Module):
    return [t for t in list(block.parameters()) + list(block.buffers())]


class BlockSwap:
    def __init__(self, blocks: list[nn.Module], blocks_to_swap: int, mover: Mover):
        self.blocks = blocks
        self.mover = mover
        self.first_swapped = len(blocks) - blocks_to_swap
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.host: dict[int, list[torch.Tensor]] = {}
        self.pending: dict[int, list[Pending]] = {}
        self.loaded: set[int] = set()
        self.recomputing = False  # set by the checkpoint function while it reruns a block for backward
        self._handles = []
        for i in range(self.first_swapped, len(blocks)):
            ts = _tensors(blocks[i])
            self.host[i] = [mover.pin(t.data) for t in ts]
            for t in ts:
                t.data = torch.empty(0, dtype=t.dtype, device=mover.device)
        for b in blocks:
            self._handles.append(b.register_forward_pre_hook(self._before))
            self._handles.append(b.register_forward_hook(self._after))

    def swapped(self, i: int) -> bool:
        return i >= self.first_swapped

    def swapped_block_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.host.values() for t in ts)

    # ---- moves ----

    def prefetch(self, i: int) -> None:
        if 0 <= i < len(self.blocks) and self.swapped(i) and i not in self.loaded and i not in self.pending:
            self.pending[i] = [self.mover.to_device(h) for h in self.host[i]]
            self.mover.stats.weight_loads += 1
            self.mover.stats.weight_bytes += sum(h.numel() * h.element_size() for h in self.host[i])

    def load(self, i: int) -> None:
        if not self.swapped(i) or i in self.loaded:
            return
        self.prefetch(i)
        for t, p in zip(_tensors(self.blocks[i]), self.pending.pop(i)):
            t.data = p.wait()
        self.loaded.add(i)

    def unload(self, i: int) -> None:
        if i not in self.loaded:
            return
        for t in _tensors(self.blocks[i]):
            t.data = torch.empty(0, dtype=t.dtype, device=self.mover.device)
        self.loaded.discard(i)

    # ---- hooks ----

    def _before(self, block, args):
        i = self.index[id(block)]
        self.load(i)
        self.prefetch(i - 1 if self.recomputing else i + 1)

    def _after(self, block, args, output):
        i = self.index[id(block)]
        # The last block runs first in backward: keep it. In recompute the weights stay for backward.
        if not self.recomputing and i != len(self.blocks) - 1:
            self.unload(i)

    def after_backward(self, block) -> None:
        self.unload(self.index[id(block)])

    def remove(self) -> None:
        """Bring every block back to the device and drop the hooks."""
        for h in self._handles:
            h.remove()
        for i in self.host:
            self.load(i)
        self.host.clear()
