"""Peak device memory of one URAE training step at real FLUX.1-dev shapes, per memory configuration.

One step is exactly the trainer's: the transformer (bf16 weights, gradient checkpointing), the rank-16
minor adapter of networks/minor_lora.py on the URAE targets (its SVD skipped: values do not change
memory), urae.memory.setup_memory with the configuration, urae.flow.flow_loss, backward, an optimizer step.
Without a GPU it runs under torch's FakeTensorMode: fake `meta` tensors stand in for the device and fake
`cpu` tensors for host memory, so no real memory is used, and a dispatch mode adds up the bytes of every
live storage per device (a storage counts from the op that made it until it is freed). Attention runs as
the fused kernel a GPU uses (no N² matrix): on `meta` torch would pick the math path otherwise.

Not counted: the CUDA context (~0.5 GiB) and allocator fragmentation; `urae.memory.choose_memory` adds a
margin for them. The fake count holds the 18.7 M adapter parameters in bf16 with AdamW (autocast has no
`meta` device); the trainer keeps them in fp32 with Prodigy's four states, 18 bytes per parameter more:
the estimate column includes those 0.31 GiB.

Beside each row: the bytes the configuration moves between host and device per step, the time floor
that gives at 25 GB/s (PCIe 4.0 x16 in practice), and the step's FLOP floor (3 forward passes: forward,
recompute, input-gradient backward; frozen weights need no weight gradient) on an RTX 4090 (165 TFLOP/s
dense bf16) and an H100 (989). Transfers overlap compute on a side stream, so the slowdown is at most
the excess of the transfer floor over the compute floor.

With a GPU (`--gpu`): the same step for real with random weights, torch.cuda.max_memory_allocated and
the step time relative to all-resident; rows whose configuration targets 24 GB run under
torch.cuda.set_per_process_memory_fraction(24 GB).

With `--host-ram`: what memory = "auto" picks for 16 / 24 / 48 GB GPUs on machines with that much RAM
(urae.memory.auto.host_limits: 6 GiB kept for the system and the process, pinned memory at most 70 % of
RAM), from the estimates alone (seconds): the device peak, pinned host memory (exact: urae.memory.pinned),
weights read from the page cache, weights converted into a host copy, the activation file, bytes moved
per step over PCIe, and the step's floors: the FLOPs at an RTX 4090's 165 TFLOP/s, PCIe at 25 GB/s, the
disk at 2 GB/s (activation file, and the swapped weights read again when RAM cannot keep their pages).

    python benchmarks/bench_memory.py --sizes 2048 4096 --host-ram 32 64   # auto on real machines (seconds)
    python benchmarks/bench_memory.py                      # fake tensors, 1024² 2048² 4096² (CPU, ~12 min)
    python benchmarks/bench_memory.py --sizes 4096 --configs resident fp8+offload
    python benchmarks/bench_memory.py --gpu --sizes 1024 2048
    python benchmarks/bench_memory.py --quick              # tiny model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shlex
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_infer_gpu import FLUX_DEV_TRANSFORMER, flops_per_pass  # noqa: E402
from urae.memory import MemoryOptions, bytes_moved_per_step, choose_memory, estimate_peak_bytes  # noqa: E402

GiB = 2**30
GB = 10**9
PCIE_BYTES_PER_S = 25e9
GPUS_TFLOPS = {"4090": 165e12, "H100": 989e12}
PAPER_MB = {2048: 36124, 4096: 63010}  # URAE Table 8, H100, rank 16, batch 1, gradient checkpointing
# An earlier, independent tensor count of one all-resident step of the trainer at the same shapes.
REFERENCE_GIB = {1024: 24.6, 2048: 30.6, 4096: 54.5}

CONFIGS = {
    "resident": MemoryOptions(),
    "fp8": MemoryOptions(fp8_base=True),
    "offload": MemoryOptions(offload_activations=True),
    "swap19": MemoryOptions(blocks_to_swap=19),
    "swap38": MemoryOptions(blocks_to_swap=38),
    "fp8+offload": MemoryOptions(fp8_base=True, offload_activations=True),
    "swap38+offload": MemoryOptions(blocks_to_swap=38, offload_activations=True),
    "fp8+swap19+offload": MemoryOptions(fp8_base=True, blocks_to_swap=19, offload_activations=True),
    "segments8": MemoryOptions(checkpoint_segments=8),
    "swap53+segments4": MemoryOptions(blocks_to_swap=53, checkpoint_segments=4),
    "swap46+disk": MemoryOptions(blocks_to_swap=46, offload_activations="disk"),
}
QUICK_CONFIGS = {
    "resident": MemoryOptions(),
    "fp8": MemoryOptions(fp8_base=True),
    "offload": MemoryOptions(offload_activations=True),
    "swap3": MemoryOptions(blocks_to_swap=3),
    "fp8+swap3+offload": MemoryOptions(fp8_base=True, blocks_to_swap=3, offload_activations=True),
    "segments2": MemoryOptions(checkpoint_segments=2),
    "swap3+disk": MemoryOptions(blocks_to_swap=3, offload_activations="disk"),
}
AUTO_GB = (16, 24, 48, 80)
HOST_TABLE_GB = (16, 24, 48)


class LiveBytes(TorchDispatchMode):
    """Live storage bytes per device type: + at the op that creates a storage, - when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = {"meta": 0, "cpu": 0, "cuda": 0}
        self.peak = dict(self.live)
        self._seen: set[int] = set()

    def _free(self, key, dev, n):
        self._seen.discard(key)
        self.live[dev] -= n

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, dev = st._cdata, t.device.type
        if key in self._seen or dev not in self.live:
            return
        n = st.nbytes()
        self._seen.add(key)
        self.live[dev] += n
        self.peak[dev] = max(self.peak[dev], self.live[dev])
        weakref.finalize(st, self._free, key, dev, n)

    def reset_peak(self) -> None:
        self.peak = dict(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@contextlib.contextmanager
def fake_device_patches():
    """What the fake `meta` device needs to run the trainer's code as a GPU would (benchmark only)."""
    swap, autocast_on, sdpa = torch.utils.swap_tensors, torch.is_autocast_enabled, torch.nn.functional.scaled_dot_product_attention

    def swap_or_set(t1, t2):  # Module.to on fake parameters swaps tensors, which FakeTensorMode's weakrefs forbid
        try:
            swap(t1, t2)
        except RuntimeError:
            t1.data = t2.data

    def autocast_enabled(*a):  # autocast has no `meta` device type
        return False if a and a[0] == "meta" else autocast_on(*a)

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                      is_causal, scale=scale)[0]

    torch.utils.swap_tensors, torch.is_autocast_enabled = swap_or_set, autocast_enabled
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    try:
        yield
    finally:
        torch.utils.swap_tensors, torch.is_autocast_enabled = swap, autocast_on
        torch.nn.functional.scaled_dot_product_attention = sdpa


