"""Scan, bucket and cache a dataset in one call: what the trainer and `python -m urae.data` run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from urae.common import has_guidance_embedding
from urae.data import memo
from urae.data.datasets import ImageItem, ScanResult, scan
from urae.data.distributed import ranks_of
from urae.data.latent_cache import LatentCacheReport, cache_latents, latent_path
from urae.data.loader import CacheEntry
from urae.data.options import DataOptions
from urae.data.status import CacheStatus, cache_roots, print_scan, text_jobs
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
    text_identity: str = ""
    t5_max_length: int = T5_MAX_LENGTH_DEV


def component_of(components, name: str):
    if components is None:
        return None
    if isinstance(components, dict):
        return components.get(name)
    return getattr(components, name, None)


def default_t5_max_length(components) -> int:
    """256 for FLUX.1-schnell (no guidance embedding), else 512."""
    transformer = component_of(components, "transformer")
    if transformer is not None and not has_guidance_embedding(transformer):
        return T5_MAX_LENGTH_SCHNELL
    return T5_MAX_LENGTH_DEV


def _dtype_of(module) -> torch.dtype:
    return next(module.parameters()).dtype


def build_caches(options: DataOptions | dict, components=None, accelerator=None, *, status: CacheStatus | None = None,
                 model_location: str | None = None, prompts=(), t5_max_length: int | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True,
                 split_threshold: int = DEFAULT_SPLIT_THRESHOLD, chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> CachePlan:
    """Scan the dataset, print the bucket table, and make sure every latent and caption is cached.

    components: a FluxPipeline or its `.components` dict (vae, tokenizer, text_encoder, tokenizer_2,
    text_encoder_2; transformer optional, only read to tell schnell from dev). Models are used on
    whatever device/dtype they are on. The VAE, or the four text parts, may be left out when `status`
    (from `cache_status`) found that kind complete: its memo identity is used instead.
    accelerator: an accelerate Accelerator/PartialState (each rank
    caches its share; all ranks return the same complete plan), a (process_index, num_processes) pair
    (no barrier: each call caches its share; once the caller has synchronised, a further call returns
    the verified plan and encodes nothing), or None. dtype: storage dtype of cached tensors (default:
    status.cache_dtype, else the encoders' output dtype). status: reuse its scan (no second scan or
    table). model_location (default: status.model_location): where the given models were loaded from,
    unmodified; their identities are recorded in the memo so later runs need not load them.
    prompts: sample prompts to cache with the captions (read them back with `cache_prompts`).
    """
    options = options if isinstance(options, DataOptions) else DataOptions.from_dict(options)
    ranks = ranks_of(accelerator)
    if status is not None:
        result = status.scan
        model_location = model_location or status.model_location
        dtype = dtype if dtype is not None else status.cache_dtype
    else:
        result = scan(options, log=ranks.is_main)
        if ranks.is_main:
            print_scan(result)
    roots = cache_roots(result)
    folder = memo.local_model_folder(model_location) if ranks.is_main else None

    vae = component_of(components, "vae")
    if vae is not None:
        lat = cache_latents(result.items, vae, ranks, dtype, progress, split_threshold, chunk_pixels)
        if folder is not None:
            memo.record(roots, "vae", memo.vae_key(folder, _dtype_of(vae)), lat.identity)
    elif status is not None and status.latents.complete:
        lat = LatentCacheReport(total=status.latents.total, reused=status.latents.total, identity=status.latents.identity)
    else:
        raise ValueError("components has no vae, and cache_status did not find the latent cache complete")

    parts = [component_of(components, n) for n in memo.TEXT_PARTS]
    if all(x is not None for x in parts):
        t5_len = t5_max_length or (status.t5_max_length if status else default_t5_max_length(components))
        enc = TextEncoders(*parts, t5_max_length=t5_len)
        identity = enc.identity()
        # Text jobs from every scanned image (not only those whose latents succeeded), so all ranks split
        # the same list even when they cannot synchronise.
        txt = cache_texts(text_jobs(result, identity, prompts), enc, identity, ranks, dtype, progress=progress)
        if folder is not None:
            key = memo.text_key(folder, _dtype_of(enc.text_encoder), _dtype_of(enc.text_encoder_2), t5_len)
            memo.record(roots, "text", key, identity)
    elif status is not None and status.texts.complete and set(prompts) <= set(status.prompts):
        identity, t5_len = status.texts.identity, status.t5_max_length
        txt = TextCacheReport(total=status.texts.total, reused=status.texts.total)
    elif any(x is not None for x in parts):
        raise ValueError("components needs tokenizer, text_encoder, tokenizer_2 and text_encoder_2")
    else:
        raise ValueError("components has no text encoders, and cache_status did not find the text cache "
                         "(captions and prompts) complete")

    failed = {p for p, _ in lat.failed}
    entries = [_entry(it, identity) for it in result.items if it.path not in failed]
    if not entries:
        raise ValueError("empty dataset: no image could be decoded and cached")
    skipped = ([(p, why) for p, why in result.undecodable] + [(p, "too small") for p in result.too_small]
               + list(lat.failed))
    return CachePlan(entries, result, lat, txt, skipped, identity, t5_len)


def _entry(item: ImageItem, identity: str) -> CacheEntry:
    return CacheEntry(item.path, item.bucket, latent_path(item),
                      {v: text_path(item.cache_root, c, identity) for v, c in item.captions.items()},
                      dict(item.captions), item.subset.real_prompt_ratio, item.subset.num_repeats)
