"""Inference time and GPU memory of real-size FLUX.1-dev with random weights (no download).

Builds the FLUX.1-dev transformer from its config directly on the GPU in bf16 (on the meta device
first, so the 24 GB of weights never pass through host memory) and the real-size FLUX VAE, then
generates one image per row through urae.sampling.generate (the inference entry point's code path)
with random T5 (512 x 4096) and pooled CLIP (768) embeddings in place of the text encoders: 28 steps,
one transformer pass per step with the guidance embedding (3.5), static shift, URAE runtime through
urae.runtime.apply_highres, VAE decode split into row chunks above 2048² as in inference. Each size runs
with and without proportional attention; the VAE decode alone at 4096² runs split (ours, exact), tiled
(diffusers' approximate tiles) and untiled (OOM is caught).
Time and memory do not depend on weight values.

Without CUDA the same script runs the tiny configuration (urae.tiny) on the CPU as a smoke check.

    python benchmarks/bench_infer_gpu.py                       # GPU: 1024² 2048² 4096², fits ~8 minutes
    python benchmarks/bench_infer_gpu.py --budget-seconds 0    # no time limit
    python benchmarks/bench_infer_gpu.py --sizes 4096 --steps 28 --json out.json
    python benchmarks/bench_infer_gpu.py --quick               # smoke run (CPU: seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# FLUX.1 ae.safetensors in diffusers terms; sample_size 1024 makes diffusers' decode tiles 1024² pixels.
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
T5_LENGTH = 512

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (H200: same compute)
ANCHOR_S = 5 * 60  # public URAE README: about 5 minutes per 4096² image on an H100
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
    """The issue's rougher count: 2 x parameters x tokens + attention (counts AdaLN and both streams per token)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = (height // 16) * (width // 16) + txt
    return 2 * n_params * n + (cfg["num_layers"] + cfg["num_single_layers"]) * 4 * d * n * n


class Device:
    def __init__(self, cpu: bool, dtype: str | None = None):
        self.cuda = torch.cuda.is_available() and not cpu
        self.torch = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            dtype or ("bf16" if self.cuda else "fp32")]
        self.name = torch.cuda.get_device_name() if self.cuda else f"CPU ({platform.processor() or 'unknown'}, " \
                                                                    f"{os.cpu_count()} cores)"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else None

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


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
            row.update(seconds=time.perf_counter() - t0, peak_gib=dev.peak_gib(), status="ok",
                       shape=list(out.shape))
            del out
        except RuntimeError as e:  # OOM, or a kernel's size limit (4096² x 128 channels is 2^31 elements)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            row.update(seconds=None, peak_gib=dev.peak_gib(), status="OOM" if _is_oom(e) else f"failed: {first[:100]}")
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


def run_image(pipe, cfg: dict, size: int, steps: int, proportional: bool, embeds, dev: Device) -> dict:
    """One size² image; step marks give the denoising time and its peak apart from the decode."""
    from urae.runtime import HighResSettings
    from urae.sampling import SampleRequest, generate

    settings = HighResSettings.for_resolution(size, size, proportional_attention=proportional)
    req = SampleRequest("random embeddings", size, size, seed=0, steps=steps)
    marks: list[tuple[float, float | None]] = []

    def on_step():
        dev.sync()  # kernels run ahead of Python; a mark must mean the step is done
        marks.append((time.perf_counter(), dev.peak_gib()))

    row = {"size": size, "steps": steps, "proportional_attention": proportional, "ntk_factor": settings.ntk_factor,
           "flop_per_step": flops_per_pass(cfg, size, size)}
    dev.reset_peak()
    dev.sync()
    t0 = time.perf_counter()
    try:
        generate(pipe, req, settings, prompt_embeds=embeds, on_step=on_step)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        dev.free()
        return {**row, "status": f"OOM after {len(marks)} step(s)", "peak_gib": dev.peak_gib()}
    dev.sync()
    total = time.perf_counter() - t0
    denoise = marks[-1][0] - t0
    gaps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    row.update(status="ok", seconds=total, denoise_s=denoise, decode_s=total - denoise,
               s_per_step=statistics.median(gaps) if gaps else denoise,
               tflops=steps * row["flop_per_step"] / denoise / 1e12, peak_denoise_gib=marks[-1][1],
               peak_gib=dev.peak_gib())
    dev.free()
    return row


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def print_anchor(cfg: dict, n_params: float, tiny: bool) -> None:
    f_ours = flops_per_pass(FLUX_DEV_TRANSFORMER, 4096, 4096)
    f_issue = params_estimate_flops(11.9e9, 4096, 4096, FLUX_DEV_TRANSFORMER)
    print("anchor: the public URAE README says about 5 min per 4096x4096 image on an H100; goal here: <= 3 min on an H100")
    print(f"floor: 28 steps x {f_issue / 1e15:.1f} PFLOP (2 x 11.9e9 parameters x 66,048 tokens + attention) at "
          f"{H100_BF16_DENSE / 1e12:.0f} TFLOP/s (H100 dense bf16 peak) = {28 * f_issue / H100_BF16_DENSE / 60:.1f} min; "
          f"the per-token count below gives {f_ours / 1e15:.2f} PFLOP per step = "
          f"{28 * f_ours / H100_BF16_DENSE / 60:.1f} min")
    print(FLOP_FORMULA)
    if tiny:
        print(f"(this run: tiny config, {n_params / 1e3:.0f} K parameters; the same formula with its D, blocks and dims)")