def build(cfg: dict, device, dtype, rank: int):
    """The transformer with the URAE minor adapter attached (SVD skipped), as the trainer sets it up."""
    from diffusers import FluxTransformer2DModel

    import networks.minor_lora as ml

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**cfg).requires_grad_(False)
    finally:
        torch.set_default_dtype(old)
    transformer.enable_gradient_checkpointing()
    with torch.device(device):
        network = ml.create_network(1.0, rank, rank, None, [], transformer, init="minor", verbose="False")
    network.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
    for lo in network.unet_loras:
        lo.initialized = True
    return transformer, network


def step_inputs(cfg, width, height, device, batch=1, txt=512):
    g = {"device": device}
    x0 = torch.randn(batch, 16, height // 8, width // 8, **g)
    return (x0, torch.randn(batch, txt, cfg["joint_attention_dim"], **g),
            torch.randn(batch, cfg["pooled_projection_dim"], **g), torch.rand(batch, **g), torch.randn_like(x0))


def train_step(transformer, network, device, inputs, options, cfg) -> tuple:
    import tempfile

    from urae.flow import flow_loss
    from urae.memory import setup_memory

    # swapped weights as read from a bf16 file: their host pages stand for the page cache (fake host tensors here)
    source = (lambda t: t.detach().to("cpu")) if device == "meta" else None
    handle = setup_memory(transformer, options, device, disk_dir=tempfile.gettempdir(), source=source)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
    return handle, optimizer, lambda: _step(transformer, optimizer, inputs, flow_loss)


def _step(transformer, optimizer, inputs, flow_loss):
    loss = flow_loss(transformer, *inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_fake(cfg, size: int, options: MemoryOptions, rank: int = 16) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    with fake_device_patches(), FakeTensorMode(allow_non_fake_inputs=True):
        transformer, network = build(cfg, "meta", torch.bfloat16, rank)
        network.to(torch.bfloat16)  # autocast's compute copies: no fp32 activation copies (see the docstring)
        network.requires_grad_(True)
        counter = LiveBytes()
        for t in list(transformer.parameters()) + list(transformer.buffers()) + list(network.parameters()) \
                + list(network.buffers()):
            counter.track(t)
        with counter:
            inputs = step_inputs(cfg, size, size, "meta")
            handle, _, step = train_step(transformer, network, "meta", inputs, options, cfg)
            settled = counter.live["meta"]
            counter.reset_peak()
            step()
        stats = handle.stats
    return {"device_peak": counter.peak["meta"], "device_settled": settled, "host_peak": counter.peak["cpu"],
            "moved": stats.total_bytes(), "weight_loads": stats.weight_loads, "seconds": time.perf_counter() - t0}


class GpuModel:
    """One real-size model per size on the host (random weights), reused by every configuration: each row
    applies its options, steps, and puts the model back on the host."""

    def __init__(self, cfg, rank: int):
        self.cfg = cfg
        self.transformer, self.network = build(cfg, "meta", torch.bfloat16, rank)
        self.transformer.to_empty(device="cpu")
        self.network.to_empty(device="cpu")
        with torch.no_grad():
            for p in self.transformer.parameters():
                p.normal_(0, 0.02)
            for t in list(self.network.parameters()) + list(self.network.buffers()):
                t.normal_(0, 0.01)
        self.network.requires_grad_(True)

    def measure(self, size: int, options: MemoryOptions, cap_bytes: int | None, repeats: int = 2) -> dict:
        dev = torch.device("cuda")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total) if cap_bytes else 1.0)
        self.network.to(dev)
        inputs = step_inputs(self.cfg, size, size, dev)
        torch.cuda.reset_peak_memory_stats()
        handle = None
        try:
            handle, _, step = train_step(self.transformer, self.network, dev, inputs, options, self.cfg)
            times = []
            with torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
            res = {"device_peak": torch.cuda.max_memory_allocated(), "seconds": min(times),
                   "moved": handle.stats.total_bytes() // repeats, "status": "ok"}
        except torch.cuda.OutOfMemoryError:
            res = {"device_peak": None, "seconds": None, "moved": None, "status": "OOM"}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)  # putting things back may need more than the cap
            for p in self.network.parameters():
                p.grad = None
            if handle is not None:
                handle.remove()
            self.transformer.to("cpu")
            gc.collect()
            torch.cuda.empty_cache()
        return res


