"""Data-cache benchmark: latent caching throughput (1 vs 2 processes) and cache size on disk.

    python benchmarks/bench_data_cache.py [--quick] [--images N] [--size 1024]

1. Images/s for latent caching of size² images with the tiny FLUX VAE (random weights, real
   architecture family) through `python -m urae.data`: one process (all cores) and two processes
   under `accelerate launch` (cores split), side by side. Only the latent-caching phase is timed
   (from the first validity check to the final barrier), not imports or model loading.
2. Computed size on disk per image at 2K/4K for the real FLUX VAE latent shape (16 x H/8 x W/8,
   posterior mean + std as cached) in fp16/bf16/fp32, and for the text cache (T5-XXL 512 x 4096 +
   mask, CLIP-L pooled 768) per caption variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cache(model: Path, data: Path, cache: Path, size: int, processes: int, threads: int, stats: Path) -> dict:
    args = ["-m", "urae.data", "--model", str(model), "--train_data_dir", str(data), "--cache_dir", str(cache),
            "--resolution", str(size), "--stats_json", str(stats), "--no_progress"]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
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


def _mib(x: float) -> str:
    return f"{x / 2**20:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 images instead of 16")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    n = a.images or (4 if a.quick else 16)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    import torch

    print(f"torch {torch.__version__}, tiny FLUX VAE (16-ch latent, 8x), fp32, CPU")

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
    l2k = next(r for r in latents if r["bucket"] == "2048x2048")["bf16"] + texts[1]["per_image_2_variants"]
    l4k = next(r for r in latents if r["bucket"] == "4096x4096")["bf16"] + texts[1]["per_image_2_variants"]
    print(f"\ndataset totals, bf16, square images, 2 caption variants: 2K recipe 3,000 images -> "
          f"{3000 * l2k / 2**30:.1f} GiB; 4K recipe 16,000 images -> {16000 * l4k / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
