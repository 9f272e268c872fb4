"""Steady-state inference speed and GPU memory of real-size FLUX.1-dev with random weights (no download).

Builds the FLUX.1-dev transformer from its config directly on the GPU in bf16 (on the meta device
first, so the 24 GB of weights never pass through host memory) and the real-size FLUX VAE, then runs
rows of denoising steps through urae.sampling.generate (the inference entry point's code path) with
random T5 (512 x 4096) and pooled CLIP (768) embeddings in place of the text encoders: one transformer
pass per step with the guidance embedding (3.5), static shift, the URAE runtime through
urae.runtime.apply_highres, and the VAE decode that inference runs at that size (split into row chunks
above 2048²). Time and memory do not depend on weight values.

Each row (one size, proportional attention on or off) runs warm-up steps at its own size, then timed
steps; the median timed step gives the steady-state s/step, TFLOP/s and the 28-step time, with
pipeline set-up and the cold first step left out. The last warm-up step is profiled to record the
attention kernel that actually ran, and every SDPA backend is tried on the exact q/k/v layout that
diffusers passed. The GPU's own bf16 matmul rate is measured first; efficiency is quoted against it.
The VAE decode alone at 4096² runs split (ours, exact), tiled (diffusers' approximate tiles) and
untiled (an OOM is a result). A time budget skips rows that would not fit and stops a row from inside
when its remaining steps and decode would overrun.

Without CUDA the same script runs the tiny configuration (urae.tiny) on the CPU as a smoke check.

    python benchmarks/bench_infer_gpu.py                       # GPU: 1024² 2048² 4096², within 480 s
    python benchmarks/bench_infer_gpu.py --attention urae      # only the URAE setting (proportional attention on)
    python benchmarks/bench_infer_gpu.py --sizes 4096 --json out.json
    python benchmarks/bench_infer_gpu.py --quick               # smoke run (CPU: seconds)
    python benchmarks/bench_infer_gpu.py --speed --sizes 2048  # a row per speed option (benchmarks/speed_rows.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.gpu_probes import Device, KernelProbe, SdpaCall, is_oom, matmul_ceiling, probe_backends  # noqa: E402

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# FLUX.1 ae.safetensors in diffusers terms; sample_size 1024 makes diffusers' decode tiles 1024² pixels.
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
T5_LENGTH = 512

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 datasheet figure (H200: same compute)
ANCHOR_S = 5 * 60  # a note in the public URAE code's inference_4k.ipynb: about 5 minutes per 4096² image
GOAL_S = 3 * 60

FLOP_FORMULA = ("FLOP per transformer pass = B x (24 D^2 N + 4 D N^2) + 2 D (2 C N_img + J N_txt), with B = 57 blocks "
                "(19 double + 38 single), D = 3072, N = N_txt + N_img, N_txt = 512, N_img = (H/16)(W/16), C = 64, "
                "J = 4096. Each block spends 12 D^2 multiply-adds per token (q/k/v/out 4 D^2 + MLP 8 D^2; the double "
                "blocks route text and image tokens through separate weights, so per token they cost what a single "
                "block costs) and 2 D N^2 in QK^T and PV; AdaLN modulation runs once per image, not per token, and "
                "elementwise work (norms, RoPE, softmax) is left out. torch.utils.flop_counter on the meta device "
                "counts the same to 1e-5.")


def flops_per_pass(cfg: dict, width: int, height: int, txt: int = T5_LENGTH) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_img = (height // 16) * (width // 16)
    n = n_img + txt
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    return blocks * (24 * d * d * n + 4 * d * n * n) + 2 * d * (2 * cfg["in_channels"] * n_img
                                                                + cfg["joint_attention_dim"] * txt)


def params_estimate_flops(n_params: float, width: int, height: int, cfg: dict, txt: int = T5_LENGTH) -> float:
    """A rougher count: 2 x parameters x tokens + attention (counts AdaLN and both streams per token)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = (height // 16) * (width // 16) + txt
    return 2 * n_params * n + (cfg["num_layers"] + cfg["num_single_layers"]) * 4 * d * n * n


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """nn.Linear-like scales (uniform +-1/sqrt(fan_in)), norm scales 1, biases 0: activations stay finite."""
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            bound = p[0].numel() ** -0.5
            p.uniform_(-bound, bound, generator=g)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_transformer(cfg: dict, dev: Device):
    """Built on the meta device in the target dtype, then materialised on the target device: no host copy."""
    from diffusers import FluxTransformer2DModel

    with default_dtype(dev.dtype), torch.device("meta"):  # meta parameters in the target dtype: no cast later
        model = FluxTransformer2DModel(**cfg)
    model.to_empty(device=dev.torch)
    init_random_(model)
    return model.eval().requires_grad_(False)


def build_vae(tiny: bool, dev: Device):
    from diffusers import AutoencoderKL

    if tiny:
        from urae.tiny import build_vae as tiny_vae

        with default_dtype(dev.dtype):  # built in the target dtype: a cast afterwards makes diffusers warn
            return tiny_vae().to(dev.torch).requires_grad_(False)
    torch.manual_seed(0)
    with default_dtype(dev.dtype), torch.device(dev.torch):  # random init on the GPU in bf16: no host copy, no cast
        vae = AutoencoderKL(**FLUX_VAE)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def bench_vae(vae, size: int, dev: Device) -> list[dict]:
    """Decode one size² image from random latents: split (what inference uses), diffusers-tiled, whole.

    An OOM is a result, not a failure."""
    from urae.vae_decode import decode
    lat = size // 8
    if vae.config.sample_size < FLUX_VAE["sample_size"]:
        # The tiny VAE's 64-pixel tiles would make thousands of tiles; keep the real run's geometry instead
        # (4096² in 1024² tiles: a quarter of the side).
        vae.tile_sample_min_size, vae.tile_latent_min_size = max(64, size // 4), max(8, lat // 4)
    z = torch.randn(1, 16, lat, lat, generator=torch.Generator().manual_seed(0)).to(dev.torch, dev.dtype)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    vae.use_tiling = False
    vae.decode(z[..., :32, :32], return_dict=False)  # warm-up: kernel selection must not count against the first mode
    rows = []
    for mode in ("split", "tiled", "untiled"):
        vae.use_tiling = mode == "tiled"
        dev.free()
        dev.reset_peak()
        row = {"size": size, "mode": mode}
        try:
            dev.sync()
            t0 = time.perf_counter()
            out = decode(vae, z, split=True) if mode == "split" else vae.decode(z, return_dict=False)[0]
            dev.sync()
            row.update(seconds=time.perf_counter() - t0, status="ok", shape=list(out.shape))
            row["peak_gib"], row["reserved_gib"] = dev.peaks()
            del out
        except RuntimeError as e:  # OOM, or a kernel's size limit (4096² x 128 channels is 2^31 elements)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            row.update(seconds=None, status="OOM" if is_oom(e) else f"failed: {first[:100]}")
            row["peak_gib"], row["reserved_gib"] = dev.peaks()
        finally:
            vae.use_tiling = False  # generate() decides tiling per size from here on
        rows.append(row)
        dev.free()
    return rows


def make_pipeline(transformer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from urae.tiny import FLUX_DEV_SCHEDULER

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


class _OverBudget(Exception):
    """Raised from the step callback: the row's remaining steps and decode would run past the time budget."""


def run_row(pipe, cfg: dict, size: int, proportional: bool, embeds, dev: Device, *, warmup: int, timed: int,
            image_steps: int, left, decode_est: float) -> tuple[dict, SdpaCall | None]:
    """Warm-up steps at this size, timed steps, then inference's own decode; the step marks split them apart.

    left(): seconds of the budget left; after each step the row stops if the steps still to run and the decode
    would not fit in it."""
    from urae.runtime import HighResSettings
    from urae.sampling import SampleRequest, generate
    from urae.vae_decode import SPLIT_DECODE_PIXELS

    settings = HighResSettings.for_resolution(size, size, proportional_attention=proportional)
    total = warmup + timed
    req = SampleRequest("random embeddings", size, size, seed=0, steps=total)
    probe = KernelProbe(dev)
    marks: list[float] = []
    row = {"size": size, "proportional_attention": proportional, "ntk_factor": settings.ntk_factor,
           "warmup_steps": warmup, "timed_steps": timed, "image_steps": image_steps,
           "flop_per_step": flops_per_pass(cfg, size, size),
           "decode_path": "split" if size * size > SPLIT_DECODE_PIXELS else "whole"}

    def on_step():
        dev.sync()  # kernels run ahead of Python; a mark must mean the step is done
        i = len(marks)  # the step that just ended
        if i == warmup - 1:
            probe.stop()
        elif i == warmup - 2:
            probe.start()  # the last warm-up step is profiled: kernels are chosen by then, and it is not timed
        marks.append(time.perf_counter())
        if i == total - 1:
            row["peak_denoise_gib"], row["reserved_denoise_gib"] = dev.peaks()
        gaps = [b - a for a, b in zip([t0, *marks], marks)]
        recent = [gp for j, gp in enumerate(gaps) if j != warmup - 1] or gaps  # a profiled step is slower
        need = (total - 1 - i) * recent[-1] + decode_est
        if need > left():
            raise _OverBudget(f"stopped for the budget after {i + 1} of {total} steps "
                              f"(~{need:.0f} s more needed, {max(0.0, left()):.0f} s left)")

    dev.reset_peak()
    dev.sync()
    t0 = time.perf_counter()
    if warmup == 1:
        probe.start()
    try:
        generate(pipe, req, settings, prompt_embeds=embeds, on_step=on_step)
        status = "ok"
    except _OverBudget as e:
        status = str(e)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        status = f"OOM after {len(marks)} step(s)"
    finally:
        probe.stop()  # still running when the row ended before its profiled step
    dev.sync()
    end = time.perf_counter()
    row.setdefault("peak_denoise_gib", dev.peaks()[0])
    row.setdefault("reserved_denoise_gib", dev.peaks()[1])
    row["peak_gib"], row["reserved_gib"] = dev.peaks()
    step_s = [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:])]  # timed steps only
    row.update(status=status, step_seconds=step_s, first_step_s=marks[0] - t0 if marks else None,
               s_per_step=statistics.median(step_s) if step_s else None)
    if step_s:
        row["tflops"] = row["flop_per_step"] / row["s_per_step"] / 1e12
        row["denoise_image_s"] = image_steps * row["s_per_step"]
    if status == "ok":
        row["decode_s"] = end - marks[-1]  # inference's decode at this size, plus the conversion to PIL
        row["image_s"] = row["denoise_image_s"] + row["decode_s"]
    row["attention"] = probe.summary()
    dev.free()
    return row, probe.mode


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def decode_estimate(decodes: dict[int, float], size: int) -> float:
    """Seconds for inference's decode at `size`: measured if it was, else the largest measured one scaled by
    pixels, doubled (the split path above 2048² stages through host memory); 0 before any was measured."""
    if size in decodes:
        return decodes[size]
    if not decodes:
        return 0.0
    ref = max(decodes)
    return 2 * decodes[ref] * (size / ref) ** 2


def print_anchor(cfg: dict, n_params: float, tiny: bool, ceiling: float) -> None:
    f_ours = flops_per_pass(FLUX_DEV_TRANSFORMER, 4096, 4096)
    f_params = params_estimate_flops(11.9e9, 4096, 4096, FLUX_DEV_TRANSFORMER)
    print("anchor: a note in the public URAE code (inference_4k.ipynb) says about 5 min per 4096x4096 image on an "
          "H100; goal here: <= 3 min on an H100")
    print(f"floor: 28 steps x {f_params / 1e15:.1f} PFLOP (2 x 11.9e9 parameters x 66,048 tokens + attention) at "
          f"{H100_BF16_DENSE / 1e12:.0f} TFLOP/s (H100 dense bf16 datasheet) = {28 * f_params / H100_BF16_DENSE / 60:.1f} "
          f"min; the per-token count below gives {f_ours / 1e15:.2f} PFLOP per step = "
          f"{28 * f_ours / H100_BF16_DENSE / 60:.1f} min"
          + ("" if tiny else f", {28 * f_ours / (ceiling * 1e12) / 60:.1f} min at this GPU's measured matmul ceiling"))
    print(FLOP_FORMULA)
    if tiny:
        print(f"(this run: tiny config, {n_params / 1e3:.0f} K parameters; the same formula with its D, blocks and dims)")


def _attn(proportional: bool) -> str:
    return "on" if proportional else "off"


def print_report(results: dict, dev: Device, tiny: bool) -> None:
    ceiling = results["matmul_ceiling"]["tflops"]
    n = results["image_steps"]
    print(f"\nsteady state per row: {results['warmup_steps']} warm-up step(s) at the row's own size, then "
          f"{results['timed_steps']} timed; s/step = median timed step; {n}-step s = {n} x s/step (pipeline set-up and "
          "the cold first step left out); decode s = inference's decode at that size (split above 2048x2048) plus the "
          "conversion to PIL; image s = both. Guidance 3.5 (one pass per step), T5 length "
          f"{T5_LENGTH}, batch 1, {str(dev.dtype).removeprefix('torch.')}. % ceil = TFLOP/s over this device's measured "
          f"matmul ceiling ({ceiling:.4g} TFLOP/s). Memory in GiB: peak allocated / peak reserved by the allocator, "
          "while denoising and over the whole row")
    print(f"{'size':>10} {'prop.':>5} {'ntk':>4} {'s/step':>8} {'TFLOP/s':>8} {'% ceil':>6} {f'{n}-step s':>10} "
          f"{'decode s':>9} {'image s':>8} {'denoise GiB':>13} {'row GiB':>13}  SDPA kernel")
    for r in results["rows"]:
        head = f"{r['size']:>5}x{r['size']:<4} {_attn(r['proportional_attention']):>5} {r['ntk_factor']:>4g}"
        mem = [f"{_fmt(r.get(a), '.1f', 'n/a')}/{_fmt(r.get(b), '.1f', 'n/a')}"
               for a, b in (("peak_denoise_gib", "reserved_denoise_gib"), ("peak_gib", "reserved_gib"))]
        eff = r["tflops"] / ceiling if r.get("tflops") else None
        print(f"{head} {_fmt(r['s_per_step'], '8.4f', '       -')} {_fmt(r.get('tflops'), '8.4g', '       -')} "
              f"{_fmt(eff, '6.0%', '     -')} {_fmt(r.get('denoise_image_s'), '10.2f', '         -')} "
              f"{_fmt(r.get('decode_s'), '9.2f', '        -')} {_fmt(r.get('image_s'), '8.2f', '       -')} "
              f"{mem[0]:>13} {mem[1]:>13}  {r['attention']['kernel']}"
              + ("" if r["status"] == "ok" else f"  [{r['status']}]"))
    for s in results["skipped"]:
        print(f"{s['size']:>5}x{s['size']:<4} {_attn(s['proportional_attention']):>5}  skipped for the budget: needs "
              f"~{s['estimated_s']:.0f} s, {s['left_s']:.0f} s were left")

    if results["sdpa_layouts"]:
        print("\nSDPA backends forced one at a time on q/k/v with the shapes, strides and dtype diffusers passed "
              "(ms per call; 'unavailable' = torch refused that backend for this layout)")
    for lay in results["sdpa_layouts"]:
        c = lay["call"]
        print(f"  {lay['size']}x{lay['size']}: q/k/v {c['shapes'][0]} strides {c['strides'][0]} "
              f"(contiguous {c['contiguous'][0]}), {c['dtype']}")
        for name, b in lay["backends"].items():
            print(f"    {name:>16}: " + (f"{b['ms']:.3f} ms" if b.get("status") == "ok" else
                                         f"{b.get('status', '')} {b.get('why', b.get('skipped', ''))}"))
    kernels = [(r, k) for r in results["rows"] for k in r["attention"]["gpu_kernels_ms"]]
    if kernels:
        print("\nGPU kernels of the attention in the profiled step (ms in that step)")
        for r, (name, ms) in kernels:
            print(f"  {r['size']}x{r['size']} {_attn(r['proportional_attention']):>3}: {ms:9.2f}  {name}")

    if results["vae"]:
        v = results["vae"][0]["size"]
        print(f"\nVAE decode alone, {v}x{v} (latent 16x{v // 8}x{v // 8}), batch 1, before the transformer was built "
              "(GiB = the VAE's own peak allocated / reserved)")
        print(f"{'mode':>8} {'seconds':>8} {'GiB':>13}  status")
        for r in results["vae"]:
            mem = f"{_fmt(r['peak_gib'], '.2f', 'n/a')}/{_fmt(r['reserved_gib'], '.2f', 'n/a')}"
            print(f"{r['mode']:>8} {_fmt(r['seconds'], '8.2f', '       -')} {mem:>13}  {r['status']}")

    best = [r for r in results["rows"] if r.get("image_s") and r["size"] == 4096 and r["proportional_attention"]]
    if best and not tiny:
        r = best[0]
        s = 28 * r["s_per_step"] + r["decode_s"]  # the goal is for FLUX.1-dev's 28 steps, whatever --steps says
        need = 28 * r["flop_per_step"] / max(1.0, GOAL_S - r["decode_s"]) / 1e12
        note = "" if "H100" in dev.name else f" (this device is {dev.name}, not an H100: compare with care)"
        print(f"\n4096x4096 with the URAE runtime: {s:.0f} s = {s / 60:.2f} min per image (28 steps + decode); anchor "
              f"{ANCHOR_S / 60:.0f} min, goal <= {GOAL_S / 60:.0f} min: {'met' if s <= GOAL_S else 'not met'}{note}; "
              f"denoising at {r['tflops']:.0f} TFLOP/s = {r['tflops'] / ceiling:.0%} of this GPU's measured bf16 matmul "
              f"ceiling ({ceiling:.0f} TFLOP/s); the goal needs {need:.0f} TFLOP/s with this decode")
    elif tiny:
        print("\nsmoke check only: run on a CUDA GPU for real-size figures")


def main(argv=None) -> int:
    t_start = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # a run killed at its time limit still shows what it measured
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", help="square sizes (GPU default 1024 2048 4096; CPU 256 512)")
    ap.add_argument("--attention", choices=("both", "urae", "stock"), default="both",
                    help="urae: proportional attention on (NTK as URAE picks it per size); stock: off; both (default): "
                         "on first, then off, at every size")
    ap.add_argument("--warmup-steps", type=int, help="untimed steps at each row's own size (default 2)")
    ap.add_argument("--timed-steps", type=int, help="timed steps per row (default 5 on GPU, 3 on CPU)")
    ap.add_argument("--steps", type=int, default=28, help="steps the per-image time is given for (default 28, "
                                                          "FLUX.1-dev's)")
    ap.add_argument("--vae-size", type=int, help="size of the VAE-only decode (GPU default 4096; CPU 512); 0 skips it")
    ap.add_argument("--budget-seconds", type=float, default=480,
                    help="time budget from start: a row that would not fit is skipped, and a row stops before a step "
                         "or decode that would overrun (default 480: fits a 10-minute window with start-up; 0 = none)")
    ap.add_argument("--quick", action="store_true", help="smoke run: smallest size, few steps, small VAE decode")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON (rewritten after every measurement)")
    ap.add_argument("--cpu", action="store_true", help="run the tiny CPU smoke check even when CUDA is available")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--speed", action="store_true", help="instead of the attention rows: one row per inference "
                    "speed option (cache, backend, compile) with its difference to the dense image; GPU sizes "
                    "default 2048 4096, no VAE-only decode")
    ap.add_argument("--speed-options", nargs="+", help="rows for --speed: dense, compile, backend:NAME, fbcache, "
                    "taylorseer, magcache, or several joined with + (default: benchmarks/speed_rows.py GPU_OPTIONS)")
    ap.add_argument("--speed-steps", type=int, help="steps of each --speed image (default 28 on GPU, 3 on CPU)")
    a = ap.parse_args(argv)

    dev = Device(a.cpu, a.dtype)
    tiny = not dev.cuda
    if a.quick:
        sizes, timed, vae_size = ([1024], 3, 2048) if dev.cuda else ([128], 2, 128)
    else:
        sizes, timed, vae_size = ([1024, 2048, 4096], 5, 4096) if dev.cuda else ([256, 512], 3, 512)
    if a.speed:
        sizes, vae_size = ([2048, 4096] if dev.cuda else sizes), 0
    sizes = sorted(a.sizes or sizes)  # ascending: each row's measured rate predicts the next, larger one
    warmup = 2 if a.warmup_steps is None else a.warmup_steps
    timed = a.timed_steps or timed
    vae_size = vae_size if a.vae_size is None else a.vae_size
    for s in sizes + ([vae_size] if vae_size else []):
        if s <= 0 or s % 16:
            ap.error(f"size {s} is not a positive multiple of 16")
    if warmup < 1 or timed < 1 or a.steps < 1:
        ap.error("--warmup-steps, --timed-steps and --steps must be at least 1")
    if a.budget_seconds < 0:
        ap.error("--budget-seconds must be >= 0")
    budget = a.budget_seconds or float("inf")

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    import diffusers

    from urae.tiny import transformer_config

    cfg = dict(transformer_config()) if tiny else dict(FLUX_DEV_TRANSFORMER)
    print("command: " + shlex.join(["python", "benchmarks/bench_infer_gpu.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"device: {dev.name}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{str(dev.dtype).removeprefix('torch.')}")
    if tiny:
        print("NO CUDA: smoke check with the TINY configuration (urae.tiny) on the CPU; the figures below say nothing "
              "about real-size FLUX.1 inference")

    results = {"device": dev.name, "cuda": dev.cuda, "tiny": tiny, "dtype": str(dev.dtype),
               "torch": torch.__version__, "diffusers": diffusers.__version__, "sizes": sizes,
               "attention": a.attention, "warmup_steps": warmup, "timed_steps": timed, "image_steps": a.steps,
               "budget_seconds": a.budget_seconds, "flop_formula": FLOP_FORMULA, "transformer_config": cfg,
               "matmul_ceiling": None, "vae": [], "rows": [], "skipped": [], "sdpa_layouts": []}

    def save():  # after every measurement: a run cut short by its time window keeps what it measured
        if a.json:
            tmp = Path(a.json).with_name(Path(a.json).name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=str))
            os.replace(tmp, a.json)

    results["matmul_ceiling"] = ceiling = matmul_ceiling(dev)
    save()
    for m in ceiling["shapes"]:
        print(f"matmul {m['m']}x{m['k']} @ {m['k']}x{m['n']} {ceiling['dtype']}: {m['tflops']:.4g} TFLOP/s")
    print(f"matmul ceiling of this device: {ceiling['tflops']:.4g} TFLOP/s (efficiencies below are against this)")

    vae = build_vae(tiny, dev)
    if vae_size:
        results["vae"] = bench_vae(vae, vae_size, dev)
        save()
        for r in results["vae"]:
            print(f"  VAE decode {vae_size}x{vae_size} {r['mode']}: {r['status']}, "
                  f"{_fmt(r['seconds'], '.2f')} s, peak {_fmt(r['peak_gib'], '.2f', 'n/a')} GiB allocated, "
                  f"{_fmt(r['reserved_gib'], '.2f', 'n/a')} GiB reserved", flush=True)

    t0 = time.perf_counter()
    transformer = build_transformer(cfg, dev)
    dev.sync()
    n_params = sum(p.numel() for p in transformer.parameters())
    results.update(build_seconds=time.perf_counter() - t0, parameters=n_params, weights_gib=dev.allocated_gib())
    count = f"{n_params / 1e6:.2f} M" if tiny else f"{n_params / 1e9:.2f} B"
    print(f"transformer: {count} parameters, built on {dev.torch} in {results['build_seconds']:.1f} s"
          + (f", {results['weights_gib']:.1f} GiB allocated with the VAE" if dev.cuda else ""))
    print_anchor(cfg, n_params, tiny, ceiling["tflops"])

    pipe = make_pipeline(transformer, vae)
    g = torch.Generator().manual_seed(0)
    embeds = (torch.randn(1, T5_LENGTH, cfg["joint_attention_dim"], generator=g).to(dev.torch, dev.dtype),
              torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(dev.torch, dev.dtype))

    if a.speed:
        from benchmarks.speed_rows import CPU_OPTIONS, GPU_OPTIONS, parse_option, print_speed_report, run_speed

        options = a.speed_options or (GPU_OPTIONS if dev.cuda else CPU_OPTIONS)
        for o in options:
            try:
                parse_option(o, dev.cuda)
            except ValueError as e:
                ap.error(str(e))
        steps = a.speed_steps or (28 if dev.cuda else 3)
        results.update(speed_rows=[], speed_skipped=[], speed_steps=steps, speed_options=list(options))
        run_speed(pipe, cfg, sizes, options, steps, embeds, dev, left, results, save, flops_per_pass)
        print_speed_report(results)
        print(f"total {time.perf_counter() - t_start:.0f} s")
        save()
        return 0
    decodes = {r["size"]: r["seconds"] for r in results["vae"] if r["mode"] == "split" and r["status"] == "ok"}
    rates: dict[int, float] = {}  # size -> measured steady FLOP/s
    probed: dict[str, dict] = {}
    modes = {"both": (True, False), "urae": (True,), "stock": (False,)}[a.attention]
    for size in sizes:
        for proportional in modes:  # the URAE setting first: the row that matters if the budget runs out
            # before any row: a third of the matmul ceiling; later, the rate at this size or the largest one below
            rate = rates.get(size) or (rates[max(rates)] if rates else ceiling["tflops"] * 1e12 / 3)
            est = 1.25 * (warmup + timed) * flops_per_pass(cfg, size, size) / rate + decode_estimate(decodes, size)
            if est > left():
                print(f"skip {size}x{size} proportional attention {_attn(proportional)}: needs ~{est:.0f} s, "
                      f"{max(0.0, left()):.0f} s of the budget left")
                results["skipped"].append({"size": size, "proportional_attention": proportional, "estimated_s": est,
                                           "left_s": max(0.0, left())})
                save()
                continue
            row, call = run_row(pipe, cfg, size, proportional, embeds, dev, warmup=warmup, timed=timed,
                                image_steps=a.steps, left=left, decode_est=decode_estimate(decodes, size))
            results["rows"].append(row)
            save()
            if row.get("tflops"):
                rates[size] = row["tflops"] * 1e12
            if row.get("decode_s") is not None:
                decodes[size] = row["decode_s"]
            if call is not None and call.call is not None:
                key = json.dumps([call.call["shapes"], call.call["strides"], call.call["dtype"]])
                if key not in probed and left() > 15:
                    probed[key] = {"size": size, "call": call.call, "backends": probe_backends(call, dev)}
                    results["sdpa_layouts"].append(probed[key])
                    save()
            print(f"  {size}x{size} prop. attention {_attn(proportional):>3}: "
                  + (f"{row['s_per_step']:.4f} s/step, {row['tflops']:.4g} TFLOP/s "
                     f"({row['tflops'] / ceiling['tflops']:.0%} of the matmul ceiling)" if row.get("tflops") else "-")
                  + (f", decode {row['decode_s']:.2f} s" if row.get("decode_s") is not None else "")
                  + f"; SDPA {row['attention']['kernel']}" + ("" if row["status"] == "ok" else f" [{row['status']}]"),
                  flush=True)

    print_report(results, dev, tiny)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        save()
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
