"""Copies between the device and host memory, on a side stream where the device has streams.

On CUDA a copy runs on one side stream so it overlaps the compute stream: device memory is always
allocated on the compute stream (so its reuse stays ordered after the compute that reads it), the side
stream waits for the compute stream before reading or filling it, and the compute stream waits for
the copy's event before the first use. Host buffers are pinned, which is what makes the copies
asynchronous. Elsewhere (CPU tests, fake `meta` tensors in the benchmark) copies are plain and
synchronous; every copy is a real new storage, so nothing can be read through a stale alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TransferStats:
    weight_loads: int = 0  # block weights copied host -> device
    weight_bytes: int = 0
    activation_offloads: int = 0  # checkpointed inputs copied device -> host
    activation_loads: int = 0  # ... and back
    activation_bytes: int = 0  # both directions

    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclass
class Pending:
    """A host -> device copy in flight; `wait()` returns the device tensor, ready for the compute stream."""

    tensor: torch.Tensor
    event: object = None
    waited: bool = field(default=False)

    def wait(self) -> torch.Tensor:
        if self.event is not None and not self.waited:
            torch.cuda.current_stream(self.tensor.device).wait_event(self.event)
        self.waited = True
        return self.tensor


class Mover:
    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.stats = TransferStats()

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a device tensor, in pinned memory on CUDA, started on the side stream."""
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
        if not self.cuda:
            host.copy_(t)
            return host
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.side)  # the caller may drop t at once: keep its memory until the copy is done
        return host

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor (a master copy that stays there) in the memory the copies need."""
        t = t.detach().to("cpu")
        return t.pin_memory() if self.cuda and not t.is_pinned() else t

    def to_device(self, host: torch.Tensor) -> Pending:
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        if not self.cuda:
            dev.copy_(host)
            return Pending(dev)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        return Pending(dev, event)
