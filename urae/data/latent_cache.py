"""Latent cache: one .safetensors per (image, bucket) holding the VAE posterior.

Stored: the posterior **mean and std** (keys "mean", "std", [16, H/8, W/8]) in raw VAE space, so
training can draw a fresh sample every step (as encoding on the fly would) or use the mean. The FLUX
normalisation (z - shift_factor) * scaling_factor is applied when a sample is loaded
(`urae.data.loader`, via `vae_encode.flux_latents`), with the factors recorded in the file.

Metadata keys compared before reuse (a mismatch means stale -> re-encode): format, vae (weights
fingerprint), bucket, crop_mode, source (image size + head/tail hash), dtype. Recorded only: crop
(resize and offset actually used), shift_factor, scaling_factor, stored. A file that cannot be read
(truncated, corrupt) is rebuilt. Writes go through a temp file + rename, so a killed run leaves
only whole files and a rerun continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from urae.data.datasets import ImageItem
from urae.data.distributed import Ranks
from urae.data.identity import file_fingerprint, module_fingerprint
from urae.data.images import bucket_pixels
from urae.data.vae_encode import DEFAULT_CHUNK_PIXELS, DEFAULT_SPLIT_THRESHOLD, encode_posterior
from urae.io import cached_file_meta, load_safetensors, save_safetensors_atomic

logger = logging.getLogger(__name__)

FORMAT = "urae-latent-v1"
STORED = "posterior_mean_std"
_CHECKED = ("format", "vae", "bucket", "crop_mode", "source", "dtype")


def latent_path(item: ImageItem) -> Path:
    """<cache_root>/latents/<relative path>_<ext>_<W>x<H>[_rc].safetensors (bucket and crop mode in the name:
    one image may be used at several resolutions, or centre- and random-cropped, by different subsets)."""
    rel = item.rel_path
    w, h = item.bucket
    crop = "_rc" if item.subset.random_crop else ""
    name = f"{rel.stem}_{rel.suffix.lstrip('.').lower()}_{w}x{h}{crop}.safetensors"
    return item.cache_root / "latents" / rel.parent / name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expected_facts(item: ImageItem, vae_id: str, dtype: torch.dtype) -> dict[str, str]:
    return {
        "format": FORMAT,
        "vae": vae_id,
        "bucket": f"{item.bucket[0]}x{item.bucket[1]}",
        "crop_mode": "random" if item.subset.random_crop else "center",
        "source": file_fingerprint(item.path),
        "dtype": dtype_name(dtype),
    }


def check_latent_file(path: Path, facts: dict[str, str]) -> str | None:
    """None if `path` is a usable cache for these facts, else why not (missing, corrupt, stale: ...)."""
    problem, meta = cached_file_meta(path, {"mean", "std"})
    if problem:
        return problem
    diff = [k for k in _CHECKED if meta.get(k) != facts.get(k)]
    return f"stale ({', '.join(diff)} changed)" if diff else None


def encode_item(item: ImageItem, vae, dtype: torch.dtype | None = None, pixels=None,
                split_threshold: int = DEFAULT_SPLIT_THRESHOLD, chunk_pixels: int = DEFAULT_CHUNK_PIXELS):
    """(tensors, crop) for one image: posterior mean/std [16, h, w] on CPU in `dtype` (default: the VAE's)."""
    if pixels is None:
        pixels = bucket_pixels(item.path, item.bucket, item.subset.random_crop, str(item.rel_path))
    px, crop = pixels
    mean, std = encode_posterior(vae, px[None], split_threshold, chunk_pixels)
    dtype = dtype or next(vae.parameters()).dtype
    return {"mean": mean[0].to("cpu", dtype), "std": std[0].to("cpu", dtype)}, crop


def load_latent_file(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    tensors, meta = load_safetensors(path)
    return tensors["mean"], tensors["std"], meta


@dataclass
class LatentCacheReport:
    total: int = 0
    reused: int = 0
    encoded: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)  # images that could not be decoded
    rebuilt: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0  # wall time of this rank's caching, up to and including the final barrier
    identity: str = ""  # the VAE's fingerprint the files are checked against


def cache_latents(items: list[ImageItem], vae, ranks: Ranks | None = None, dtype: torch.dtype | None = None,
                  progress: bool = True, split_threshold: int = DEFAULT_SPLIT_THRESHOLD,
                  chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> LatentCacheReport:
    """Make sure every item has a valid latent file; this rank encodes its round-robin share.

    Returns this rank's counts; after the final barrier every rank re-checks every file, so `failed`
    lists every image that has no cache, whichever rank tried it.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    ranks = ranks or Ranks()
    dtype = dtype or next(vae.parameters()).dtype
    vae_id = module_fingerprint(vae)
    unique = list({latent_path(it): it for it in items}.items())
    mine = ranks.share(unique)
    report = LatentCacheReport(total=len(unique), identity=vae_id)
    todo = []
    for path, item in mine:
        why = check_latent_file(path, expected_facts(item, vae_id, dtype))
        if why is None:
            report.reused += 1
        else:
            report.rebuilt[why.split(" ")[0]] = report.rebuilt.get(why.split(" ")[0], 0) + 1
            todo.append((path, item))
    if ranks.is_main:
        reasons = ", ".join(f"{n} {k}" for k, n in report.rebuilt.items()) or "none"
        print(f"latent cache: {len(unique)} image-bucket pairs over {ranks.count} process(es); rank 0 share "
              f"{len(mine)}: {report.reused} valid, {len(todo)} to encode ({reasons}); split encode above "
              f"{split_threshold} px; stored: posterior mean+std, {dtype_name(dtype)}", flush=True)

    def load(entry):
        _, item = entry
        try:
            return bucket_pixels(item.path, item.bucket, item.subset.random_crop, str(item.rel_path))
        except Exception as e:  # any decode failure skips the image
            return e

    bar = tqdm(total=len(todo), desc=f"latents (rank {ranks.index})", unit="img",
               disable=not progress or not ranks.is_main)
    # Decode the next image on a thread while the VAE encodes this one (PIL releases the GIL).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(load, e) for e in todo[:2])
        for i, (path, item) in enumerate(todo):
            loaded = pending.popleft().result()
            if i + 2 < len(todo):
                pending.append(pool.submit(load, todo[i + 2]))
            if isinstance(loaded, Exception):
                report.failed.append((item.path, f"{type(loaded).__name__}: {loaded}"))
                bar.update(1)
                continue
            tensors, crop = encode_item(item, vae, dtype, loaded, split_threshold, chunk_pixels)
            meta = {**expected_facts(item, vae_id, dtype), "crop": crop.as_text(), "stored": STORED,
                    "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor,
                    "image": str(item.rel_path)}
            save_safetensors_atomic(tensors, path, meta)
            report.encoded += 1
            bar.update(1)
    bar.close()
    ranks.barrier()
    report.seconds = time.perf_counter() - start
    if ranks.count > 1 and ranks.can_sync:
        # Every rank checks the other ranks' shares too (header reads only), so all ranks agree on
        # which images have a cache and return the same plan.
        mine_failed = {p for p, _ in report.failed}
        for path, item in unique:
            if item.path not in mine_failed and check_latent_file(path, expected_facts(item, vae_id, dtype)):
                report.failed.append((item.path, "no valid cache after caching (could not be decoded?)"))
    if report.failed and ranks.is_main:
        logger.warning("skipped %d image(s) that could not be decoded:\n  %s", len(report.failed),
                       "\n  ".join(f"{p}: {why}" for p, why in report.failed))
    return report
