"""Block swap: the last N transformer blocks keep their weights in host memory and borrow device memory
only while they run.

Why by hand: diffusers' group offloading and accelerate's hooks load a block before its forward and
drop it after, and prefetch in forward order. Training with gradient checkpointing runs each block a
second time in backward (recompute, then its backward, which needs the weights again) and in reverse
order. Here a block's weights come in before its forward and before its recompute, stay through its
backward, and leave when `after_backward` says that block is done; the next block in the direction of
travel is prefetched while the current one computes. The weights are frozen, so the host copy is the
master and nothing is ever copied back.

Where the host copy lives: a transformer loaded from safetensors in the dtype of its file is memory-mapped,
so a swapped block's weights simply stay in those pages of the page cache (shared, evictable, not counted
against the process) instead of a second copy. What differs from the file (a dtype conversion, fp8
storage) goes to one exact-size host buffer. Either way a block travels through a small pinned staging
ring (two buffers the size of the largest swapped block: the host packs block i+1 into one while block
i's copy leaves the other) into one of two device buffers that the swapped blocks take in turn (block i
in buffer i % 2, so the running block and the one prefetched beside it never share one). Those buffers
are allocated once; a block's parameters are views into its buffer while it is loaded and empty
tensors otherwise, so a block that was not brought back fails loudly instead of computing with stale
numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from urae.memory.pinned import HostBuffer, aligned
from urae.memory.transfer import Mover, Pending

RING = 2  # staging buffers: the host fills one while the other is being copied to the device
DEVICE_BUFFERS = 2  # the running block and the one prefetched next to it


def _tensors(block: nn.Module):
    return [t for t in list(block.parameters()) + list(block.buffers())]


def safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from .safetensors files (Linux; none elsewhere)."""
    spans: list[list] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    if spans and spans[-1][1] == a and spans[-1][2] == parts[5]:
                        spans[-1][1] = b  # one mapping listed in pieces
                    else:
                        spans.append([a, b, parts[5]])
    except OSError:
        return []
    return [(a, b) for a, b, _ in spans]


def page_cache_source(mappings: list[tuple[int, int]]):
    """The default `source` of block swap: a host tensor that is a view of a mapped .safetensors file stays
    where it is (its pages are the file's, in the page cache); anything else returns None (converted)."""
    def source(t: torch.Tensor):
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        try:
            p, n = t.data_ptr(), t.nbytes
        except RuntimeError:  # fake tensors have no address
            return None
        return t if any(a <= p and p + n <= b for a, b in mappings) else None

    return source


class BlockSwap:
    def __init__(self, blocks: list[nn.Module], blocks_to_swap: int, mover: Mover, source=None):
        self.blocks = blocks
        self.mover = mover
        self.first_swapped = len(blocks) - blocks_to_swap
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.pending: dict[int, Pending] = {}
        self.loaded: set[int] = set()
        self.recomputing = False  # set by the checkpoint function while it reruns a block for backward
        self._handles = []
        source = source or page_cache_source(safetensors_mappings())
        # layout[i]: (parameter, byte offset in a device buffer, its host source); sources found before any move
        self.layout: dict[int, list] = {}
        self.page_cache_bytes = self.converted_bytes = 0
        convert = []
        for i in range(self.first_swapped, len(blocks)):
            entries, off = [], 0
            for t in _tensors(blocks[i]):
                src = source(t.data)
                entries.append([t, off, src])
                off += aligned(t.nbytes)
                if src is None:
                    convert.append(entries[-1])
                    self.converted_bytes += aligned(t.nbytes)
                else:
                    self.page_cache_bytes += t.nbytes
            self.layout[i] = entries
        self.slot_bytes = max(e[-1][1] + aligned(e[-1][0].nbytes) for e in self.layout.values())
        self.converted = HostBuffer(self.converted_bytes, pin=False)
        off = 0
        for e in convert:  # one tensor at a time, so the originals are freed as the buffer fills
            t = e[0]
            e[2] = self.converted.view(off, t.shape, t.dtype)
            e[2].copy_(t.data)
            off += aligned(t.nbytes)
        for i in self.layout:
            for t, _, _ in self.layout[i]:
                t.data = torch.empty(0, dtype=t.dtype, device=mover.device)
        self.staging = HostBuffer(RING * self.slot_bytes, pin=mover.cuda)
        self._stage_events = [None] * RING
        self._next_stage = 0
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=mover.device)
                      for _ in range(DEVICE_BUFFERS)]
        self.occupant: list[int | None] = [None] * DEVICE_BUFFERS
        for b in blocks:
            self._handles.append(b.register_forward_pre_hook(self._before))
            self._handles.append(b.register_forward_hook(self._after))

    @property
    def pinned_bytes(self) -> int:
        return self.staging.nbytes

    def swapped(self, i: int) -> bool:
        return i >= self.first_swapped

    def swapped_block_bytes(self) -> int:
        return sum(src.nbytes for es in self.layout.values() for _, _, src in es)

    # ---- moves ----

    def prefetch(self, i: int) -> None:
        if not (0 <= i < len(self.blocks)) or not self.swapped(i) or i in self.loaded or i in self.pending:
            return
        s = i % DEVICE_BUFFERS
        other = self.occupant[s]
        if other is not None and other != i:
            self._evict(other)
        self.occupant[s] = i
        r = self._next_stage
        self._next_stage = (r + 1) % RING
        if self._stage_events[r] is not None:  # the copy that last read this staging buffer must be done
            self.mover.host_wait(self._stage_events[r].synchronize)
        base, used, payload = r * self.slot_bytes, 0, 0
        for _, off, src in self.layout[i]:
            self.staging.view(base + off, src.shape, src.dtype).copy_(src)  # page cache (or converted) -> pinned
            used, payload = off + src.nbytes, payload + src.nbytes
        # the side stream waits for the compute stream: the block that last used this device buffer is done
        pending = self.mover.to_device(self.staging.data[base:base + used], out=self.slots[s][:used])
        self._stage_events[r] = pending.event
        self.pending[i] = pending
        self.mover.stats.weight_loads += 1
        self.mover.stats.weight_bytes += payload

    def load(self, i: int) -> None:
        if not self.swapped(i) or i in self.loaded:
            return
        self.prefetch(i)
        self.pending.pop(i).wait()
        slot = self.slots[i % DEVICE_BUFFERS]
        for t, off, src in self.layout[i]:
            t.data = slot[off:off + src.nbytes].view(src.dtype).view(src.shape)
        self.loaded.add(i)

    def unload(self, i: int) -> None:
        if i not in self.loaded:
            return
        for t, _, _ in self.layout[i]:
            t.data = torch.empty(0, dtype=t.dtype, device=self.mover.device)
        self.loaded.discard(i)

    def _evict(self, i: int) -> None:
        """Block i leaves its device buffer to another. A prefetch of i still in flight is dropped: the buffer
        is never freed, and the next copy into it runs after that one on the same side stream."""
        self.pending.pop(i, None)
        self.unload(i)

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
        """Bring every block back to the device as ordinary tensors and drop the hooks and buffers."""
        for h in self._handles:
            h.remove()
        self.mover.sync()
        for i in self.layout:
            for t, _, src in self.layout[i]:
                t.data = src.to(self.mover.device, copy=True)
        self.layout.clear()
        self.pending.clear()
        self.loaded.clear()
        self.staging.release()
        self.converted.release()
        self.slots = []