def main(argv=None) -> int:
    t_start = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # a run killed at its time limit still shows what it measured
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", help="square sizes (GPU default 1024 2048 4096; CPU 256 512)")
    ap.add_argument("--steps", type=int, help="denoising steps per image (default 28, FLUX.1-dev's)")
    ap.add_argument("--vae-size", type=int, help="size of the VAE-only decode (GPU default 4096; CPU 512); 0 skips it")
    ap.add_argument("--budget-seconds", type=float, default=480,
                    help="skip runs that would end after this many seconds from start, estimated from the measured "
                         "step time (default 480: fits a 10-minute window with start-up; 0 = no limit)")
    ap.add_argument("--quick", action="store_true", help="smoke run: smallest size, few steps, small VAE decode")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--cpu", action="store_true", help="run the tiny CPU smoke check even when CUDA is available")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    a = ap.parse_args(argv)

    dev = Device(a.cpu, a.dtype)
    tiny = not dev.cuda
    if a.quick:
        sizes, steps, vae_size = [1024] if dev.cuda else [128], 4 if dev.cuda else 2, 2048 if dev.cuda else 128
    else:
        sizes, steps, vae_size = ([1024, 2048, 4096] if dev.cuda else [256, 512]), 28, 4096 if dev.cuda else 512
    sizes = sorted(a.sizes or sizes)  # ascending: each run's measured rate predicts the next, larger one
    steps = a.steps or steps
    vae_size = vae_size if a.vae_size is None else a.vae_size
    for s in sizes + ([vae_size] if vae_size else []):
        if s <= 0 or s % 16:
            ap.error(f"size {s} is not a positive multiple of 16")
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

    results = {"device": dev.name, "cuda": dev.cuda, "tiny": tiny, "dtype": str(dev.dtype), "steps": steps,
               "sizes": sizes, "budget_seconds": a.budget_seconds, "flop_formula": FLOP_FORMULA,
               "transformer_config": cfg, "vae": [], "images": [], "skipped": []}

    def save():  # after every measurement: a run cut short by its time window keeps what it measured
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1, default=str))

    vae = build_vae(tiny, dev)
    if vae_size:
        results["vae"] = bench_vae(vae, vae_size, dev)
        save()
        for r in results["vae"]:
            print(f"  VAE decode {vae_size}x{vae_size} {r['mode']}: {r['status']}, "
                  f"{_fmt(r['seconds'], '.2f')} s, peak {_fmt(r['peak_gib'], '.2f', 'n/a')} GiB", flush=True)

    t0 = time.perf_counter()
    transformer = build_transformer(cfg, dev)
    dev.sync()
    n_params = sum(p.numel() for p in transformer.parameters())
    results.update(build_seconds=time.perf_counter() - t0, parameters=n_params, weights_gib=dev.allocated_gib())
    count = f"{n_params / 1e6:.2f} M" if tiny else f"{n_params / 1e9:.2f} B"
    print(f"transformer: {count} parameters, built on {dev.torch} in {results['build_seconds']:.1f} s"
          + (f", {results['weights_gib']:.1f} GiB allocated with the VAE" if dev.cuda else ""))
    print_anchor(cfg, n_params, tiny)

    pipe = make_pipeline(transformer, vae)
    g = torch.Generator().manual_seed(0)
    embeds = (torch.randn(1, T5_LENGTH, cfg["joint_attention_dim"], generator=g).to(dev.torch, dev.dtype),
              torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(dev.torch, dev.dtype))

    # Warm-up (kernel selection, allocator growth) at the smallest size; it also gives the first rate estimate.
    warm = run_image(pipe, cfg, sizes[0], 2, False, embeds, dev)
    rate = warm["tflops"] * 1e12 if warm["status"] == "ok" else None
    decode_per_px = None
    ok_vae = [r for r in results["vae"] if r["status"] == "ok" and r["mode"] == "split"]
    if ok_vae:
        decode_per_px = ok_vae[0]["seconds"] / ok_vae[0]["size"] ** 2

    for size in sizes:
        urae_default = size >= 2048  # URAE's own setting first: the row that matters if the budget runs out
        for proportional in (urae_default, not urae_default):
            est = None
            if rate:
                est = steps * flops_per_pass(cfg, size, size) / rate + (decode_per_px or 0) * size * size
            if est is not None and 1.1 * est + 1 > left():  # margin: the rate changes with size
                print(f"skip {size}x{size} proportional attention {'on' if proportional else 'off'}: needs ~{est:.0f} s, "
                      f"{max(0, left()):.0f} s of the budget left")
                results["skipped"].append({"size": size, "proportional_attention": proportional, "estimated_s": est})
                save()
                continue
            row = run_image(pipe, cfg, size, steps, proportional, embeds, dev)
            results["images"].append(row)
            save()
            if row["status"] == "ok":
                rate = row["tflops"] * 1e12
                if size == sizes[0] or decode_per_px is None:
                    decode_per_px = max(decode_per_px or 0, row["decode_s"] / size**2)
            print(f"  {size}x{size} prop. attention {'on ' if proportional else 'off'}: "
                  + (f"{row['seconds']:.2f} s/image" if row["status"] == "ok" else row["status"]), flush=True)

    print(f"\nper image: {steps} steps, guidance 3.5 (one pass per step), T5 length {T5_LENGTH}, batch 1, "
          f"{str(dev.dtype).removeprefix('torch.')}, VAE decode split above 2048x2048; decode s = after the last step "
          "(VAE decode + conversion to PIL); peak = max GPU memory allocated (denoise: up to the last step)")
    print(f"{'size':>10} {'prop.':>5} {'ntk':>4} {'s/image':>9} {'denoise s':>10} {'s/step':>8} {'decode s':>9} "
          f"{'peak GiB':>9} {'(denoise)':>9} {'TFLOP/s':>8} {'PFLOP/step':>10}")
    for r in results["images"]:
        head = f"{r['size']:>5}x{r['size']:<4} {'on' if r['proportional_attention'] else 'off':>5} {r['ntk_factor']:>4g}"
        if r["status"] != "ok":
            print(f"{head} {r['status']} (peak {_fmt(r['peak_gib'], '.1f')} GiB)")
            continue
        print(f"{head} {r['seconds']:>9.2f} {r['denoise_s']:>10.2f} {r['s_per_step']:>8.3f} {r['decode_s']:>9.2f} "
              f"{_fmt(r['peak_gib'], '9.2f', '      n/a')} {_fmt(r['peak_denoise_gib'], '9.2f', '      n/a')} "
              f"{r['tflops']:>8.3g} {r['flop_per_step'] / 1e15:>10.3g}")
    for s in results["skipped"]:
        print(f"{s['size']:>5}x{s['size']:<4} {'on' if s['proportional_attention'] else 'off':>5}  skipped for the "
              f"budget; estimated {s['estimated_s']:.0f} s/image at the last measured rate")

    if results["vae"]:
        print(f"\nVAE decode alone, {vae_size}x{vae_size} (latent 16x{vae_size // 8}x{vae_size // 8}), batch 1, before "
              "the transformer was built (peak = the VAE's own)")
        print(f"{'mode':>8} {'seconds':>8} {'peak GiB':>9}  status")
        for r in results["vae"]:
            print(f"{r['mode']:>8} {_fmt(r['seconds'], '8.2f', '       -')} "
                  f"{_fmt(r['peak_gib'], '9.2f', '      n/a')}  {r['status']}")

    best = [r for r in results["images"] if r["status"] == "ok" and r["size"] == 4096 and r["proportional_attention"]]
    if best and not tiny:
        s = best[0]["seconds"] * 28 / steps
        note = "" if "H100" in dev.name else f" (this device is {dev.name}, not an H100: compare with care)"
        print(f"\n4096x4096 with the URAE runtime: {s:.0f} s = {s / 60:.2f} min per image (28 steps); anchor "
              f"{ANCHOR_S / 60:.0f} min, goal <= {GOAL_S / 60:.0f} min: {'met' if s <= GOAL_S else 'not met'}{note}; "
              f"denoising at {best[0]['tflops']:.0f} TFLOP/s = {best[0]['tflops'] * 1e12 / H100_BF16_DENSE:.0%} of the "
              f"H100 dense bf16 peak")
    elif tiny:
        print("\nsmoke check only: run on a CUDA GPU for real-size figures")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        save()
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
