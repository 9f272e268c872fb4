"""Exact-size pinned host memory.

`Tensor.pin_memory()` and `torch.empty(..., pin_memory=True)` go through torch's caching host allocator
(ATen/core/CachingHostAllocator.h): a request up to `pinned_max_round_threshold` (default SIZE_MAX, in
c10/core/AllocatorConfig.h) is rounded up to the next power of two, so a 648 MiB double block pins 1 GiB
and the 4096² block inputs 28.7 GiB for 21.5 of payload. The rounding could be switched off with
`PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:0` (or `torch._C._accelerator_setAllocatorSettings`),
but that setting is process-wide: it changes every other pinned allocation (the data loader's), replaces
a value the user may have set, and the allocator still keeps freed blocks cached until `empty_cache`.
So the buffers here are ordinary host tensors whose pages are registered with the driver
(`cudaHostRegister`, as torch's own `torch.cuda._pin_memory_utils` does): the pinned size is the payload
rounded to a 4 KiB page, the allocator's rounding and cache stay as they are for everyone else, and
`torch.cuda.host_memory_stats()` does not see them (the CUDA test checks that it stays unchanged).

Without CUDA (tests, the fake-tensor benchmark) a buffer is the same host tensor, unpinned: the code that
carves and reuses it runs unchanged.
"""

from __future__ import annotations

import torch

PAGE = 4096
ALIGN = 256  # every view starts on 256 bytes: any dtype's alignment, and the copy engines' preferred one


def caching_allocator_bytes(nbytes: int, round_threshold: int | None = None) -> int:
    """What torch's caching host allocator takes for one pinned request of `nbytes` (its PowerOf2Ceil rule)."""
    if nbytes <= 0:
        return 0
    if round_threshold is not None and nbytes > round_threshold:
        return nbytes
    return 1 << (nbytes - 1).bit_length()


def aligned(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


def page_bytes(nbytes: int) -> int:
    return aligned(nbytes, PAGE)


class HostBuffer:
    """One exact-size host buffer, pinned by registration on CUDA; views are carved from it by byte offset."""

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = page_bytes(nbytes)
        # whole pages of its own: two buffers never share a page, which the driver would refuse to register twice
        raw = torch.empty(self.nbytes + (PAGE if pin and self.nbytes else 0), dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE if pin and self.nbytes else 0
        self.data = raw[start:start + self.nbytes]
        self.pinned = False
        if pin and self.nbytes:
            from torch.cuda._pin_memory_utils import pin_memory

            pin_memory(self.data.data_ptr(), self.nbytes)
            self.pinned = True

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        return self.data[offset:offset + n].view(dtype).view(shape)

    def release(self) -> None:
        """Unregister and drop the memory; the caller makes sure no copy still reads or writes it."""
        if self.pinned:
            from torch.cuda._pin_memory_utils import unpin_memory

            unpin_memory(self.data.data_ptr())
            self.pinned = False
        self.data = torch.empty(0, dtype=torch.uint8)
        self.nbytes = 0

    def __del__(self):
        if getattr(self, "pinned", False):
            try:
                self.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown: the driver frees it with the process
                pass


class HostStack:
    """Pinned space for the tensors of one step, handed out in order and taken back all at once (`reset`).

    Sized by what the steps asked for: the first step grows it piece by piece; the next `reset` replaces the
    pieces by one buffer of the largest total seen, so from then on it holds exactly one step's payload.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: list[HostBuffer] = []
        self._used: list[int] = []
        self.step_bytes = 0  # what this step took so far
        self.largest_step = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = aligned(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size())
        for k, b in enumerate(self.buffers):
            if self._used[k] + n <= b.nbytes:
                break
        else:
            self.buffers.append(HostBuffer(n, self.pin))
            self._used.append(0)
            k = len(self.buffers) - 1
        t = self.buffers[k].view(self._used[k], shape, dtype)
        self._used[k] += n
        self.step_bytes += n
        return t

    def reset(self, sync=None) -> None:
        """Start a new step. `sync` waits for copies still using the buffers before any of them is freed."""
        self.largest_step = max(self.largest_step, self.step_bytes)
        if len(self.buffers) > 1 or (self.buffers and self.buffers[0].nbytes < self.largest_step):
            if sync is not None:
                sync()
            for b in self.buffers:
                b.release()
            self.buffers = [HostBuffer(self.largest_step, self.pin)]
        self._used = [0] * len(self.buffers)
        self.step_bytes = 0

    def release(self, sync=None) -> None:
        if self.buffers and sync is not None:
            sync()
        for b in self.buffers:
            b.release()
        self.buffers, self._used = [], []
