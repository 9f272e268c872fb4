"""Data-cache benchmark: latent caching throughput (1 vs 2 processes) and cache size on disk.

    python benchmarks/bench_data_cache.py [--quick] [--images N] [--size 1024]

1. Images/s for latent caching of size² images with the tiny FLUX VAE (random weights, real
   architecture family) through `python -m urae.data`: one process (all cores) and two processes
   under `accelerate launch` (cores split), side by side. Only the latent-caching phase is timed
   (from the first validity check to the final barrier), not imports or model loading.
2. Computed size on disk per image at 2K/4K for the real FLUX VAE latent shape (16 x H/8 x W/8,
   posterior mean + std as cached) in fp16/bf16/fp32, and for the text cache (T5-XXL 512 x 4096 +
   mask, CLIP-L pooled 768) per caption variant.
3. With --vae-memory PX: peak host memory of one PX² encode with the real FLUX VAE architecture
   (random weights, fp32, CPU) whole versus split, each in a fresh process (peak RSS above the
   pre-encode level), plus the largest split-vs-whole difference of the posterior mean.
4. With --host-ram: peak RSS of one process that gets a training plan from complete caches on the
   tiny model, (a) loading the whole pipeline first (what the trainer did) versus (b) asking
   `cache_status` first and loading only the components of incomplete caches (none), each in a fresh
   process; plus the weights each way would hold at FLUX.1-dev size (from the component sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _run_cache(model: Path, data: Path, cache: Path, size: int, processes: int, threads: int, stats: Path) -> dict:
    from urae.common import free_port

    args = ["-m", "urae.data", "--model", str(model), "--train_data_dir", str(data), "--cache_dir", str(cache),
            "--resolution", str(size), "--stats_json", str(stats), "--no_progress"]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
    ranks = [json.loads(Path(f"{stats}.rank{r}.json").read_text()) for r in range(processes)]
    return {"ranks": ranks, "wall": wall, "latent_s": max(r["latent_seconds"] for r in ranks)}


def throughput(n_images: int, size: int) -> list[dict]:
    from urae.data.synthetic import write_image
    from urae.tiny import write_tiny_pipeline

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_pipeline(tmp / "model")
        for i in range(n_images):
            write_image(tmp / "data" / f"{i:04d}.png", size, size, seed=i).with_suffix(".txt").write_text(f"image {i}")
        rows = []
        for procs in (1, 2):
            threads = max(1, cores // procs)
            r = _run_cache(model, tmp / "data", tmp / f"cache{procs}", size, procs, threads, tmp / f"stats{procs}")
            split = [x["latents_encoded"] for x in r["ranks"]]
            rows.append({"processes": procs, "threads_each": threads, "images": n_images, "split": split,
                         "latent_s": r["latent_s"], "img_per_s": n_images / r["latent_s"], "wall_s": r["wall"]})
    return rows


def _header_overhead() -> int:
    """Bytes a cache file adds beyond tensor data (safetensors header with our metadata)."""
    import torch

    from urae.io import save_safetensors_atomic

    meta = {"format": "urae-latent-v1", "vae": "0" * 24, "bucket": "4096x4096", "crop_mode": "center",
            "source": "123456789:" + "0" * 16, "dtype": "bfloat16", "crop": "5000x5000->4096x4096+452+452",
            "stored": "posterior_mean_std", "shift_factor": 0.1159, "scaling_factor": 0.3611,
            "image": "some/folder/image_000001.jpg"}
    with tempfile.TemporaryDirectory() as tmp:
        t = {"mean": torch.zeros(16, 1, 1), "std": torch.zeros(16, 1, 1)}
        p = save_safetensors_atomic(t, Path(tmp) / "x.safetensors", meta)
        return p.stat().st_size - 2 * 16 * 4


def disk_sizes() -> tuple[list[dict], list[dict]]:
    from urae.data.buckets import urae_buckets

    head = _header_overhead()
    latents = []
    for base in (2048, 4096):
        for w, h in (urae_buckets(base)[i] for i in (0, 1, 3, 5)):  # 1:1, 4:3, 2:1, 4:1 (portrait: same sizes)
            n = 16 * (h // 8) * (w // 8)
            latents.append({"bucket": f"{w}x{h}", "shape": f"16x{h // 8}x{w // 8}", "elements": n,
                            **{dt: 2 * n * b + head for dt, b in BYTES.items()}})
    texts = []
    for dt, b in BYTES.items():
        per = 512 * 4096 * b + 512 + 768 * b + 300  # t5 + uint8 mask + clip pooled + header
        texts.append({"dtype": dt, "per_caption": per, "per_image_2_variants": 2 * per})
    return latents, texts


# FLUX.1 VAE (ae.safetensors) architecture in diffusers terms.
FLUX_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                       layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                       scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (ru_maxrss on Linux keeps the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vae_child(mode: str, size: int, out: str) -> None:
    """In a fresh process: build the real-shape VAE, encode one size² image whole or split, report memory."""
    import torch
    from diffusers import AutoencoderKL

    from urae.data.synthetic import image_array
    from urae.data.vae_encode import encode_posterior

    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_VAE_CONFIG).eval()
    px = torch.from_numpy(image_array(size, size, 0)).permute(2, 0, 1)[None].float() / 127.5 - 1
    before = _peak_rss()
    t = time.perf_counter()
    mean, _ = encode_posterior(vae, px, split_threshold=10**12 if mode == "whole" else 0)
    seconds = time.perf_counter() - t
    peak = _peak_rss()
    torch.save(mean, out + ".pt")
    Path(out).write_text(json.dumps({"mode": mode, "size": size, "peak_extra": peak - before, "seconds": seconds}))


def vae_memory(size: int) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("whole", "split"):
            out = f"{tmp}/{mode}.json"
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            subprocess.run([sys.executable, __file__, "--_vae-child", mode, str(size), out], env=env, check=True,
                           capture_output=True)
            rows.append(json.loads(Path(out).read_text()))
        diff = (torch.load(f"{tmp}/whole.json.pt", weights_only=True) - torch.load(f"{tmp}/split.json.pt", weights_only=True)).abs().max().item()
    for r in rows:
        r["max_abs_diff"] = diff
    return rows


# FLUX.1-dev component parameter counts (the published checkpoints), for the real-size estimate.
FLUX_PARAMS = {"transformer": 11.90e9, "text_encoder_2": 4.762e9, "text_encoder": 123.1e6, "vae": 83.8e6}
_HOST_MODES = ("pipeline", "pipeline-read", "status")


def _host_ram_child(mode: str, model: str, data: str, cache: str, out: str) -> None:
    """In a fresh process: the plan from complete caches, loading the whole pipeline or only what is missing."""
    import torch
    import transformers  # noqa: F401  (imported by both modes before the baseline)
    from diffusers import FluxPipeline  # noqa: F401

    from urae.components import load_text_encoders, load_vae
    from urae.data import DataOptions, build_caches, cache_status
    from urae.loading import load_pipeline

    options = DataOptions(train_data_dir=data, cache_dir=cache, resolution=64)
    import urae.trainer  # noqa: F401  (so the training modes below count from the same imports)

    base = _peak_rss()
    if mode.startswith("train"):  # the training process itself, one step: flux_urae_train.py's main()
        import logging

        from urae.trainer import main

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("urae").addHandler(handler)
        logging.getLogger("urae").setLevel(logging.INFO)
        argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--cache_dir", cache,
                "--resolution", "64", "--output_dir", str(Path(out).with_suffix("")), "--max_train_steps", "1",
                "--network_dim", "2", "--network_alpha", "2", "--optimizer_type", "adamw", "--learning_rate", "1e-4",
                "--mixed_precision", "no"]
        if main(argv) != 0:
            raise SystemExit(f"training failed in mode {mode}")
        loaded = sorted({r.getMessage().split(":")[0] for r in records} & {"transformer", "vae", "text_encoder",
                                                                            "text_encoder_2"})
        Path(out).write_text(json.dumps({"mode": mode, "base": base, "peak": _peak_rss(), "loaded": loaded,
                                         "entries": 0, "encoded": 0}))
        return
    if mode.startswith("pipeline"):
        pipe = load_pipeline(model, dtype=torch.float32)
        if mode == "pipeline-read":  # every weight page read once, as the trainer's .to(cuda) does
            with torch.no_grad():
                for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                    sum(float(p.double().sum()) for p in m.parameters())
        plan = build_caches(options, pipe, model_location=model, progress=False)
        loaded = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    else:
        status = cache_status(options, model, dtype=torch.float32, log=False)
        parts = load_text_encoders(model, torch.float32) if status.needs_text_encoders else {}
        if status.needs_vae:
            parts["vae"] = load_vae(model, torch.float32)
        plan = build_caches(options, parts, status=status, progress=False)
        loaded = sorted(k for k in parts if not k.startswith("tokenizer"))
    peak = _peak_rss()
    Path(out).write_text(json.dumps({"mode": mode, "base": base, "peak": peak, "loaded": loaded,
                                     "entries": len(plan.entries), "encoded": plan.latents.encoded + plan.texts.encoded}))


def _widen_t5(model: Path) -> int:
    """Replace the tiny T5 by a ~100 M-parameter one (same tokenizer and width): weights big enough to see in RSS."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    folder = model / "text_encoder_2"
    cfg = T5Config.from_pretrained(folder)
    # the tiny width (what the tiny transformer's context embedder takes), its weight in very wide feed-forwards
    big = T5EncoderModel(T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=16, d_ff=131072, num_layers=8,
                                  num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                  use_cache=False))
    shutil.rmtree(folder)
    big.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in big.parameters())


