"""urae.memory on the tiny FLUX.1: block swap and activation offload change no number, fp8 stays within its
rounding, impossible settings are refused in one line, and memory = "auto" picks the documented rows."""

import pytest
import torch

import networks.minor_lora as ml
from urae.flow import flow_loss
from urae.memory import (
    MemoryConfigError,
    MemoryOptions,
    bytes_moved_per_step,
    check_memory_options,
    choose_memory,
    estimate_peak_bytes,
    host_bytes,
    setup_memory,
    transformer_blocks,
)
from urae.memory.auto import usable_bytes
from urae.memory.fp8 import FP8, block_linears
from urae.tiny import build_transformer

LAYERS, SINGLE = 2, 3  # 5 blocks
N_BLOCKS = LAYERS + SINGLE


def _trainee(dropout=None):
    transformer = build_transformer(LAYERS, SINGLE, seed=0).requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    network = ml.create_network(1.0, 4, 4, None, [], transformer, init="minor", dropout=dropout, verbose="False")
    network.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
    network.prepare_grad_etc(None, transformer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter: up != up0, so the change is not zero
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return transformer, network


def _inputs(seed=2, size=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 16, size, size, generator=g)
    return x0, torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g), torch.rand(1, generator=g), \
        torch.randn(x0.shape, generator=g)


