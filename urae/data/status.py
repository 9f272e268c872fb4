"""Whether the caches are complete, decided without loading any model.

A training run whose caches are complete needs neither the text encoders (T5-XXL: ~9.5 GB) nor the
VAE. `cache_status` scans the dataset (headers and side files only), looks the model identities up
in the memo (`urae.data.memo`) and checks every cache file's header, so the caller loads only the
components of the kinds that are not complete and passes the status on to `build_caches`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from urae.common import has_guidance_embedding
from urae.data import memo
from urae.data.buckets import bucket_table
from urae.data.datasets import ScanResult, scan
from urae.data.distributed import Ranks, ranks_of
from urae.data.latent_cache import check_latent_file, dtype_name, expected_facts, latent_path
from urae.data.options import DataOptions
from urae.data.text_cache import T5_MAX_LENGTH_DEV, T5_MAX_LENGTH_SCHNELL, check_text_file, text_path
from urae.io import cached_file_meta

COMPLETE, INCOMPLETE, UNKNOWN = "complete", "incomplete", "unknown"


@dataclass
class KindStatus:
    """One kind of cache (latents or texts): complete, incomplete (some files missing, corrupt or stale)
    or unknown (the model identity is not in the memo, so the files cannot be judged without the model)."""

    state: str
    identity: str | None = None
    total: int = 0
    valid: int = 0
    why: str = ""

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    def describe(self) -> str:
        if self.state == UNKNOWN:
            return f"unknown ({self.why})"
        return f"{self.state} ({self.valid} of {self.total} valid)"


@dataclass
class CacheStatus:
    scan: ScanResult
    latents: KindStatus
    texts: KindStatus
    model_location: str | None
    dtype: torch.dtype  # the models' load dtype the identities are keyed on
    cache_dtype: torch.dtype | None  # the storage dtype asked of build_caches (None: the models' dtype)
    t5_max_length: int
    prompts: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.latents.complete and self.texts.complete

    @property
    def needs_vae(self) -> bool:
        return not self.latents.complete

    @property
    def needs_text_encoders(self) -> bool:
        return not self.texts.complete


def cache_roots(result: ScanResult) -> list[Path]:
    return sorted({it.cache_root for it in result.items})


def prompt_root(result: ScanResult) -> Path:
    """Where sample-prompt embeddings go: the text cache of the first image's cache root."""
    return result.items[0].cache_root


def text_jobs(result: ScanResult, identity: str, prompts=()) -> dict[Path, str]:
    """Text cache file -> caption, for every caption variant of every scanned image plus the prompts."""
    jobs = {text_path(it.cache_root, cap, identity): cap for it in result.items for cap in it.captions.values()}
    root = prompt_root(result)
    jobs.update({text_path(root, p, identity): p for p in prompts})
    return jobs


def print_scan(result: ScanResult) -> None:
    print(bucket_table([(it.bucket, it.subset.num_repeats) for it in result.items], len(result.too_small)),
          flush=True)


def t5_length_of(folder: Path | None) -> int:
    """256 for FLUX.1-schnell (no guidance embedding in the transformer config), else 512."""
    try:
        cfg = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return T5_MAX_LENGTH_DEV
    return T5_MAX_LENGTH_DEV if has_guidance_embedding(cfg) else T5_MAX_LENGTH_SCHNELL


