"""Training throughput on the tiny FLUX.1 model: minor vs plain LoRA, cached vs uncached data.

Four configurations run the trainer's step (urae.flow.flow_loss, backward, grad-clip 1.0, optimizer
step; fp32 on CPU, as urae.trainer) on the same images and captions:
  cached    batches read from the on-disk latent and text caches (build_caches + CachedDataset),
            which is what urae.trainer does;
  uncached  every step decodes the images, VAE-encodes them and runs CLIP + T5 (length 512).
Repetitions are interleaved round by round, the order rotating each round, so drift of a shared
machine hits all configurations alike. Each step is timed alone. Ratios are the median over rounds of
the per-round ratio of fastest steps (measurements seconds apart, so a burst of other load spoils a
round, not the result); steps/s is 1 / the fastest step (other load only ever adds time).

The tiny model's VAE and text encoders are as small as its transformer, so the cached/uncached
ratio here compares the code paths, not the real sizes: with FLUX.1 (T5-XXL 4.7B parameters, a
VAE encode of 4096² pixels) the uncached step is far more expensive.

    python benchmarks/bench_train.py            # full (1-2 minutes on 2 idle CPU cores, more under load)
    python benchmarks/bench_train.py --quick    # smoke run (under 30 s)
    python benchmarks/bench_train.py --quick --sizes 64 --rounds 1 --only minor:cached   # one tiny row
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = [("minor", "cached"), ("plain", "cached"), ("minor", "uncached"), ("plain", "uncached")]


def make_data(folder: Path, n: int, size: int) -> None:
    from urae.data.synthetic import write_image

    for i in range(n):
        write_image(folder / f"{i:03d}.png", size, size, seed=i)
        (folder / f"{i:03d}.txt").write_text(f"a disc over two colour gradients, image {i}, {size} pixels\n")


def build_plan(pipe, folder: Path, cache: Path, size: int):
    from urae.data import DataOptions, build_caches

    options = DataOptions(train_data_dir=str(folder), resolution=size, cache_dir=str(cache))
    with contextlib.redirect_stdout(io.StringIO()):  # the bucket table is not part of this report
        return build_caches(options, pipe, None, progress=False)


class Trainee:
    """A tiny transformer with an adapter and its optimizer, set up as urae.trainer sets them up."""

    def __init__(self, init: str, rank: int, optimizer: str, lr: float, layers: int, single_layers: int):
        from networks.minor_lora import create_network
        from urae.optim import make_optimizer
        from urae.tiny import build_transformer

        self.transformer = build_transformer(layers, single_layers, seed=0).requires_grad_(False)
        self.network = create_network(1.0, rank, float(rank), None, [], self.transformer, init=init,
                                      targets="urae", verbose="false")
        self.network.apply_to([], self.transformer, apply_text_encoder=False, apply_unet=True)
        self.network.prepare_grad_etc(None, self.transformer)
        for p in self.network.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = self.network.prepare_optimizer_params(None, lr, lr)
        params = params[0] if isinstance(params, tuple) else params
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(optimizer, params, lr)
        self.network.train()

    def step(self, x0, t5, pooled, seed: int) -> float:
        from urae.flow import flow_loss, sample_timesteps

        gen = torch.Generator().manual_seed(seed)
        self.network.on_step_start(None, self.transformer)
        t = sample_timesteps(x0.shape[0], "uniform", gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(self.transformer, x0, t5, pooled, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the trainer reads the loss every step


class Batches:
    """Batch k, the same images for every configuration: from the caches, or encoded from the files."""

    def __init__(self, pipe, plan, batch: int):
        from urae.data.loader import CachedDataset
        from urae.data.text_cache import TextEncoders

        self.pipe, self.entries, self.batch = pipe, plan.entries, batch
        self.dataset = CachedDataset(plan.entries, seed=0)
        self.encoders = TextEncoders(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, 512)

    def _indices(self, k: int) -> list[int]:
        return [(k * self.batch + j) % len(self.entries) for j in range(self.batch)]

    def cached(self, k: int):
        from urae.data.loader import collate

        b = collate([self.dataset[(i, k)] for i in self._indices(k)])
        return b["latents"], b["t5_embeds"], b["clip_pooled"]

    @torch.no_grad()
    def uncached(self, k: int):
        from urae.data.images import bucket_pixels
        from urae.data.text_cache import encode_captions
        from urae.data.vae_encode import encode_posterior, flux_latents

        entries = [self.entries[i] for i in self._indices(k)]
        pixels = torch.stack([bucket_pixels(e.image, e.bucket)[0] for e in entries])
        mean, std = encode_posterior(self.pipe.vae, pixels)
        cfg = self.pipe.vae.config
        x0 = flux_latents(mean, std, cfg.shift_factor, cfg.scaling_factor, torch.Generator().manual_seed(k))
        emb = encode_captions(self.encoders, [next(iter(e.captions.values())) for e in entries])
        return x0, emb["t5"], emb["clip_pooled"]


def timed_step(trainee: Trainee, batches: Batches, data: str, k: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    x0, t5, pooled = batches.cached(k) if data == "cached" else batches.uncached(k)
    t1 = time.perf_counter()
    trainee.step(x0, t5, pooled, seed=k)
    return time.perf_counter() - t0, t1 - t0


def bench_size(trainees: dict, batches: Batches, rounds: int, steps: int, warmup: int, configs=CONFIGS) -> dict:
    times = {c: [] for c in configs}
    round_min = {c: [] for c in configs}  # each configuration's fastest step in each round
    data_times = {c: [] for c in configs}
    counter = {c: 0 for c in configs}

    def run(c) -> float:
        total, data = timed_step(trainees[c[0]], batches, c[1], counter[c])
        counter[c] += 1
        data_times[c].append(data)
        return total

    for c in configs:
        for _ in range(warmup):  # first steps pay optimizer-state allocation and kernel set-up
            run(c)
    for c in configs:
        data_times[c].clear()
    for r in range(rounds):
        for c in configs[r % len(configs):] + configs[: r % len(configs)]:
            t = [run(c) for _ in range(steps)]
            times[c] += t
            round_min[c].append(min(t))
    return {c: {"median": statistics.median(times[c]), "min": min(times[c]), "data": statistics.median(data_times[c]),
                "round_min": round_min[c], "n": len(times[c])} for c in configs}


def ratio(res: dict, a: tuple, b: tuple) -> tuple[float, float]:
    """(median over rounds of the per-round ratio of fastest steps, ratio of the overall fastest steps).

    The first pairs measurements taken seconds apart, so a burst of other load hits both or one round
    only; it is the headline. The second is printed for comparison."""
    per_round = [x / y for x, y in zip(res[a]["round_min"], res[b]["round_min"])]
    return statistics.median(per_round), res[a]["min"] / res[b]["min"]


def summary(res: dict) -> str:
    def r(a: tuple, b: tuple) -> str:
        paired, lo = ratio(res, a, b)
        return f"{paired:.3f} ({lo:.3f})"

    return (f"minor / plain: cached {r(('minor', 'cached'), ('plain', 'cached'))}, uncached "
            f"{r(('minor', 'uncached'), ('plain', 'uncached'))}; uncached / cached: minor "
            f"{r(('minor', 'uncached'), ('minor', 'cached'))}, plain {r(('plain', 'uncached'), ('plain', 'cached'))}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small size, few rounds: a smoke run")
    ap.add_argument("--sizes", type=int, nargs="+", help="square image sizes in pixels (default 256 512; quick 128)")
    ap.add_argument("--batch", type=int, help="images per step (default 2, as the demo preset; quick 1)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 6; quick 2)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration per round (default 3; quick 1)")
    ap.add_argument("--rank", type=int, default=4, help="adapter rank (default 4, as the demo preset: inner dim is 32)")
    ap.add_argument("--optimizer", default="adamw", help="adamw (the demo's) or prodigy (the recipes')")
    ap.add_argument("--layers", type=int, default=2, help="double-stream blocks of the tiny model")
    ap.add_argument("--single-layers", type=int, default=2, help="single-stream blocks of the tiny model")
    ap.add_argument("--only", choices=[f"{i}:{d}" for i, d in CONFIGS],
                    help="run this one configuration (a tiny row for a smoke test; no ratios)")
    a = ap.parse_args(argv)
    sizes = a.sizes or ([128] if a.quick else [256, 512])
    batch = a.batch or (1 if a.quick else 2)
    rounds = a.rounds or (2 if a.quick else 6)
    steps = a.steps or (1 if a.quick else 3)
    warmup = 1 if a.quick else 2
    configs = [tuple(a.only.split(":"))] if a.only else CONFIGS
    lr = 1.0 if a.optimizer == "prodigy" else 1e-3
    for s in sizes:
        if s % 16:
            ap.error(f"size {s} is not a multiple of 16")

    print("command: " + shlex.join(["python", os.path.relpath(sys.argv[0]) if argv is None else "benchmarks/bench_train.py",
                                    *(sys.argv[1:] if argv is None else argv)]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, fp32, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    start = time.perf_counter()
    from urae.tiny import build_pipeline

    pipe = build_pipeline(a.layers, a.single_layers, seed=0)
    trainees = {init: Trainee(init, a.rank, a.optimizer, lr, a.layers, a.single_layers)
                for init in dict.fromkeys(i for i, _ in configs)}
    print(f"tiny FLUX.1 ({a.layers}+{a.single_layers} blocks, inner dim 32), adapters r{a.rank} alpha {a.rank} on the "
          f"URAE targets, {a.optimizer} lr {lr:g}, batch {batch}, T5 length 512; {rounds} interleaved rounds x "
          f"{steps} steps per configuration")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = Path(tmp) / f"data{size}"
            make_data(folder, max(4, 2 * batch), size)
            batches = Batches(pipe, build_plan(pipe, folder, Path(tmp) / f"cache{size}", size), batch)
            results[size] = bench_size(trainees, batches, rounds, steps, warmup, configs)

    for size, res in results.items():
        lat = size // 8
        print(f"\n{size}x{size} images: latents {batch}x16x{lat}x{lat}, {(lat // 2) ** 2} image tokens + 512 text")
        print(f"{'adapter':<8}{'data':<10}{'min s':>9}{'median s':>10}{'steps/s':>9}{'data s':>9}"
              f"{'vs plain':>10}{'vs cached':>11}")
        for init, data in configs:
            r = res[(init, data)]
            vs = [f"{ratio(res, (init, data), o)[0]:.3f}" if o in res else "n/a" for o in (("plain", data),
                                                                                          (init, "cached"))]
            print(f"{init:<8}{data:<10}{r['min']:>9.4f}{r['median']:>10.4f}{1 / r['min']:>9.2f}{r['data']:>9.4f}"
                  f"{vs[0]:>10}{vs[1]:>11}")
        if len(configs) == len(CONFIGS):
            print(summary(res))
    print(f"\nmin s: fastest step (other load on the machine only adds time); steps/s = 1 / min s; 'vs' columns and "
          f"ratios: median over rounds of the per-round ratio of fastest steps (in brackets: ratio of the overall "
          f"fastest steps); 'data s' = median batch preparation inside the step (cache read, or decode + VAE + CLIP + "
          f"T5); "
          f"{time.perf_counter() - start:.0f} s in all, load average {os.getloadavg()[0]:.2f} at the end")
    # what was run, for a caller to check: the timings, and the optimizer steps each adapter really took
    steps_taken = {init: max((int(st["step"]) for st in t.optimizer.state.values()), default=0)
                   for init, t in trainees.items()}
    return {"results": results, "optimizer_steps": steps_taken, "warmup": warmup, "rounds": rounds, "steps": steps}


if __name__ == "__main__":
    main()  # the report is printed; the returned numbers are for tests
