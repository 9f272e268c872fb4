"""Copies between the device and host memory, on a side stream where the device has streams.

On CUDA a copy runs on one side stream so it overlaps the compute stream. Device memory is allocated on
the compute stream and, when the side stream writes it, recorded on the side stream too: a copy whose
result is dropped unused (a prefetch nobody waited for, the tape of a forward without backward) keeps
its memory until the side stream is done writing it. The side stream waits for the compute stream before
reading or filling memory the compute stream used, and the compute stream waits for a copy's event before
the first use. All copies share the one side stream, so copies into the same host buffer happen in the
order they were issued. Host buffers are pinned (urae.memory.pinned), which makes the copies asynchronous.
Elsewhere (CPU tests, fake `meta` tensors in the benchmark) copies are plain and synchronous.

`TransferStats` counts what moved; `step()` returns the counts since its last call, with the time the
compute stream waited for copies (measured with CUDA events) and the time the host waited for the ring
buffers and the disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch


@dataclass
class TransferStats:
    weight_loads: int = 0  # block weights copied host -> device
    weight_bytes: int = 0
    activation_offloads: int = 0  # checkpointed inputs copied device -> host (or disk)
    activation_loads: int = 0  # ... and back
    activation_bytes: int = 0  # both directions
    disk_bytes: int = 0  # written and read back (offload_activations = "disk")
    segment_replays: int = 0  # block forwards rerun to rebuild the inputs of a checkpoint segment
    host_wait_s: float = 0.0  # the host waited for a ring buffer or the disk
    device_wait_s: float = 0.0  # the compute stream waited for a copy (CUDA events)
    _waits: list = field(default_factory=list, repr=False)

    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        self._resolve()
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def _resolve(self) -> None:
        for before, after in self._waits:
            after.synchronize()
            self.device_wait_s += before.elapsed_time(after) / 1000
        self._waits.clear()


@dataclass
class Pending:
    """A host -> device copy in flight; `wait()` returns the device tensor, ready for the compute stream."""

    tensor: torch.Tensor | None
    event: object = None
    stats: TransferStats | None = None
    waited: bool = False

    def wait(self) -> torch.Tensor | None:
        if self.event is not None and not self.waited:
            compute = torch.cuda.current_stream()
            if not self.event.query():  # still copying: measure how long compute waits for it
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before.record(compute)
                compute.wait_event(self.event)
                after.record(compute)
                self.stats._waits.append((before, after))
            else:
                compute.wait_event(self.event)
        self.waited = True
        return self.tensor


class Mover:
    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.stats = TransferStats()
        self._last: dict | None = None

    def step(self) -> dict:
        """Counts since the previous call (the trainer logs them per step)."""
        now = self.stats.as_dict()
        last = self._last or {k: 0 for k in now}
        self._last = now
        return {k: v - last[k] for k, v in now.items()}

    def sync(self) -> None:
        """Wait for every copy in flight (before host buffers they use are freed)."""
        if self.cuda:
            self.side.synchronize()

    def to_host(self, t: torch.Tensor, host: torch.Tensor):
        """Copy device tensor `t` into `host` (pinned on CUDA), on the side stream. Returns the copy's event."""
        if not self.cuda:
            host.copy_(t)
            return None
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        t.record_stream(self.side)  # the caller may drop t at once: keep its memory until the copy is done
        return event

    def to_device(self, host: torch.Tensor, out: torch.Tensor | None = None, wait_for_compute: bool = True) -> Pending:
        """Copy `host` into `out` (or a new device tensor) on the side stream."""
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device) if out is None else out
        if not self.cuda:
            dev.copy_(host)
            return Pending(dev)
        if wait_for_compute:  # `out` (or memory reused from the compute stream) may still be read there
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        if out is None:
            dev.record_stream(self.side)  # dropped unused, its memory still waits for this copy
        return Pending(dev, event, self.stats)

    def host_wait(self, fn):
        """Run a blocking host-side wait and count its time."""
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.stats.host_wait_s += time.perf_counter() - t