def host_ram(n_images: int, train: bool = False) -> list[dict]:
    from urae.data import DataOptions, build_caches
    from urae.data.synthetic import write_image
    from urae.loading import load_pipeline
    from urae.tiny import write_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_pipeline(tmp / "model")
        t5_params = _widen_t5(model)
        for i in range(n_images):
            write_image(tmp / "data" / f"{i:04d}.png", 96, 96, seed=i).with_suffix(".txt").write_text(f"image {i}")
        # the caching run that completes the caches and records the model identities
        build_caches(DataOptions(train_data_dir=str(tmp / "data"), cache_dir=str(tmp / "cache"), resolution=64),
                     load_pipeline(str(model)), model_location=str(model), progress=False)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        modes = list(_HOST_MODES)
        if train:  # a training process without its captions' cache (loads T5), then one with complete caches
            shutil.copytree(tmp / "cache", tmp / "cache-texts-gone")
            for d in [d for d in (tmp / "cache-texts-gone").rglob("text") if d.is_dir()]:
                shutil.rmtree(d)
            modes += ["train-uncached", "train-cached"]
        for mode in modes:
            cache = tmp / ("cache-texts-gone" if mode == "train-uncached" else "cache")
            out = tmp / f"{mode}.json"
            r = subprocess.run([sys.executable, __file__, "--_host-ram-child", mode, str(model), str(tmp / "data"),
                                str(cache), str(out)], env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"host-RAM child {mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            rows.append({**json.loads(out.read_text()), "t5_params": t5_params})
    return rows


def print_host_ram(n: int, train: bool = False) -> None:
    rows = host_ram(n, train)
    print(f"\nhost RAM of one process getting the plan from complete caches ({n} images, tiny pipeline with a "
          f"{rows[0]['t5_params'] / 1e6:.0f} M-parameter T5 ({rows[0]['t5_params'] * 4 / 2**20:.0f} MiB fp32) for "
          "T5-XXL; peak RSS (VmHWM), MiB; 'after imports' = the same imports done first in both):")
    print(f"{'mode':>14} {'after imports':>14} {'peak':>8} {'added':>8}  models loaded")
    for r in rows:
        print(f"{r['mode']:>14} {_mib(r['base']):>14} {_mib(r['peak'])} {_mib(r['peak'] - r['base'])}  "
              f"{', '.join(r['loaded']) or 'none'} (encoded {r['encoded']})")
    gib = {k: 2 * v / 2**30 for k, v in FLUX_PARAMS.items()}
    print("FLUX.1-dev size, bf16 weights held before training starts: whole pipeline "
          f"{sum(gib.values()):.1f} GiB (transformer {gib['transformer']:.1f}, T5-XXL {gib['text_encoder_2']:.1f}, "
          f"CLIP-L {gib['text_encoder']:.2f}, VAE {gib['vae']:.2f}); status first with complete caches 0 "
          f"(the transformer, {gib['transformer']:.1f} GiB, loads afterwards for training either way)")
    print("pipeline: weights memory-mapped, pages read only where the identity fingerprint looks; pipeline-read: "
          "every page read once, as moving the models to the GPU does (file-backed pages, shared between processes)")


def _mib(x: float) -> str:
    return f"{x / 2**20:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 images instead of 16")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--vae-memory", type=int, default=0, metavar="PX",
                    help="also measure whole vs split encode memory of the real-shape VAE at PX² (CPU, slow)")
    ap.add_argument("--host-ram", action="store_true",
                    help="also measure peak RSS of getting a plan from complete caches, whole pipeline vs status first")
    ap.add_argument("--host-ram-only", action="store_true", help="run only the --host-ram section")
    ap.add_argument("--host-ram-train", action="store_true",
                    help="with --host-ram(-only): also a one-step training process with and without complete caches")
    ap.add_argument("--_vae-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_host-ram-child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._vae_child:
        return _vae_child(a._vae_child[0], int(a._vae_child[1]), a._vae_child[2])
    if a._host_ram_child:
        return _host_ram_child(*a._host_ram_child)
    n = a.images or (4 if a.quick else 16)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    import torch

    print(f"torch {torch.__version__}, tiny FLUX VAE (16-ch latent, 8x), fp32, CPU")
    if a.host_ram_only:
        return print_host_ram(n, a.host_ram_train)

    rows = throughput(n, a.size)
    print(f"\nlatent caching, {n} images of {a.size}x{a.size} (caching phase only; wall incl. startup in brackets)")
    print(f"{'processes':>9} {'threads each':>12} {'split':>8} {'seconds':>8} {'images/s':>9} {'speed-up':>9}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads_each']:>12} {'+'.join(map(str, r['split'])):>8} {r['latent_s']:>8.2f} "
              f"{r['img_per_s']:>9.3f} {r['img_per_s'] / rows[0]['img_per_s']:>8.2f}x  [{r['wall_s']:.1f} s]")
    print(f"load average {os.getloadavg()[0]:.2f} at end")

    latents, texts = disk_sizes()
    print("\nlatent cache per image (posterior mean + std, FLUX VAE shape; MiB):")
    print(f"{'bucket':>10} {'latent':>12} {'fp16':>8} {'bf16':>8} {'fp32':>8}")
    for r in latents:
        print(f"{r['bucket']:>10} {r['shape']:>12} {_mib(r['fp16'])} {_mib(r['bf16'])} {_mib(r['fp32'])}")
    print("\ntext cache (T5-XXL 512x4096 + mask + CLIP pooled 768; MiB):")
    for r in texts:
        print(f"{r['dtype']:>6}: {_mib(r['per_caption'])} per caption, {_mib(r['per_image_2_variants'])} per image "
              "with prompt + generated_prompt")
    if a.vae_memory:
        mem = vae_memory(a.vae_memory)
        print(f"\nreal-shape FLUX VAE encode of one {a.vae_memory}x{a.vae_memory} image, fp32, CPU "
              "(peak host memory above the pre-encode level):")
        for r in mem:
            print(f"{r['mode']:>6}: {_mib(r['peak_extra'])} MiB, {r['seconds']:.1f} s")
        whole, split = mem[0]["peak_extra"], mem[1]["peak_extra"]
        print(f"split / whole peak: {split / whole:.2f} (on CPU both keep full activations in the same memory); "
              f"max |mean difference| {mem[0]['max_abs_diff']:.2e}")
        scale = (4096 / a.vae_memory) ** 2 / 2
        print(f"whole encode scaled to 4096x4096 in bf16 (x{scale:.0f}): ~{whole * scale / 2**30:.1f} GiB of activations; "
              "the split encode keeps those in host memory on a GPU (GPU peak not measured here)")

    if a.host_ram:
        print_host_ram(n, a.host_ram_train)

    l2k = next(r for r in latents if r["bucket"] == "2048x2048")["bf16"] + texts[1]["per_image_2_variants"]
    l4k = next(r for r in latents if r["bucket"] == "4096x4096")["bf16"] + texts[1]["per_image_2_variants"]
    print(f"\ndataset totals, bf16, square images, 2 caption variants: 2K recipe 3,000 images -> "
          f"{3000 * l2k / 2**30:.1f} GiB; 4K recipe 16,000 images -> {16000 * l4k / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
