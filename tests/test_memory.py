"""urae.memory on the tiny FLUX.1: block swap (from the page cache or a converted copy), activation offload
(pinned or disk) and checkpoint segments change no number, fp8 stays within its rounding, pinned host memory
is exact and counted, impossible settings are refused in one line, and memory = "auto" picks the documented
rows for the GPU and the host RAM."""

import os

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
from urae.memory.activations import activation_leaves
from urae.memory.auto import host_limits, usable_bytes
from urae.memory.block_swap import RING
from urae.memory.estimate import (
    DOUBLE_PARAMS,
    SINGLE_PARAMS,
    live_inputs,
    replayed_blocks,
    step_costs,
    swap_loads,
)
from urae.memory.fp8 import FP8, block_linears
from urae.memory.pinned import aligned, caching_allocator_bytes, page_bytes
from urae.tiny import build_transformer

LAYERS, SINGLE = 2, 3  # 5 blocks
N_BLOCKS = LAYERS + SINGLE


def _trainee(dropout=None, transformer=None):
    transformer = (transformer or build_transformer(LAYERS, SINGLE, seed=0)).requires_grad_(False)
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


def _step(options, dropout=None, steps=1, prepare=None, transformer=None, **setup):
    transformer, network = _trainee(dropout, transformer)
    if prepare:
        prepare(transformer)
    handle = setup_memory(transformer, options, "cpu", **setup)
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


@pytest.mark.parametrize("swap,k", [(0, 3), (3, 2), (N_BLOCKS - 1, 4)])
def test_checkpoint_segments_are_lossless_and_rebuild_each_segment_once(resident, swap, k):
    losses, grads, handle, _ = _step(MemoryOptions(blocks_to_swap=swap, checkpoint_segments=k), steps=2)
    _assert_same((losses, grads), resident)
    # every block but the last of each segment runs once more in backward, and block swap loads what the
    # estimate's replay of its schedule says (the counts the bench and auto use)
    assert handle.stats.segment_replays == 2 * len(replayed_blocks(N_BLOCKS, k))
    assert handle.stats.weight_loads == 2 * sum(swap_loads(N_BLOCKS, swap, k))
    assert handle.checkpoint.tape == []


def test_a_segment_holds_fewer_inputs():
    assert [live_inputs(MemoryOptions(checkpoint_segments=k)) for k in (1, 2, 4, 7, 8, 57)] == [57, 29, 17, 14, 14, 57]
    assert len(replayed_blocks(57, 8)) == 57 - 8  # about one more forward
    # the estimate holds 14 of the 57 inputs at 4096² (plus the 2 of the checkpoint function's backward)
    full, seg = (estimate_peak_bytes(MemoryOptions(checkpoint_segments=k), 4096, 4096) for k in (1, 8))
    assert full - seg == (57 - 14 - 2) * 66048 * 3072 * 2


def test_disk_offload_is_lossless_and_leaves_no_file(resident, tmp_path):
    folder = tmp_path / "activations"
    losses, grads, handle, _ = _step(MemoryOptions(offload_activations="disk", blocks_to_swap=2), steps=2,
                                     disk_dir=folder)
    _assert_same((losses, grads), resident)
    disk = handle.checkpoint.disk
    assert list(folder.iterdir()) == []  # unlinked when created: nothing left even if the process is killed
    per_step = disk.file_bytes  # every block input written once and read once per step
    assert handle.stats.disk_bytes == 2 * 2 * per_step and handle.stats.activation_loads == 2 * 2 * N_BLOCKS
    assert handle.pinned_bytes() >= disk.pinned_bytes > 0
    handle.remove()
    assert list(folder.iterdir()) == [] and disk.file.closed


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_transformer")
    build_transformer(LAYERS, SINGLE, seed=0).save_pretrained(folder)
    return folder


