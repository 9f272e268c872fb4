"""Block swap and activation offload in the order a GPU needs, checked on the CPU.

On the CPU the real mover's copies are synchronous and `load()` fetches what was not prefetched, so a
missing prefetch or a missing wait changes no number there. These tests install, through `setup_memory`,
a mover that records every host -> device copy and every wait against the block it belongs to, and one
that behaves like an asynchronous copy engine: the device tensor holds garbage until `wait()` is called.
"""

import math

import pytest
import torch
from conftest import memory_trainee  # noqa: E402

import urae.memory.install as install
from urae.flow import flow_loss
from urae.memory import MemoryOptions, setup_memory, transformer_blocks
from urae.memory.transfer import Mover, Pending

LAYERS, SINGLE = 2, 3  # 5 blocks in execution order


class _Late(Pending):
    """A copy still in flight: its device memory reads as NaN until the consumer waits for it."""

    def __init__(self, tensor, host, log, tag):
        super().__init__(tensor)
        self.host, self.log, self.tag = host, log, tag

    def wait(self):
        if not self.waited:
            self.tensor.copy_(self.host)
            self.log.append(("wait", self.tag))
        self.waited = True
        return self.tensor


class RecordingAsyncMover(Mover):
    """CPU mover whose copies land only at `wait()`; logs ("copy"|"wait", block or "act") in call order.
    A copy's memory holds NaN bit patterns until then (0xFF bytes read as NaN in any float dtype)."""

    def __init__(self, device):
        super().__init__(device)
        self.log, self.block = [], None
        RecordingAsyncMover.last = self

    def to_device(self, host, out=None, wait_for_compute=True):
        tag = "act" if self.block is None else self.block
        self.log.append(("copy", tag))
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device) if out is None else out
        dev.fill_(float("nan") if dev.is_floating_point() else 255)
        return _Late(dev, host, self.log, tag)


def _inputs():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 16, 8, 8, generator=g)
    return x0, torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g), torch.rand(1, generator=g), \
        torch.randn(x0.shape, generator=g)


def _loss_and_grads(transformer, network):
    loss = flow_loss(transformer, *_inputs())
    loss.backward()
    return loss.item(), [p.grad.clone() for p in network.parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def resident():
    return _loss_and_grads(*memory_trainee(LAYERS, SINGLE))


def _run(options, monkeypatch):
    """One training step through setup_memory with the recording mover; the log gains ("ran", block, phase)."""
    monkeypatch.setattr(install, "Mover", RecordingAsyncMover)
    transformer, network = memory_trainee(LAYERS, SINGLE)
    handle = setup_memory(transformer, options, "cpu")
    mover = RecordingAsyncMover.last
    assert handle.mover is mover
    if handle.swap is not None:  # a copy issued while block swap prefetches block i belongs to block i
        prefetch = handle.swap.prefetch

        def tagged(i):
            mover.block = i
            try:
                prefetch(i)
            finally:
                mover.block = None

        handle.swap.prefetch = tagged
    blocks = transformer_blocks(transformer)
    phase = {"now": "fwd"}

    def ran(i):
        return lambda module, args, out: mover.log.append(("ran", i, phase["now"]))

    for i, b in enumerate(blocks):
        b.register_forward_hook(ran(i))
    loss = flow_loss(transformer, *_inputs())
    phase["now"] = "bwd"  # every block call from here on is a recompute in backward
    loss.backward()
    grads = [p.grad.clone() for p in network.parameters() if p.requires_grad]
    return loss.item(), grads, mover.log, handle


def _at(log, event):
    return log.index(event)


def _same(got, ref):
    (lg, gg), (lr, gr) = got, ref
    assert math.isfinite(lg) and lg == pytest.approx(lr, rel=1e-6)
    for a, b in zip(gg, gr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("swap", [2, 3])
def test_block_swap_waits_before_use_and_prefetches_one_block_ahead_both_ways(resident, swap, monkeypatch):
    loss, grads, log, _ = _run(MemoryOptions(blocks_to_swap=swap), monkeypatch)
    _same((loss, grads), resident)  # with copies that land only at wait(): a missing wait reads NaN
    n = LAYERS + SINGLE
    swapped = range(n - swap, n)
    copies = [e for e in log if e[0] == "copy"]
    assert all(isinstance(e[1], int) for e in copies)
    # forward brings each swapped block in once; backward again, except the last, which stays between them
    per_block = {i: sum(1 for e in copies if e[1] == i) for i in swapped}
    assert per_block == {i: 1 if i == n - 1 else 2 for i in swapped}
    end = _at(log, ("ran", n - 1, "fwd")) + 1
    fwd, bwd = log[:end], log[end:]
    for i in swapped:
        # forward: block i's copy starts while block i-1 computes (after block i-2 ran: one ahead, not all)
        first_copy = _at(fwd, ("copy", i))
        assert first_copy < _at(fwd, ("ran", i - 1, "fwd")), (i, fwd)
        if i - 2 >= 0:
            assert first_copy > _at(fwd, ("ran", i - 2, "fwd")), (i, fwd)
        assert _at(fwd, ("wait", i)) < _at(fwd, ("ran", i, "fwd"))
    for i in swapped:
        if i == n - 1:
            assert ("copy", i) not in bwd  # kept on the device from its forward to its backward
            continue
        # backward runs in reverse: block i comes in while block i+1 recomputes, not before block i+2 did
        first_copy = _at(bwd, ("copy", i))
        assert first_copy < _at(bwd, ("ran", i + 1, "bwd")), (i, bwd)
        if i + 2 < n:
            assert first_copy > _at(bwd, ("ran", i + 2, "bwd")), (i, bwd)
        assert _at(bwd, ("wait", i)) < _at(bwd, ("ran", i, "bwd"))


def test_offloaded_activations_are_waited_for_and_prefetched_one_block_ahead(resident, monkeypatch):
    loss, grads, log, handle = _run(MemoryOptions(offload_activations=True), monkeypatch)
    _same((loss, grads), resident)
    n = LAYERS + SINGLE
    bwd = log[_at(log, ("ran", n - 1, "fwd")) + 1:]
    # each block's two offloaded inputs come back; those of the block below are on their way while this one
    # recomputes (two copies before the first recompute: its own and the previous block's)
    runs = [k for k, e in enumerate(bwd) if e[0] == "ran"]
    assert len(runs) == n
    assert sum(1 for e in log if e == ("copy", "act")) == sum(1 for e in log if e == ("wait", "act")) == 2 * n
    for j, k in enumerate(runs[:-1]):
        before = bwd[:k]
        assert sum(1 for e in before if e == ("copy", "act")) == 2 * (j + 2), (j, bwd)
        assert sum(1 for e in before if e == ("wait", "act")) == 2 * (j + 1), (j, bwd)
    assert handle.checkpoint.tape == []


def test_swap_with_offload_together_keep_every_number(resident, monkeypatch):
    loss, grads, _, _ = _run(MemoryOptions(blocks_to_swap=3, offload_activations=True), monkeypatch)
    _same((loss, grads), resident)