def _step(options, dropout=None, steps=1, prepare=None):
    transformer, network = _trainee(dropout)
    if prepare:
        prepare(transformer)
    handle = setup_memory(transformer, options, "cpu")
    losses, grads = [], []
    for s in range(steps):
        torch.manual_seed(100 + s)  # adapter dropout draws from the global generator
        loss = flow_loss(transformer, *_inputs(seed=2 + s))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None})
        network.zero_grad(set_to_none=True)
    return losses, grads, handle, transformer


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol)
    for step_a, step_b in zip(ga, gb):
        assert step_a.keys() == step_b.keys() and len(step_a) == 2 * 4 * LAYERS + 2 * 3 * SINGLE
        for k in step_a:
            torch.testing.assert_close(step_a[k], step_b[k], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def resident():
    losses, grads, _, _ = _step(MemoryOptions(), steps=2)
    return losses, grads


@pytest.mark.parametrize("swap", [1, 3, N_BLOCKS - 1])
def test_block_swap_is_lossless_and_moves_each_block_twice(resident, swap):
    losses, grads, handle, transformer = _step(MemoryOptions(blocks_to_swap=swap), steps=2)
    _assert_same((losses, grads), resident)
    # forward and backward each bring a swapped block in, except the last one, which stays between them
    assert handle.stats.weight_loads == 2 * (2 * swap - 1)
    # after backward every swapped block has handed its device memory back
    blocks = transformer_blocks(transformer)
    assert all(p.numel() == 0 for b in blocks[N_BLOCKS - swap:] for p in b.parameters())
    assert all(p.numel() > 0 for b in blocks[: N_BLOCKS - swap] for p in b.parameters())


def test_a_swapped_block_that_is_not_brought_back_fails(monkeypatch):
    from urae.memory.block_swap import BlockSwap

    monkeypatch.setattr(BlockSwap, "load", lambda self, i: None)
    with pytest.raises(RuntimeError):
        _step(MemoryOptions(blocks_to_swap=2))


def test_activation_offload_is_lossless_and_moves_every_block_input(resident):
    losses, grads, handle, _ = _step(MemoryOptions(offload_activations=True), steps=2)
    _assert_same((losses, grads), resident)
    # hidden and encoder-hidden states of each block, out and back, each step
    assert handle.stats.activation_offloads == handle.stats.activation_loads == 2 * 2 * N_BLOCKS
    assert handle.checkpoint.tape == []


def test_swap_offload_and_dropout_replay_the_same_random_numbers():
    ref = _step(MemoryOptions(), dropout=0.3)
    got = _step(MemoryOptions(blocks_to_swap=3, offload_activations=True), dropout=0.3)
    _assert_same(ref[:2], got[:2])


def _round_block_linears_to_fp8(transformer):
    with torch.no_grad():
        for m in block_linears(transformer_blocks(transformer)):
            for p in m.parameters():
                p.copy_(p.to(FP8).to(p.dtype))


def test_fp8_storage_equals_fp8_rounded_weights_and_stays_close_to_full_precision(resident):
    losses, grads, handle, transformer = _step(MemoryOptions(fp8_base=True, blocks_to_swap=2), steps=2)
    linears = block_linears(transformer_blocks(transformer))
    assert {p.dtype for m in linears[: len(linears) // 2] for p in m.parameters()} == {FP8}
    # exactly the model whose weights were rounded to fp8 once (the compute is the same fp32)
    rounded = _step(MemoryOptions(), steps=2, prepare=_round_block_linears_to_fp8)
    _assert_same((losses, grads), rounded[:2])
    # and close to full precision: e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per weight, random in
    # sign), which moves this loss by ~1e-4 relative and turns each gradient by a few degrees
    assert losses[0] == pytest.approx(resident[0][0], rel=1e-2)
    for k, g in grads[0].items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), resident[1][0][k].flatten(), dim=0)
        assert cos > 0.98, (k, cos)
    handle.remove()
    assert {p.dtype for m in linears for p in m.parameters()} == {torch.float32}


def test_remove_puts_everything_back():
    transformer, network = _trainee()
    ref = flow_loss(transformer, *_inputs()).item()
    handle = setup_memory(transformer, MemoryOptions(blocks_to_swap=3, offload_activations=True), "cpu")
    ckpt = handle.checkpoint
    assert transformer._gradient_checkpointing_func is ckpt
    flow_loss(transformer, *_inputs()).backward()
    handle.remove()
    assert all(p.numel() > 0 for p in transformer.parameters())
    assert transformer._gradient_checkpointing_func is not ckpt and transformer.gradient_checkpointing
    assert flow_loss(transformer, *_inputs()).item() == ref
    network.restore()


def test_impossible_settings_are_one_line_errors():
    transformer = build_transformer(LAYERS, SINGLE)
    cases = [
        (MemoryOptions(blocks_to_swap=N_BLOCKS), True, "at most 4 can be swapped"),
        (MemoryOptions(blocks_to_swap=-1), True, "whole number"),
        (MemoryOptions(blocks_to_swap=1), False, "needs gradient_checkpointing"),
        (MemoryOptions(offload_activations=True), False, "needs gradient_checkpointing"),
    ]
    for options, ckpt, words in cases:
        with pytest.raises(MemoryConfigError, match=words) as e:
            check_memory_options(options, transformer, "cpu", gradient_checkpointing=ckpt)
        assert "\n" not in str(e.value)
    check_memory_options(MemoryOptions(blocks_to_swap=N_BLOCKS - 1, fp8_base=True), transformer, "cpu")
    check_memory_options(MemoryOptions(blocks_to_swap=56), (19, 38), "cpu")


def test_fp8_on_a_device_without_float8_is_refused(monkeypatch):
    import urae.memory.options as opts

    monkeypatch.setattr(opts, "float8_problem", lambda device: "no float8 cast kernels")
    with pytest.raises(MemoryConfigError, match=r"fp8_base: cpu cannot store float8 weights \(no float8 cast kernels\)"):
        check_memory_options(MemoryOptions(fp8_base=True), 57, "cpu")
    monkeypatch.undo()
    assert opts.float8_problem("cpu") is None
    # a device this torch cannot use at all gives its own reason
    assert opts.float8_problem("cuda:999") is not None


GiB = 2**30
# The "Fit your GPU" table (benchmarks/README.md, Memory): GPU GiB -> size -> (blocks_to_swap, fp8, offload)
AUTO_TABLE = {
    24: {1024: (15, False, False), 2048: (38, False, False), 4096: (46, False, True)},
    48: {1024: (0, False, False), 2048: (0, False, False), 4096: (42, False, False)},
    80: {1024: (0, False, False), 2048: (0, False, False), 4096: (0, False, False)},
}


@pytest.mark.parametrize("gib", sorted(AUTO_TABLE))
def test_auto_picks_the_documented_configuration(gib):
    for size, (swap, fp8, offload) in AUTO_TABLE[gib].items():
        options, peak = choose_memory(gib * GiB, size, size)
        assert options == MemoryOptions(swap, fp8, offload), (gib, size, options)
        assert peak == estimate_peak_bytes(options, size, size) <= usable_bytes(gib * GiB)
        # the cheapest: one block fewer swapped (or no offload) would not fit
        if swap:
            assert estimate_peak_bytes(MemoryOptions(swap - 1, fp8, offload), size, size) > usable_bytes(gib * GiB)


def test_auto_fits_4k_on_24_gib_and_2k_on_16_gib_losslessly():
    options, peak = choose_memory(24 * GiB, 4096, 4096)
    assert peak <= 22 * GiB and not options.fp8_base
    options, peak = choose_memory(16 * GiB, 2048, 2048)
    assert peak <= 14 * GiB and not options.fp8_base
    # 4096² on 16 GiB needs fp8 on top of everything else; nothing fits 12 GiB
    options, _ = choose_memory(16 * GiB, 4096, 4096)
    assert options.fp8_base and options.offload_activations
    with pytest.raises(MemoryConfigError, match="no memory configuration fits 12.0 GiB at 4096x4096"):
        choose_memory(12 * GiB, 4096, 4096)


def test_auto_only_chooses_what_the_user_left_open():
    options, peak = choose_memory(24 * GiB, 2048, 2048, fixed={"fp8_base": True})
    assert options.fp8_base and peak <= usable_bytes(24 * GiB)
    assert options.blocks_to_swap < choose_memory(24 * GiB, 2048, 2048)[0].blocks_to_swap  # fp8 needs fewer swapped
    options, _ = choose_memory(48 * GiB, 4096, 4096, fixed={"offload_activations": True})
    assert options == MemoryOptions(offload_activations=True)  # 34.8 GiB: no block needs to move
    with pytest.raises(MemoryConfigError, match="no memory configuration fits"):
        choose_memory(24 * GiB, 4096, 4096, fixed={"blocks_to_swap": 0})
    with pytest.raises(MemoryConfigError, match="unknown memory option"):
        choose_memory(24 * GiB, 4096, 4096, fixed={"fp8": True})


def test_auto_keeps_pinned_host_memory_within_its_budget():
    free, _ = choose_memory(24 * GiB, 4096, 4096)
    assert host_bytes(free, 4096, 4096) > 32 * GiB  # bf16 blocks and every block input in host memory
    options, peak = choose_memory(24 * GiB, 4096, 4096, host_budget_bytes=32 * GiB)
    assert options.fp8_base and host_bytes(options, 4096, 4096) <= 32 * GiB and peak <= usable_bytes(24 * GiB)
    # with 16 GiB of host memory nothing can hold the 4096² block inputs: the message says what it would take
    with pytest.raises(MemoryConfigError, match=r"within 16.0 GiB of host memory: the smallest needs a \d+\.\d GiB GPU"):
        choose_memory(24 * GiB, 4096, 4096, host_budget_bytes=16 * GiB)


def test_estimate_agrees_with_the_fake_tensor_count():
    # all-resident peaks of one real-size step counted by benchmarks/bench_memory.py (adapter in bf16 with AdamW
    # there; fp32 with Prodigy in the estimate: +0.31 GiB), and the earlier independent count's 24.6 / 30.6 / 54.5 GiB within 10 %
    for size, measured, design in ((1024, 24.50, 24.6), (2048, 30.49, 30.6), (4096, 54.48, 54.5)):
        est = estimate_peak_bytes(MemoryOptions(), size, size) / GiB
        assert est == pytest.approx(measured + 0.313, abs=0.02) and est == pytest.approx(design, rel=0.10)
    # offload moves every block input out and back; swap moves each swapped block in twice but the last once
    assert bytes_moved_per_step(MemoryOptions(offload_activations=True), 4096, 4096) == 2 * 57 * 66048 * 3072 * 2
    assert bytes_moved_per_step(MemoryOptions(blocks_to_swap=2), 1024, 1024) == 3 * 141_591_808 * 2


def test_recompute_replays_autocast():
    """Under bf16 autocast (the trainer's mixed precision) the rerun in backward must compute as the forward did."""
    def grads(options):
        transformer, network = _trainee()
        setup_memory(transformer, options, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = flow_loss(transformer, *_inputs())
        loss.backward()
        return loss.item(), {n: p.grad for n, p in network.named_parameters() if p.grad is not None}

    ref_loss, ref = grads(MemoryOptions())
    loss, got = grads(MemoryOptions(offload_activations=True, blocks_to_swap=2))
    assert loss == ref_loss
    for k in ref:  # bf16 compute in both, the same ops in the same order: equal up to accumulation order
        torch.testing.assert_close(got[k], ref[k], rtol=1e-2, atol=1e-5)
