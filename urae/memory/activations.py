"""Gradient checkpointing of the transformer blocks, with the saved block inputs kept where memory allows:
on the device, in pinned host memory, in a file, or (two-level) only at the start of each segment.

Why not `torch.utils.checkpoint`: its non-reentrant form recomputes inside autograd's own unpacking and
gives no point at which one block's backward has finished, which block swap needs to free that block's
weights and prefetch the previous one; `torch.autograd.graph.save_on_cpu` would move every saved tensor,
synchronously, not just the block inputs. So this is the reentrant scheme (save the inputs, rerun the
block under autograd in backward, backpropagate through it) with those hooks added. Autocast and the RNG
state (adapter dropout) are replayed as in the forward.

What is moved is chosen by what it is: the arguments the block calls `hidden_states` and
`encoder_hidden_states` (per-block activations); the time embedding and the rotary tables are shared by
all blocks and stay where they are.

- offload = True: the inputs are copied to pinned host memory (urae.memory.pinned.HostStack, exact size,
  reused every step) on the side stream and prefetched one block ahead in backward.
- offload = "disk": they go through a ring of three pinned buffers to a file in `disk_dir`, written and read
  back one block ahead by one worker thread (so writes and reads keep their order). The file is unlinked
  as soon as it is created: nothing is left behind on exit, on Ctrl-C, or if the process is killed.
- segments = k (two-level checkpointing): only one block input in k is kept; in backward the blocks of a
  segment are run forward once more (no autograd) from its first input to rebuild the others, which then
  serve the usual per-block recompute. About n/k + k inputs are live instead of n, for about one more
  forward per step. A block whose inputs are not the previous block's outputs (a residual added between
  blocks) always starts a segment, so the rebuilt inputs are exactly those of the forward.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from urae.memory.pinned import HostBuffer, HostStack, aligned
from urae.memory.transfer import Mover

ACTIVATIONS = ("hidden_states", "encoder_hidden_states")
DISK_RING = 3


def activation_leaves(block, args) -> list[int]:
    """Leaf positions (in tree_flatten(args)) of the arguments named hidden_states / encoder_hidden_states."""
    try:
        names = [p for p in inspect.signature(block.forward).parameters]
    except (TypeError, ValueError):
        return []
    out, pos = [], 0
    for k, a in enumerate(args):
        n = len(tree_flatten(a)[0])
        if k < len(names) and names[k] in ACTIVATIONS and n == 1 and isinstance(a, torch.Tensor):
            out.append(pos)
        pos += n
    return out


class _Record:
    """One block call of the forward: what its backward needs to rerun it."""

    def __init__(self, block, spec, leaves, positions, acts, links, boundary):
        self.block, self.spec, self.positions, self.acts, self.links = block, spec, positions, acts, links
        self.leaves = leaves  # non-tensor leaves and the shared tensors; activation leaves None until restored
        self.boundary = boundary  # its activation inputs are kept (else rebuilt from the segment's start)
        self.device: dict[int, torch.Tensor] = {}  # activation inputs on the device
        self.host: dict[int, torch.Tensor] = {}  # ... in pinned host memory
        self.disk: dict | None = None  # ... in the file
        self.pending = None  # a function giving the device copies of host / disk inputs
        self.out_spec = self.requires = self.rng = self.autocast = self.device_type = None


class DiskStore:
    """Block inputs in one unlinked file, through a ring of pinned staging buffers and one worker thread.

    A block call's inputs travel together in one staging buffer. Three buffers: in backward one holds the
    inputs of the block being recomputed (until its device copy is done), one the previous block's being
    read, and the writes of the forward have drained into the third by then."""

    def __init__(self, folder, mover: Mover):
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(dir=folder, prefix="urae-activations-")  # no name left behind
        self.mover = mover
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="urae-disk")
        self.buffer: HostBuffer | None = None
        self.slot_bytes = 0
        self._jobs = [None] * DISK_RING  # per staging buffer: the worker job and the device copy that last used it
        self._events: list[list] = [[] for _ in range(DISK_RING)]
        self._next = 0
        self.offset = 0
        self.file_bytes = 0

    @property
    def pinned_bytes(self) -> int:
        return self.buffer.nbytes if self.buffer is not None else 0

    def _slot(self, n: int) -> int:
        if n > self.slot_bytes:  # grow (the first step, or a larger bucket): wait for everything, then reallocate
            self.drain()
            if self.buffer is not None:
                self.buffer.release()
            self.slot_bytes = aligned(n)
            self.buffer = HostBuffer(DISK_RING * self.slot_bytes, pin=self.mover.cuda)
        r = self._next
        self._next = (r + 1) % DISK_RING
        if self._jobs[r] is not None:
            self.mover.host_wait(self._jobs[r].result)
        for event in self._events[r]:
            self.mover.host_wait(event.synchronize)
        self._jobs[r], self._events[r] = None, []
        return r

    def _view(self, r: int, off: int, shape, dtype) -> torch.Tensor:
        return self.buffer.view(r * self.slot_bytes + off, shape, dtype)

    def write(self, tensors: dict) -> dict:
        """Device tensors -> the file (asynchronously); returns where each one went."""
        layout, n = {}, 0
        for k, t in tensors.items():
            layout[k] = (n, t.shape, t.dtype)
            n += aligned(t.nbytes)
        r = self._slot(n)
        events = [self.mover.to_host(t, self._view(r, layout[k][0], t.shape, t.dtype)) for k, t in tensors.items()]
        staged = self.buffer.data[r * self.slot_bytes:r * self.slot_bytes + n]
        off = self.offset
        self.offset += n
        self.file_bytes = max(self.file_bytes, self.offset)

        def job():
            for event in events:
                if event is not None:
                    event.synchronize()
            if type(staged) is torch.Tensor:  # fake tensors (the memory benchmark's count) have no bytes to write
                self.file.seek(off)
                self.file.write(staged.numpy().data)

        self._jobs[r] = self.pool.submit(job)
        self.mover.stats.disk_bytes += n
        return {"offset": off, "bytes": n, "layout": layout}

    def read(self, extent: dict):
        """Start reading one block call's inputs back; returns a function giving {leaf: device tensor}."""
        n = extent["bytes"]
        r = self._slot(n)
        staged = self.buffer.data[r * self.slot_bytes:r * self.slot_bytes + n]

        def job():
            if type(staged) is torch.Tensor:
                self.file.seek(extent["offset"])
                self.file.readinto(staged.numpy().data)

        future = self.pool.submit(job)
        self._jobs[r] = future
        self.mover.stats.disk_bytes += n

        def to_device():
            self.mover.host_wait(future.result)
            pending = {k: self.mover.to_device(self._view(r, off, shape, dtype))
                       for k, (off, shape, dtype) in extent["layout"].items()}
            self._events[r] = [p.event for p in pending.values() if p.event is not None]
            return {k: p.wait() for k, p in pending.items()}

        return to_device

    def reset(self) -> None:
        self.offset = 0

    def drain(self) -> None:
        for job in self._jobs:
            if job is not None:
                job.result()
        self.mover.sync()

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
        self.file.close()
        if self.buffer is not None:
            self.buffer.release()