def test_block_swap_reads_weights_from_the_page_cache(resident, saved_transformer):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(saved_transformer)  # memory-mapped, file dtype
    losses, grads, handle, _ = _step(MemoryOptions(blocks_to_swap=3), steps=2, transformer=transformer)
    _assert_same((losses, grads), resident)
    swap = handle.swap
    if os.path.exists("/proc/self/maps"):  # where mappings can be seen: the weights stayed in the file's pages
        assert swap.converted_bytes == 0 and swap.page_cache_bytes == swap.swapped_block_bytes() > 0
    # the host cost of block swap: the staging ring (two of the largest swapped block), nothing per block
    assert swap.pinned_bytes == page_bytes(RING * swap.slot_bytes)
    # a model built in memory has no file behind it: its swapped weights go to one exact converted buffer
    losses, grads, handle, _ = _step(MemoryOptions(blocks_to_swap=3), steps=2)
    assert handle.swap.page_cache_bytes == 0
    assert handle.swap.converted.nbytes == page_bytes(handle.swap.converted_bytes)
    assert handle.swap.converted_bytes == sum(aligned(src.numel() * src.element_size())
                                              for es in handle.swap.layout.values() for _, _, src in es)


def test_a_dropped_prefetch_or_forward_is_harmless(resident):
    """Forwards that never run backward (samples; a step abandoned by an error) leave prefetched blocks and
    offloaded inputs behind; the next step must still compute exactly."""
    def prepare(transformer):
        pass

    options = MemoryOptions(blocks_to_swap=3, offload_activations=True)
    transformer, network = _trainee()
    handle = setup_memory(transformer, options, "cpu")
    with torch.no_grad():
        flow_loss(transformer, *_inputs(seed=7))  # sampling-like forward: the last block stays loaded
    flow_loss(transformer, *_inputs(seed=8))  # a forward whose backward never runs: its tape is dropped
    handle.swap.prefetch(N_BLOCKS - 3)  # and a prefetch nobody waits for
    losses, grads = [], []
    for s in range(2):
        torch.manual_seed(100 + s)
        loss = flow_loss(transformer, *_inputs(seed=2 + s))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None})
        network.zero_grad(set_to_none=True)
    _assert_same((losses, grads), resident)


def test_offloaded_inputs_are_the_hidden_states_by_name():
    transformer = build_transformer(LAYERS, SINGLE)
    hs, ehs, temb = torch.zeros(1, 4, 32), torch.zeros(1, 7, 32), torch.zeros(1, 32)
    rotary = (torch.zeros(11, 16), torch.zeros(11, 16))
    for block in (transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]):
        assert activation_leaves(block, (hs, ehs, temb, rotary, None)) == [0, 1]

    class Renamed(torch.nn.Module):  # a block whose first argument is not a hidden state: nothing is moved
        def forward(self, temb, hidden_states):
            return hidden_states

    assert activation_leaves(Renamed(), (temb, hs)) == [1]


def test_pinned_buffers_register_whole_pages_of_their_own(monkeypatch):
    """The driver refuses to register a page twice: small buffers side by side must not share one. (The driver
    call is recorded here; tests/test_memory_cuda.py makes it for real.)"""
    import torch.cuda._pin_memory_utils as pmu

    from urae.memory.pinned import PAGE, HostStack

    registered = {}
    monkeypatch.setattr(pmu, "pin_memory", lambda ptr, size: registered.__setitem__(ptr, size))
    monkeypatch.setattr(pmu, "unpin_memory", lambda ptr: registered.pop(ptr))
    stack = HostStack(pin=True)
    views = [stack.take((n,), torch.float32) for n in (3, 700, 5, 1025)]  # the last one needs a second buffer
    spans = sorted((p, p + n) for p, n in registered.items())
    assert len(spans) == 2 and all(a % PAGE == 0 and (b - a) % PAGE == 0 for a, b in spans)
    assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))  # no page registered twice
    assert all(any(a <= v.data_ptr() < b for a, b in spans) for v in views)
    stack.reset()  # the next step: one buffer of the step's total, the pieces unregistered
    assert list(registered.values()) == [page_bytes(sum(aligned(n * 4) for n in (3, 700, 5, 1025)))]
    stack.release()
    assert registered == {}