def cache_status(options: DataOptions | dict, model_location: str | None, *, dtype: torch.dtype,
                 t5_max_length: int | None = None, cache_dtype: torch.dtype | None = None, prompts=(),
                 accelerator=None, log: bool = True, found: ScanResult | None = None) -> CacheStatus:
    """Scan the dataset and tell, per kind, whether every cache file is present and valid. Loads no model.

    model_location: the FLUX.1 folder or hub id the models would load from (a hub id counts only when
    its snapshot is in the local hub cache). dtype: the dtype the VAE and text encoders would be
    loaded in. cache_dtype: build_caches' `dtype` (storage; None = the models' dtype). prompts: sample
    prompts whose embeddings count as part of the text cache. accelerator: as for build_caches; the
    ranks agree (a kind is complete only if it is on every rank), so they all load the same models.
    log: print the bucket table, scan warnings and the status (main rank only). found: a scan of these
    options already made (the trainer's plan stage), reused instead of reading every image header again.
    """
    options = options if isinstance(options, DataOptions) else DataOptions.from_dict(options)
    ranks = ranks_of(accelerator)
    log = log and ranks.is_main
    result = found if found is not None else scan(options, log=log)
    if log:
        print_scan(result)
    folder = memo.local_model_folder(model_location)
    t5_len = t5_max_length or t5_length_of(folder)
    roots = cache_roots(result)
    latents = _latent_status(result, roots, memo.lookup(roots, "vae", memo.vae_key(folder, dtype)), cache_dtype or dtype)
    text_id = memo.lookup(roots, "text", memo.text_key(folder, dtype, dtype, t5_len))
    texts = _text_status(result, text_id, tuple(prompts), cache_dtype)
    if folder is None:
        latents.why = texts.why = f"no local files for {model_location}"
    _agree(ranks, latents, texts)
    status = CacheStatus(result, latents, texts, None if model_location is None else str(model_location), dtype,
                         cache_dtype, t5_len, tuple(prompts))
    if log:
        print(f"cache status: latents {latents.describe()}; texts {texts.describe()}", flush=True)
    return status


def _latent_status(result: ScanResult, roots, vae_id: str | None, storage: torch.dtype) -> KindStatus:
    unique = {latent_path(it): it for it in result.items}
    if vae_id is None:
        return KindStatus(UNKNOWN, total=len(unique), why=_unjudged_latents(unique, storage))
    valid = sum(check_latent_file(p, expected_facts(it, vae_id, storage)) is None for p, it in unique.items())
    return KindStatus(COMPLETE if valid == len(unique) else INCOMPLETE, vae_id, len(unique), valid)


def _unjudged_latents(files, storage: torch.dtype) -> str:
    """Why the latents cannot be judged without the VAE, and what the files' headers already tell: how many are
    missing and how many hold another storage dtype (one version per image is kept, so those are re-encoded)."""
    missing, other = 0, {}
    for p in files:
        problem, meta = cached_file_meta(p, {"mean", "std"})
        if problem:
            missing += 1
        elif meta.get("dtype") != dtype_name(storage):
            other[meta.get("dtype")] = other.get(meta.get("dtype"), 0) + 1
    why = f"no caching run has used these VAE files in {dtype_name(storage)} yet, so the VAE loads"
    if missing == len(files):
        return f"{why}: all {missing} latent files are still to be encoded"
    parts = [f"{missing} missing"] if missing else []
    parts += [f"{n} stored as {d} (this run stores {dtype_name(storage)}; the new files replace them)"
              for d, n in other.items()]
    rest = len(files) - missing - sum(other.values())
    parts += [f"{rest} to check against the VAE"] if rest else []
    return f"{why} to encode: {', '.join(parts)}"


def _text_status(result: ScanResult, text_id: str | None, prompts, storage: torch.dtype | None) -> KindStatus:
    if text_id is None:
        return KindStatus(UNKNOWN, total=len(text_jobs(result, "", prompts)),
                          why="no caching run has used these text encoder files in this dtype and T5 length yet, "
                              "so the encoders load and check or encode every caption")
    jobs = text_jobs(result, text_id, prompts)
    valid = sum(check_text_file(p, c, text_id, storage) is None for p, c in jobs.items())
    return KindStatus(COMPLETE if valid == len(jobs) else INCOMPLETE, text_id, len(jobs), valid)


def _agree(ranks: Ranks, *kinds: KindStatus) -> None:
    """Make a kind complete on every rank or on none (otherwise some ranks would wait at a caching barrier)."""
    if ranks.count == 1 or not ranks.synchronised:
        return
    from accelerate.utils import gather_object

    everywhere = gather_object([[k.complete for k in kinds]])
    for i, k in enumerate(kinds):
        if k.complete and not all(flags[i] for flags in everywhere):
            k.state, k.why = INCOMPLETE, "incomplete on another process"
