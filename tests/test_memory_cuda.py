"""urae.memory's CUDA path on the tiny FLUX.1 (skipped without CUDA): side-stream copies with a delay injected
before each one, so a missing wait would compute with unfinished copies; pinned bytes as urae.memory.pinned
registers them (torch's caching host allocator must not grow); a dropped prefetch; one trainer step with
memory = "auto" under a capped share of the GPU.

    python -m pytest -m cuda -q          # on a machine with a CUDA GPU: these and tests/test_cuda.py
"""

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from conftest import memory_trainee  # noqa: E402

from urae.flow import flow_loss  # noqa: E402
from urae.memory import MemoryOptions, setup_memory  # noqa: E402
from urae.memory.block_swap import RING  # noqa: E402
from urae.memory.pinned import aligned, page_bytes  # noqa: E402
from urae.memory.transfer import Mover  # noqa: E402

LAYERS, SINGLE = 2, 3
N_BLOCKS = LAYERS + SINGLE
DELAY_CYCLES = 20_000_000  # ~10 ms of GPU time on the side stream before every copy


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 16, 8, 8, generator=g)
    tensors = (x0, torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g), torch.rand(1, generator=g),
               torch.randn(x0.shape, generator=g))
    return tuple(t.cuda() for t in tensors)


@pytest.fixture
def slow_side_stream(monkeypatch):
    """Every copy on the side stream starts after a sleep there: unsynchronised reads see unfinished data."""
    to_device, to_host = Mover.to_device, Mover.to_host

    def sleep(self):
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                torch.cuda._sleep(DELAY_CYCLES)

    def slow_to_device(self, *a, **k):
        sleep(self)
        return to_device(self, *a, **k)

    def slow_to_host(self, *a, **k):
        sleep(self)
        return to_host(self, *a, **k)

    monkeypatch.setattr(Mover, "to_device", slow_to_device)
    monkeypatch.setattr(Mover, "to_host", slow_to_host)


def _train_steps(transformer, network, steps):
    """Loss and adapter gradients of each step, with fixed noise per step (the numbers compared across setups)."""
    losses, grads = [], []
    for s in range(steps):
        torch.manual_seed(100 + s)
        loss = flow_loss(transformer, *_inputs(2 + s))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.cpu().clone() for n, p in network.named_parameters() if p.grad is not None})
        network.zero_grad(set_to_none=True)
    return losses, grads


def _step(options, steps=2, **setup):
    transformer, network = memory_trainee(LAYERS, SINGLE)
    network.cuda()
    handle = setup_memory(transformer, options, "cuda", **setup) if options is not None else None
    if handle is None:
        transformer.cuda()
    losses, grads = _train_steps(transformer, network, steps)
    torch.cuda.synchronize()
    return losses, grads, handle


@pytest.fixture(scope="module")
def resident():
    return _step(None)[:2]


def _assert_same(got, ref):
    (la, ga), (lb, gb) = got, ref
    assert la == pytest.approx(lb, rel=1e-5)
    for a, b in zip(ga, gb):
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [
    MemoryOptions(blocks_to_swap=3),
    MemoryOptions(offload_activations=True),
    MemoryOptions(blocks_to_swap=N_BLOCKS - 1, offload_activations=True),
    MemoryOptions(blocks_to_swap=3, offload_activations="disk"),
    MemoryOptions(blocks_to_swap=2, checkpoint_segments=2),
], ids=lambda o: o.describe())
def test_side_stream_copies_are_waited_for(resident, slow_side_stream, options, tmp_path):
    losses, grads, handle = _step(options, disk_dir=tmp_path)
    _assert_same((losses, grads), resident)
    stats = handle.step_stats()
    assert stats["device_wait_s"] > 0  # the delayed copies made the compute stream wait, and it was measured
    handle.remove()
    assert list(tmp_path.iterdir()) == []


def test_pinned_bytes_are_exact_and_bypass_the_caching_allocator(resident):
    key = "allocated_bytes.current"
    torch.empty(1, pin_memory=True)  # the allocator's statistics exist
    before = torch.cuda.host_memory_stats()[key]
    losses, grads, handle = _step(MemoryOptions(blocks_to_swap=3, offload_activations=True))
    _assert_same((losses, grads), resident)
    swap, stack = handle.swap, handle.checkpoint.host
    assert swap.staging.data.is_pinned() and all(b.data.is_pinned() for b in stack.buffers)
    inputs = N_BLOCKS * sum(aligned(n * 32 * 4) for n in (16, 7))
    assert handle.pinned_bytes() == page_bytes(RING * swap.slot_bytes) + page_bytes(inputs)
    # nothing of ours went through torch's power-of-two pinned blocks
    assert torch.cuda.host_memory_stats()[key] == before
    handle.remove()


def test_a_dropped_prefetch_is_safe_while_its_copy_is_in_flight(resident, slow_side_stream):
    transformer, network = memory_trainee(LAYERS, SINGLE)
    network.cuda()
    handle = setup_memory(transformer, MemoryOptions(blocks_to_swap=3, offload_activations=True), "cuda")
    with torch.no_grad():
        flow_loss(transformer, *_inputs(7))
    flow_loss(transformer, *_inputs(8))  # its tape (and copies still in flight) is dropped by the next forward
    handle.swap.prefetch(N_BLOCKS - 3)  # a prefetch nobody waits for
    losses, grads = _train_steps(transformer, network, 2)
    _assert_same((losses, grads), resident)
    handle.remove()


def test_one_training_step_with_auto_under_a_capped_gpu(tmp_path, tiny_flux_dir, capsys):
    from pathlib import Path

    from urae.demo import write_demo_dataset
    from urae.trainer import main

    root = Path(__file__).resolve().parents[1]
    data = write_demo_dataset(tmp_path / "data", n=2)
    torch.cuda.set_per_process_memory_fraction(0.5)
    try:
        rc = main(["--config", str(root / "presets/demo.toml"), "--no-demo", "--pretrained_model_name_or_path",
                   str(tiny_flux_dir), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                   "--sample_every_n_steps", "0", "--save_every_n_steps", "0", "--max_train_steps", "1",
                   "--memory", "auto", "--blocks_to_swap", "2"])  # auto chooses the rest
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert rc == 0
    assert "memory: blocks_to_swap = 2" in capsys.readouterr().out