def configs_for(names: list[str], size: int, table: dict) -> list[tuple[str, MemoryOptions, int | None]]:
    rows = []
    for name in names:
        if name.startswith("auto"):
            gb = int(name[4:])
            options, _ = choose_memory(gb * GiB, size, size)
            rows.append((f"auto {gb} GiB", options, gb * GiB))
        else:
            rows.append((name, table[name], None))
    return rows


def step_flops(cfg, size: int) -> float:
    return 3 * flops_per_pass(cfg, size, size)


def host_ram_table(sizes: list[int], rams_gb: list[int]) -> list[dict]:
    """memory = auto on machines with `rams_gb` GB of RAM: estimates only."""
    from urae.memory.auto import host_limits
    from urae.memory.estimate import step_costs

    rows = []
    print("memory = auto for FLUX.1-dev (rank 16, batch 1) by GPU and host RAM; estimates. GiB = 2^30 bytes; "
          "pinned = exact pinned bytes (torch's allocator would round each block to a power of two); page cache = "
          "swapped weights read from the model files; converted = a host copy of swapped weights (fp8); disk = the "
          "activation file; moved = PCIe bytes per step; floors in seconds per step: FLOPs at 165 TFLOP/s (RTX 4090), "
          "PCIe at 25 GB/s, disk at 2 GB/s")
    head = (f"{'size':>5} {'GPU':>4} {'RAM':>4}  {'configuration':<52} {'lossless':>8} {'peak':>6} {'of GPU':>6} "
            f"{'pinned':>7} {'p.cache':>7} {'conv.':>6} {'disk':>6} {'moved':>6} {'FLOP s':>6} {'PCIe s':>6} "
            f"{'disk s':>6}")
    for size in sizes:
        print("\n" + head)
        for gb in HOST_TABLE_GB:
            for ram_gb in rams_gb:
                pinned_budget, ram = host_limits(ram_gb * GB)
                try:
                    options, peak = choose_memory(gb * GiB, size, size, host_budget_bytes=pinned_budget,
                                                  host_ram_bytes=ram)
                except ValueError as e:
                    print(f"{size:>5} {gb:>4} {ram_gb:>4}  nothing fits: {e}")
                    continue
                c = step_costs(options, size, size, host_ram_bytes=ram)
                rows.append({"size": size, "gpu_gb": gb, "ram_gb": ram_gb, "options": options.to_dict(),
                             "peak": peak, **c})
                print(f"{size:>5} {gb:>4} {ram_gb:>4}  {options.describe():<52} {'no' if options.fp8_base else 'yes':>8} "
                      f"{peak / GiB:6.2f} {peak / (gb * GiB):6.2f} {c['pinned'] / GiB:7.2f} {c['page_cache'] / GiB:7.2f} "
                      f"{c['converted'] / GiB:6.2f} {c['disk'] / GiB:6.2f} {c['pcie_bytes'] / GiB:6.1f} "
                      f"{c['compute_s']:6.1f} {c['pcie_s']:6.2f} {c['disk_s']:6.1f}")
    return rows


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--configs", nargs="+",
                    help=f"of {', '.join(CONFIGS)}, autoN (choose_memory for an N GiB GPU; default: all and auto16 "
                         f"auto24 auto48 auto80)")
    ap.add_argument("--gpu", action="store_true", help="measure on the GPU for real (random weights)")
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU, fake tensors: a smoke run")
    ap.add_argument("--host-ram", type=int, nargs="+", metavar="GB",
                    help="print what memory = auto picks for 16/24/48 GB GPUs on machines with this much RAM (estimates)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    print("command: " + shlex.join(["python", "benchmarks/bench_memory.py", *(sys.argv[1:] if argv is None else argv)]))
    if a.host_ram:
        rows = host_ram_table(a.sizes, a.host_ram)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return 0
    names = a.configs or [*CONFIGS, *(f"auto{gb}" for gb in AUTO_GB)]
    if a.quick:
        from urae.tiny import transformer_config

        cfg, sizes, rank, table = transformer_config(2, 2), [128], 4, QUICK_CONFIGS
        names = a.configs or list(QUICK_CONFIGS)
        unit, unit_name, big, big_name = 2**10, "KiB", 10**3, "kB"
    else:
        cfg, sizes, rank, table = dict(FLUX_DEV_TRANSFORMER), a.sizes, 16, CONFIGS
        unit, unit_name, big, big_name = GiB, "GiB", GB, "GB"
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    if a.gpu and not torch.cuda.is_available():
        print("error: --gpu needs CUDA")
        return 2
    where = torch.cuda.get_device_name() if a.gpu else "fake tensors (meta = device, cpu = host), CPU only"
    print(f"{'TINY model, ' if a.quick else 'FLUX.1-dev shapes, '}rank {rank} minor adapter on the URAE targets, "
          f"bf16 weights, gradient checkpointing, AdamW; measured with {where}")
    print("peak = device bytes live at the step's peak (CUDA context and fragmentation not included); est. = "
          "urae.memory.estimate_peak_bytes; moved = host<->device bytes per step")
    rows = []
    gpu_model = GpuModel(cfg, rank) if a.gpu else None
    for size in sizes:
        flops = step_flops(cfg, size)
        floors = ", ".join(f"{k} {flops / v:.2f} s" for k, v in GPUS_TFLOPS.items())
        paper = f"; paper Table 8: {PAPER_MB[size]:,} MB = {PAPER_MB[size] * 1e6 / GiB:.1f} GiB" if size in PAPER_MB and not a.quick else ""
        design = (f"; earlier all-resident count {REFERENCE_GIB[size]} GiB" if size in REFERENCE_GIB and not a.quick
                  else "")
        print(f"\n{size}x{size}: step FLOP floor {flops / 1e15:.2f} PFLOP ({floors}){paper}{design}")
        print(f"{'configuration':<22} {'options':<48} {'peak ' + unit_name:>9} {'est. ' + unit_name:>9} "
              f"{'host ' + unit_name:>9} {'moved ' + big_name:>9} {'@25GB/s s':>10}"
              + ("  step s  vs resident" if a.gpu else ""))
        base_s = None
        for name, options, cap in configs_for([n for n in names if not (a.quick and n.startswith("auto"))], size, table):
            r = gpu_model.measure(size, options, cap if cap and cap <= 24 * GiB else None) if a.gpu \
                else measure_fake(cfg, size, options, rank)
            est = estimate_peak_bytes(options, size, size, rank=rank) if not a.quick else None
            moved = r["moved"] if r["moved"] is not None else bytes_moved_per_step(options, size, size)
            row = {"size": size, "config": name, "options": options.to_dict(), "estimate": est, **r}
            rows.append(row)
            peak = f"{r['device_peak'] / unit:9.2f}" if r["device_peak"] is not None else f"{r.get('status', '-'):>9}"
            line = (f"{name:<22} {options.describe():<48} {peak} {(est / unit if est else float('nan')):9.2f} "
                    f"{r.get('host_peak', 0) / unit:9.2f} {moved / big:9.1f} {moved / PCIE_BYTES_PER_S:10.2f}")
            if a.gpu and r["seconds"]:
                base_s = base_s or (r["seconds"] if name == "resident" else None)
                line += f"  {r['seconds']:6.2f}  " + (f"{r['seconds'] / base_s:.2f}x" if base_s else "-")
            print(line + ("" if a.gpu else f"   ({r['seconds']:.0f} s to count)"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
