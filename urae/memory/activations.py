"""Gradient checkpointing of the transformer blocks that can keep the checkpointed inputs in host memory
and tells block swap when a block's backward is done.

Why not `torch.utils.checkpoint`: its non-reentrant form recomputes inside autograd's own unpacking and
gives no point at which one block's backward has finished, which block swap needs to free that block's
weights and prefetch the previous one; `torch.autograd.graph.save_on_cpu` would move every saved tensor,
synchronously, not just the 57 block inputs. So this is the reentrant scheme (save the inputs, rerun
the block under autograd in backward, backpropagate through it) with those two hooks added. Autocast
and the RNG state (adapter dropout) are replayed as in the forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from urae.memory.transfer import Mover

# diffusers' FLUX blocks are called as (hidden_states, encoder_hidden_states, temb, image_rotary_emb, kwargs):
# the first two are the per-block activations; temb and the rotary tables are shared by all blocks.
OFFLOADED_ARGS = 2


class _Saved:
    """One block call's inputs as saved for backward: device tensors, or host copies on their way back."""

    def __init__(self, leaves, host: dict, mover: Mover):
        self.leaves, self.host, self.mover, self.pending = leaves, host, mover, {}

    def prefetch(self):
        for k, h in self.host.items():
            if k not in self.pending:
                self.pending[k] = self.mover.to_device(h)
                self.mover.stats.activation_loads += 1
                self.mover.stats.activation_bytes += h.numel() * h.element_size()

    def take(self) -> list:
        self.prefetch()
        leaves = list(self.leaves)
        for k, p in self.pending.items():
            leaves[k] = p.wait()
        self.leaves = self.host = self.pending = None
        return leaves


class _BlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ckpt, block, leaves, positions, spec, out_spec, _anchor, *tensors):
        ctx.ckpt, ctx.block, ctx.spec = ckpt, block, spec
        leaves = list(leaves)
        for k, t in zip(positions, tensors):
            leaves[k] = t
        ctx.positions = positions
        ctx.requires = [t.requires_grad for t in tensors]
        ctx.device_type = tensors[0].device.type if tensors else "cpu"
        ctx.autocast = ((torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
                        if ctx.device_type in ("cuda", "cpu") else (False, None))
        ctx.rng = ckpt.rng_state()
        with torch.no_grad():
            out = block(*tree_unflatten(leaves, spec))
        flat, o_spec = tree_flatten(out)
        out_spec.append(o_spec)
        saved = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        host = {}
        for j, k in enumerate(positions):
            t = leaves[k].detach()
            if ckpt.offload and j < OFFLOADED_ARGS:
                host[k] = ckpt.mover.host_copy(t)
                ckpt.mover.stats.activation_offloads += 1
                ckpt.mover.stats.activation_bytes += t.numel() * t.element_size()
            else:
                saved[k] = t
        ctx.record = _Saved(saved, host, ckpt.mover)
        ckpt.tape.append(ctx.record)
        return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in flat)

    @staticmethod
    def backward(ctx, *grads):
        ckpt = ctx.ckpt
        tape = ckpt.tape
        if tape and tape[-1] is ctx.record:
            tape.pop()
            if tape:
                tape[-1].prefetch()  # the previous block's inputs come in while this one recomputes
        leaves = ctx.record.take()
        inputs = []
        for k, req in zip(ctx.positions, ctx.requires):
            leaves[k] = leaves[k].detach().requires_grad_(req)
            inputs.append(leaves[k])
        swap = ckpt.swap
        if swap is not None:
            swap.recomputing = True
        try:
            with torch.enable_grad(), ckpt.replay_rng(ctx.rng), _autocast(ctx.device_type, *ctx.autocast):
                out = ctx.block(*tree_unflatten(leaves, ctx.spec))
        finally:
            if swap is not None:
                swap.recomputing = False
        flat, _ = tree_flatten(out)
        pairs = [(o, g) for o, g in zip(flat, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if swap is not None:
            swap.after_backward(ctx.block)
        return (None,) * 7 + tuple(t.grad if req else None for t, req in zip(inputs, ctx.requires))


def _autocast(device_type, enabled, dtype):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class BlockCheckpoint:
    """The `gradient_checkpointing_func` given to diffusers: called as fn(block, *args) for every block."""

    def __init__(self, mover: Mover, offload: bool, swap=None, first_block=None):
        self.mover, self.offload, self.swap, self.first_block = mover, offload, swap, first_block
        self.tape: list[_Saved] = []
        # An input that requires grad, so backward reaches the first block even though nothing before it is
        # trained (the adapters' parameters are not inputs of the function; their grads come from the rerun).
        self.anchor = torch.empty(0, requires_grad=True)

    def __call__(self, block, *args):
        if block is self.first_block:
            self.tape.clear()  # a new forward: inputs of one that never ran backward are dropped
        leaves, spec = tree_flatten(args)
        positions = [k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        tensors = [leaves[k] for k in positions]
        placeholder = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        out_spec: list = []
        flat = _BlockFunction.apply(self, block, placeholder, positions, spec, out_spec, self.anchor, *tensors)
        return tree_unflatten(list(flat), out_spec[0])

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