class _BlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ckpt, rec, _anchor, *tensors):
        ctx.ckpt, ctx.rec = ckpt, rec
        leaves = list(rec.leaves)
        for k, t in zip(rec.positions, tensors):
            leaves[k] = t
        rec.requires = [t.requires_grad for t in tensors]
        rec.device_type = tensors[0].device.type if tensors else "cpu"
        rec.autocast = ((torch.is_autocast_enabled(rec.device_type), torch.get_autocast_dtype(rec.device_type))
                        if rec.device_type in ("cuda", "cpu") else (False, None))
        rec.rng = ckpt.rng_state()
        with torch.no_grad():
            out = rec.block(*tree_unflatten(leaves, rec.spec))
        flat, rec.out_spec = tree_flatten(out)
        for k in rec.positions:
            if k not in rec.acts:
                rec.leaves[k] = leaves[k].detach()  # shared by all blocks (temb, rotary tables): kept as it is
        if rec.boundary:
            ckpt.store(rec, {k: leaves[k].detach() for k in rec.acts})
        ckpt.tape.append(rec)
        return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in flat)

    @staticmethod
    def backward(ctx, *grads):
        ckpt, rec = ctx.ckpt, ctx.rec
        tape = ckpt.tape
        if tape and tape[-1] is rec:
            tape.pop()
            if tape:
                ckpt.prefetch(tape[-1])  # the previous block's inputs come in while this one recomputes
        leaves = ckpt.restore(rec)
        inputs = []
        for k, req in zip(rec.positions, rec.requires):
            leaves[k] = leaves[k].detach().requires_grad_(req)
            inputs.append(leaves[k])
        swap = ckpt.swap
        if swap is not None:
            swap.recomputing = True
        try:
            with torch.enable_grad(), ckpt.replay_rng(rec.rng), _autocast(rec.device_type, *rec.autocast):
                out = rec.block(*tree_unflatten(leaves, rec.spec))
        finally:
            if swap is not None:
                swap.recomputing = False
        flat, _ = tree_flatten(out)
        pairs = [(o, g) for o, g in zip(flat, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if swap is not None:
            swap.after_backward(rec.block)
        ctx.rec = None
        return (None,) * 3 + tuple(t.grad if req else None for t, req in zip(inputs, rec.requires))


def _autocast(device_type, enabled, dtype):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class BlockCheckpoint:
    """The `gradient_checkpointing_func` given to diffusers: called as fn(block, *args) for every block."""

    def __init__(self, mover: Mover, offload=False, swap=None, first_block=None, segments: int = 1,
                 disk_dir=None):
        self.mover, self.offload, self.swap, self.first_block = mover, offload, swap, first_block
        self.segments = max(1, int(segments))
        self.tape: list[_Record] = []
        self.host = HostStack(pin=mover.cuda) if offload is True else None
        self.disk = DiskStore(disk_dir, mover) if offload == "disk" else None
        self._previous: list = []  # weak references to the last call's outputs
        # An input that requires grad, so backward reaches the first block even though nothing before it is
        # trained (the adapters' parameters are not inputs of the function; their grads come from the rerun).
        self.anchor = torch.empty(0, requires_grad=True)

    @property
    def pinned_bytes(self) -> int:
        return (self.host.nbytes if self.host else 0) + (self.disk.pinned_bytes if self.disk else 0)

    def __call__(self, block, *args):
        if block is self.first_block:
            self._new_forward()
        leaves, spec = tree_flatten(args)
        positions = [k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        acts = activation_leaves(block, args)
        links = {}
        for k in acts:
            m = next((m for m, ref in enumerate(self._previous) if ref is not None and ref() is leaves[k]), None)
            if m is not None:
                links[k] = m
        boundary = (self.segments == 1 or len(self.tape) % self.segments == 0 or not acts or len(links) < len(acts))
        rec = _Record(block, spec, [None if isinstance(x, torch.Tensor) else x for x in leaves], positions,
                      set(acts), links, boundary)
        flat = _BlockFunction.apply(self, rec, self.anchor, *[leaves[k] for k in positions])
        self._previous = [weakref.ref(x) if isinstance(x, torch.Tensor) else None for x in flat]
        return tree_unflatten(list(flat), rec.out_spec)

    def _new_forward(self) -> None:
        """A new forward: inputs of one that never ran backward are dropped. Their copies may still be in
        flight: device memory is recorded on the side stream, and host memory is only reused by copies that
        run after them on that same stream (or the same disk worker)."""
        self.tape.clear()
        self._previous = []
        if self.host is not None:
            self.host.reset(sync=self.mover.sync)
        if self.disk is not None:
            self.disk.reset()

    # ---- where a block's inputs wait ----

    def store(self, rec: _Record, tensors: dict) -> None:
        stats = self.mover.stats
        if self.host is not None:
            for k, t in tensors.items():
                rec.host[k] = self.host.take(t.shape, t.dtype)
                self.mover.to_host(t, rec.host[k])
        elif self.disk is not None and tensors:
            rec.disk = self.disk.write(tensors)
        else:
            rec.device.update(tensors)
            return
        stats.activation_offloads += len(tensors)
        stats.activation_bytes += sum(t.nbytes for t in tensors.values())

    def prefetch(self, rec: _Record) -> None:
        """Start bringing a block call's inputs back to the device (one block ahead of its backward)."""
        if rec.pending is not None or not (rec.host or rec.disk):
            return
        stats = self.mover.stats
        if rec.host:
            pending = {k: self.mover.to_device(h) for k, h in rec.host.items()}
            rec.pending = lambda: {k: p.wait() for k, p in pending.items()}
            stats.activation_loads += len(rec.host)
            stats.activation_bytes += sum(h.nbytes for h in rec.host.values())
        else:
            rec.pending = self.disk.read(rec.disk)
            stats.activation_loads += len(rec.disk["layout"])
            stats.activation_bytes += sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                                          for _, shape, dtype in rec.disk["layout"].values())
        rec.host, rec.disk = {}, None

    def _to_device(self, rec: _Record) -> None:
        self.prefetch(rec)
        if rec.pending is not None:
            rec.device.update(rec.pending())
            rec.pending = None

    def restore(self, rec: _Record) -> list:
        """The block call's leaves with its activation inputs on the device (taken from the record)."""
        if not rec.boundary and not rec.device:
            self._replay_segment(rec)
        self._to_device(rec)
        leaves = list(rec.leaves)
        for k, t in rec.device.items():
            leaves[k] = t
        rec.device = {}
        return leaves

    def _replay_segment(self, rec: _Record) -> None:
        """Rebuild the inputs of the blocks from the segment's start up to `rec` by running them forward."""
        start = max(j for j, r in enumerate(self.tape) if r.boundary)
        chain = self.tape[start:] + [rec]
        self._to_device(chain[0])
        for r, nxt in zip(chain, chain[1:]):
            leaves = list(r.leaves)
            for k, t in r.device.items():
                leaves[k] = t
            with torch.no_grad(), self.replay_rng(r.rng), _autocast(r.device_type, *r.autocast):
                out = r.block(*tree_unflatten(leaves, r.spec))
            flat, _ = tree_flatten(out)
            nxt.device = {k: flat[m] for k, m in nxt.links.items()}
            self.mover.stats.segment_replays += 1

    # ---- RNG ----

    def rng_state(self):
        cuda = self.mover.cuda
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.mover.device) if cuda else None)

    @contextlib.contextmanager
    def replay_rng(self, state):
        cpu, dev = state
        devices = [self.mover.device] if self.mover.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            if dev is not None:
                torch.cuda.set_rng_state(dev, self.mover.device)
            yield

    def close(self) -> None:
        self.tape.clear()
        if self.host is not None:
            self.host.release(sync=self.mover.sync)
        if self.disk is not None:
            self.disk.close()
