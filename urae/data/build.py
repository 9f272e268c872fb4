"""Scan, bucket and cache a dataset in one call: what the trainer and `python -m urae.data` run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from urae.common import has_guidance_embedding
from urae.data.buckets import bucket_table
from urae.data.datasets import ImageItem, ScanResult, scan
from urae.data.distributed import ranks_of
from urae.data.latent_cache import LatentCacheReport, cache_latents, latent_path
from urae.data.loader import CacheEntry
from urae.data.options import DataOptions
from urae.data.text_cache import (
    T5_MAX_LENGTH_DEV,
    T5_MAX_LENGTH_SCHNELL,
    TextCacheReport,
    TextEncoders,
    cache_texts,
    text_path,
)
from urae.data.vae_encode import DEFAULT_CHUNK_PIXELS, DEFAULT_SPLIT_THRESHOLD

logger = logging.getLogger(__name__)


@dataclass
class CachePlan:
    """Everything the loader needs, plus what was skipped and what caching did."""

    entries: list[CacheEntry]
    scan: ScanResult
    latents: LatentCacheReport
    texts: TextCacheReport
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (image, why), all causes


def _component(components, name: str):
    if isinstance(components, dict):
        return components.get(name)
    return getattr(components, name, None)


def default_t5_max_length(components) -> int:
    """256 for FLUX.1-schnell (no guidance embedding), else 512."""
    transformer = _component(components, "transformer")
    if transformer is not None and not has_guidance_embedding(transformer):
        return T5_MAX_LENGTH_SCHNELL
    return T5_MAX_LENGTH_DEV


def build_caches(options: DataOptions | dict, components, accelerator=None, *, t5_max_length: int | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True,
                 split_threshold: int = DEFAULT_SPLIT_THRESHOLD, chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> CachePlan:
    """Scan the dataset, print the bucket table, and make sure every latent and caption is cached.

    components: a FluxPipeline or its `.components` dict (vae, tokenizer, text_encoder, tokenizer_2,
    text_encoder_2; transformer optional, only read to tell schnell from dev). Models are used on
    whatever device/dtype they are on. accelerator: an accelerate Accelerator/PartialState (each rank
    caches its share; all ranks return the same complete plan), a (process_index, num_processes) pair
    (no barrier: each call caches its share; once the caller has synchronised, a further call returns
    the verified plan and encodes nothing), or None. dtype: storage dtype of cached tensors (default:
    the encoders' output dtype).
    """
    options = options if isinstance(options, DataOptions) else DataOptions.from_dict(options)
    ranks = ranks_of(accelerator)
    result = scan(options, log=ranks.is_main)
    if ranks.is_main:
        print(bucket_table([(it.bucket, it.subset.num_repeats) for it in result.items], len(result.too_small)),
              flush=True)

    vae = _component(components, "vae")
    if vae is None:
        raise ValueError("components has no vae")
    lat = cache_latents(result.items, vae, ranks, dtype, progress, split_threshold, chunk_pixels)

    enc = TextEncoders(*(_component(components, n) for n in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")),
                       t5_max_length=t5_max_length or default_t5_max_length(components))
    if any(x is None for x in (enc.tokenizer, enc.text_encoder, enc.tokenizer_2, enc.text_encoder_2)):
        raise ValueError("components needs tokenizer, text_encoder, tokenizer_2 and text_encoder_2")
    identity = enc.identity()
    # Text jobs from every scanned image (not only those whose latents succeeded), so all ranks split
    # the same list even when they cannot synchronise.
    jobs = {text_path(it.cache_root, cap, identity): cap for it in result.items for cap in it.captions.values()}
    txt = cache_texts(jobs, enc, identity, ranks, dtype, progress=progress)

    failed = {p for p, _ in lat.failed}
    entries = [_entry(it, identity) for it in result.items if it.path not in failed]
    if not entries:
        raise ValueError("empty dataset: no image could be decoded and cached")
    skipped = ([(p, why) for p, why in result.undecodable] + [(p, "too small") for p in result.too_small]
               + list(lat.failed))
    return CachePlan(entries, result, lat, txt, skipped)


def _entry(item: ImageItem, identity: str) -> CacheEntry:
    return CacheEntry(item.path, item.bucket, latent_path(item),
                      {v: text_path(item.cache_root, c, identity) for v, c in item.captions.items()},
                      dict(item.captions), item.subset.real_prompt_ratio, item.subset.num_repeats)
