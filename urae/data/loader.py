"""Training batches from the caches: a Dataset, a bucket-pure batch sampler, and the DataLoader.

Every random choice (posterior sample, caption variant) is seeded by (seed, epoch, sample index,
occurrence in the epoch), so batches are reproducible and identical whatever `num_workers` is, and
the repeats of an image (num_repeats) get their own draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from urae.data.buckets import Bucket
from urae.data.vae_encode import flux_latents
from urae.io import load_safetensors


@dataclass(frozen=True)
class CacheEntry:
    """One training image as the loader sees it: its cache files and how to pick a caption."""

    image: Path
    bucket: Bucket
    latent_file: Path
    text_files: dict[str, Path]  # caption variant ("prompt", "generated_prompt") -> text cache file
    captions: dict[str, str]
    real_prompt_ratio: float
    num_repeats: int = 1


def choose_variant(entry: CacheEntry, rng: random.Random) -> str:
    """The original prompt with probability real_prompt_ratio when both variants exist, else the one there is."""
    if "prompt" in entry.text_files and "generated_prompt" in entry.text_files:
        return "prompt" if rng.random() < entry.real_prompt_ratio else "generated_prompt"
    return next(iter(entry.text_files))


class CachedDataset(Dataset):
    """Indexed by (sample index, epoch, occurrence); yields FLUX-space latents plus the caption embeddings."""

    def __init__(self, entries: list[CacheEntry], seed: int = 0, sample_posterior: bool = True):
        self.entries = entries
        self.seed = seed
        self.sample_posterior = sample_posterior

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key) -> dict:
        index, epoch, occurrence = (tuple(key) + (0, 0))[:3] if isinstance(key, (tuple, list)) else (key, 0, 0)
        entry = self.entries[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}:{occurrence}")
        latents, meta = load_safetensors(entry.latent_file)
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        # The FLUX normalisation lives here, with the factors the cache was written with.
        z = flux_latents(latents["mean"], latents["std"] if self.sample_posterior else None,
                         float(meta["shift_factor"]), float(meta["scaling_factor"]), gen)
        variant = choose_variant(entry, rng)
        text, _ = load_safetensors(entry.text_files[variant])
        return {"latents": z, "t5_embeds": text["t5"], "t5_mask": text["t5_mask"], "clip_pooled": text["clip_pooled"],
                "caption": entry.captions[variant], "caption_variant": variant, "bucket": entry.bucket,
                "image": str(entry.image)}


def collate(samples: list[dict]) -> dict:
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    buckets = set(out["bucket"])
    if len(buckets) != 1:
        raise AssertionError(f"a batch mixes buckets {buckets}")
    out["bucket"] = out["bucket"][0]
    return out


class BucketBatchSampler(Sampler):
    """Full batches of one bucket each; every image appears num_repeats times per epoch.

    A bucket's last, incomplete batch is topped up with other images of the same bucket (drop_last:
    dropped instead): accelerate's `BatchSamplerShard` expects equal-size batches and would otherwise
    fill a short batch with images of another bucket. Each pass advances the epoch by itself
    (new order, new caption and posterior draws); `set_epoch(e)` sets it explicitly.
    """

    def __init__(self, entries: list[CacheEntry], batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.entries, self.batch_size, self.shuffle, self.seed, self.drop_last = entries, batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}:batches")
        by_bucket: dict[Bucket, list[int]] = {}
        for i, e in enumerate(self.entries):
            by_bucket.setdefault(e.bucket, []).extend([i] * e.num_repeats)
        batches = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) < self.batch_size:
                    if self.drop_last:
                        continue
                    # the bucket's first (shuffled) images, cycling when the bucket is smaller than a batch
                    b = b + [idx[j % len(idx)] for j in range(self.batch_size - len(b))]
                batches.append(b)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        seen: dict[int, int] = {}
        for b in self._batches(epoch):
            out = []
            for i in b:
                out.append((i, epoch, seen.get(i, 0)))
                seen[i] = seen.get(i, 0) + 1
            yield out

    def __len__(self) -> int:
        return len(self._batches(self.epoch))


def make_dataloader(plan, batch_size: int = 1, seed: int = 0, shuffle: bool = True, sample_posterior: bool = True,
                    num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """DataLoader over a `CachePlan` (from `build_caches`) or a list of `CacheEntry`.

    Pass the result to `accelerator.prepare` to shard batches over ranks (batches stay bucket-pure).
    Each pass over the loader is a new epoch (new order, caption and posterior draws);
    `loader.batch_sampler.set_epoch(e)` before `prepare` (or on the prepared loader, single process)
    sets it explicitly, e.g. when resuming.
    """
    entries = plan.entries if hasattr(plan, "entries") else list(plan)
    if not entries:
        raise ValueError("no cached images to train on")
    sampler = BucketBatchSampler(entries, batch_size, shuffle, seed, drop_last)
    return DataLoader(CachedDataset(entries, seed, sample_posterior), batch_sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