def test_pinned_memory_is_exact_where_torchs_allocator_rounds_up():
    """torch's caching host allocator (Tensor.pin_memory) rounds every request to a power of two; our buffers
    hold the payload to the page, and host_bytes counts exactly what they allocate."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    assert caching_allocator_bytes(72 * 2**20) == 128 * 2**20 and caching_allocator_bytes(2**20) == 2**20
    assert caching_allocator_bytes(72 * 2**20, round_threshold=64 * 2**20) == 72 * 2**20
    with torch.device("meta"):
        blocks = [FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128),
                  FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128)]
    for block, params, rounded_mib in zip(blocks, (DOUBLE_PARAMS, SINGLE_PARAMS), (1024.27, 416.09)):
        sizes = [t.numel() * 2 for t in block.parameters()]  # bf16
        assert sum(sizes) == 2 * params
        assert sum(caching_allocator_bytes(n) for n in sizes) / 2**20 == pytest.approx(rounded_mib, abs=0.01)
        assert sum(aligned(n) for n in sizes) == sum(sizes)  # FLUX's tensors need no padding
    # the estimate: the staging ring and the 57 offloaded block inputs at 4096², within 1 % of the payload
    options = MemoryOptions(blocks_to_swap=46, offload_activations=True)
    payload = RING * 2 * DOUBLE_PARAMS + 57 * 66048 * 3072 * 2
    assert payload <= host_bytes(options, 4096, 4096) <= 1.01 * payload
    per_tensor_rounding = 57 * (caching_allocator_bytes(65536 * 3072 * 2) + caching_allocator_bytes(512 * 3072 * 2))
    assert per_tensor_rounding / (57 * 66048 * 3072 * 2) > 1.3  # what pin_memory() would have taken
    # and it is what the buffers of a tiny run hold: ring + one stack of the step's inputs, each page-rounded
    _, _, handle, transformer = _step(options.__class__(blocks_to_swap=3, offload_activations=True), steps=2)
    ring = page_bytes(RING * handle.swap.slot_bytes)
    stack = handle.checkpoint.host
    assert len(stack.buffers) == 1 and stack.nbytes == page_bytes(stack.largest_step)
    inputs = N_BLOCKS * sum(aligned(n * 32 * 4) for n in (16, 7))  # 4x4 latent patches and 7 text tokens, fp32
    assert stack.largest_step == inputs and handle.pinned_bytes() == ring + page_bytes(inputs)


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
GB = 10**9
# memory = "auto" with RAM to spare: GPU GiB -> size -> (blocks_to_swap, fp8, offload, checkpoint_segments)
AUTO_TABLE = {
    24: {1024: (15, False, False, 1), 2048: (38, False, False, 1), 4096: (46, False, True, 1)},
    48: {1024: (0, False, False, 1), 2048: (0, False, False, 1), 4096: (44, False, False, 1)},
    80: {1024: (0, False, False, 1), 2048: (0, False, False, 1), 4096: (0, False, False, 1)},
}


@pytest.mark.parametrize("gib", sorted(AUTO_TABLE))
def test_auto_picks_the_documented_configuration(gib):
    for size, (swap, fp8, offload, k) in AUTO_TABLE[gib].items():
        options, peak = choose_memory(gib * GiB, size, size)
        assert options == MemoryOptions(swap, fp8, offload, k), (gib, size, options)
        assert peak == estimate_peak_bytes(options, size, size) <= usable_bytes(gib * GiB) <= 0.9 * gib * GiB
        # the cheapest: one block fewer swapped would not fit
        if swap:
            assert estimate_peak_bytes(MemoryOptions(swap - 1, fp8, offload, k), size, size) > usable_bytes(gib * GiB)


def _auto(gpu_gib, size, ram_gb):
    pinned, ram = host_limits(ram_gb * GB)
    options, peak = choose_memory(gpu_gib * GiB, size, size, host_budget_bytes=pinned, host_ram_bytes=ram)
    return options, peak, step_costs(options, size, size, host_ram_bytes=ram), ram


@pytest.mark.parametrize("gpu,size", [(16, 2048), (24, 4096)])
def test_auto_is_lossless_with_32_gb_of_ram(gpu, size):
    options, peak, cost, ram = _auto(gpu, size, 32)
    assert not options.fp8_base and options.offload_activations != "disk"
    assert peak <= 0.9 * gpu * GiB
    # pinned memory counted as allocated, and the swapped weights' pages fit beside it: no re-reading from disk
    assert cost["pinned"] == host_bytes(options, size, size) and cost["converted"] == 0
    assert cost["pinned"] + cost["page_cache"] <= ram and cost["reread_bytes"] == 0


def test_auto_chooses_by_host_ram():
    # 4096² on 24 GiB: 64 GB of RAM holds the 21.5 GiB of block inputs pinned; 32 GB cannot, and two-level
    # checkpointing (an extra forward) is chosen over the disk
    big, _, _, _ = _auto(24, 4096, 64)
    small, _, cost, _ = _auto(24, 4096, 32)
    assert big.offload_activations is True and big.checkpoint_segments == 1
    assert small.offload_activations is False and small.checkpoint_segments > 1 and 0.2 < cost["extra_flops"] < 1
    # nothing lossless fits 4096² on 16 GiB: fp8, and with 32 GB of RAM its inputs go to the disk
    options, _, cost, _ = _auto(16, 4096, 32)
    assert options.fp8_base and options.offload_activations == "disk" and cost["disk_bytes"] == 2 * cost["disk"]


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


def test_auto_keeps_host_memory_within_its_budgets():
    # with 16 GB of RAM nothing can hold the 4096² block inputs pinned; the message says what it would take
    with pytest.raises(MemoryConfigError, match=r"within 1.0 GiB of pinned host memory and 2.0 GiB of RAM: the "
                                                r"smallest needs a \d+\.\d GiB GPU"):
        choose_memory(16 * GiB, 4096, 4096, host_budget_bytes=GiB, host_ram_bytes=2 * GiB)
    assert host_limits(32 * GB, processes=2) == (int(0.7 * 32 * GB / 2), (32 * GB - 6 * GiB) // 2)
    assert host_limits(64 * GB, available_bytes=20 * GiB)[1] == 20 * GiB


def test_the_plan_line_states_host_memory_extra_flops_and_disk_writes():
    from urae.train_memory import MemoryChoice

    seg = MemoryOptions(blocks_to_swap=55, checkpoint_segments=4)
    line = MemoryChoice(seg, 20 * GiB, "auto", step_costs(seg, 4096, 4096), None, 10_000).summary()
    assert "checkpoint_segments = 4" in line and "+25% FLOPs" in line and "1.3 GiB pinned" in line
    disk = MemoryOptions(blocks_to_swap=46, offload_activations="disk")
    line = MemoryChoice(disk, 20 * GiB, "auto", step_costs(disk, 4096, 4096), "/data", 10_000).summary()
    assert "21.5 GiB written per step, 231.3 TB over 10000 step(s)" in line and "endurance" in line


def test_estimate_agrees_with_the_fake_tensor_count():
    # all-resident peaks of one real-size step counted by benchmarks/bench_memory.py (adapter in bf16 with AdamW
    # there; fp32 with Prodigy in the estimate: +0.31 GiB), and the earlier independent count's 24.6 / 30.6 / 54.5 GiB within 10 %
    for size, measured, design in ((1024, 24.50, 24.6), (2048, 30.49, 30.6), (4096, 54.48, 54.5)):
        est = estimate_peak_bytes(MemoryOptions(), size, size) / GiB
        assert est == pytest.approx(measured + 0.313, abs=0.02) and est == pytest.approx(design, rel=0.10)
    # two-level checkpointing at 2048² (k = 8): counted 26.53 GiB by the same benchmark
    assert estimate_peak_bytes(MemoryOptions(checkpoint_segments=8), 2048, 2048) / GiB == pytest.approx(
        26.53 + 0.313, abs=0.02)
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
    for options in (MemoryOptions(offload_activations=True, blocks_to_swap=2),
                    MemoryOptions(checkpoint_segments=2, blocks_to_swap=2)):
        loss, got = grads(options)
        assert loss == ref_loss
        for k in ref:  # bf16 compute in both, the same ops in the same order: equal up to accumulation order
            torch.testing.assert_close(got[k], ref[k], rtol=1e-2, atol=1e-5)
