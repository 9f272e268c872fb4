"""Training data for URAE: datasets, aspect buckets, and on-disk caches of latents and text embeddings.

At 2K-4K the VAE and the text encoders (T5-XXL ~9.5 GB in bf16) must not stay in GPU memory while
training, and encoding a 4096² image every step would dominate the step; so data is encoded once,
to disk, and training reads only the caches.

Public API (what the trainer calls)::

    from urae.data import DataOptions, build_caches, make_dataloader

    options = DataOptions.from_dict(cfg["data"])          # unknown keys -> ValueError naming valid keys
    plan = build_caches(options, pipe.components, accelerator)   # scan, bucket table, cache (resumable)
    pipe.vae = pipe.text_encoder = pipe.text_encoder_2 = None  # free the encoders before training
    if options.cache_only: return
    loader = accelerator.prepare(make_dataloader(plan, batch_size=1, seed=seed))
    for epoch in ...:                                     # each pass is a new epoch (order, caption, noise)
        for batch in loader: batch["latents"], batch["t5_embeds"], batch["clip_pooled"], batch["bucket"], ...

- `DataOptions` (options.py): train_data_dir, dataset_config, caption_extension, real_prompt_ratio,
  resolution, bucket_mode, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale,
  random_crop, cache_dir, cache_only.
- `build_caches(options, components=None, accelerator=None, *, status=None, model_location=None,
  prompts=(), t5_max_length=None, dtype=None)` (build.py) -> `CachePlan` (entries, skipped images
  with reasons, cache reports, text identity). components: a FluxPipeline or its `.components`
  (the models as objects, on any device); the models of a kind `status` found complete may be left
  out. model_location: where they were loaded from, so their identities go into the memo. accelerator: an Accelerator /
  PartialState; every rank caches a round-robin share, waits for the others, and returns the same
  complete plan. T5 length defaults to 512, 256 when the transformer is schnell. Caches go to
  `cache_dir` (or `.urae_cache` inside each image folder); reruns reuse valid files and rebuild
  missing, corrupt or stale ones, so a killed run resumes.
- What is cached: latents = the VAE posterior **mean and std** in raw VAE space
  (latent_cache.py); text = T5 [L, 4096] + mask + CLIP pooled [768] per distinct caption
  (text_cache.py). Pixels are normalised to [-1, 1] before the VAE (images.py).
- Loading only what is missing (no model is loaded to decide)::

      status = cache_status(options, model_dir, dtype=weight_dtype, prompts=sample_prompts, accelerator=acc)
      parts = {}                                  # urae.components loads single components
      if status.needs_text_encoders: parts.update(load_text_encoders(model_dir, weight_dtype, device))
      if status.needs_vae: parts["vae"] = load_vae(model_dir, weight_dtype, device)
      plan = build_caches(options, parts, acc, status=status, prompts=sample_prompts)
      embeds = cache_prompts(sample_prompts, plan)  # [(t5 [1, L, 4096], clip_pooled [1, 768])], from disk

  `cache_status` (status.py) scans once and checks every cache header against the model identities
  recorded in a memo (memo.py: `model_identities.json` in each cache root, keyed by the component
  files on disk, the load dtype and the T5 length); a kind is "unknown" until a run that loaded its
  models recorded them, or when the files changed; a hub id counts only through its local snapshot.
- `make_dataloader(plan, batch_size, seed, shuffle, sample_posterior, num_workers)` (loader.py): batches
  that never mix buckets: latents [B, 16, H/8, W/8] already FLUX-normalised ((z - shift) * scale,
  applied in `CachedDataset`), t5_embeds [B, L, 4096], t5_mask [B, L], clip_pooled [B, 768], caption
  strings and variants. The original prompt is chosen with probability real_prompt_ratio when a
  .json side file gives both `prompt` and `generated_prompt`.

Modules, one job each: options (config keys), datasets (folders, side files, dataset TOML), buckets
(URAE and area buckets, assignment, crop geometry, table), images (decode, LANCZOS resize, crop,
[-1, 1]), vae_encode (posterior; above 2048² an exact split encode that keeps full-resolution
activations in host memory), latent_cache, text_cache, identity (fingerprints for staleness), memo (identities without models),
status (completeness without models), prompt_cache (sample-prompt embeddings),
distributed (ranks), loader, build, synthetic (procedural test images).
CLI: `python -m urae.data --help` (multi-process: `accelerate launch --multi_gpu --num_processes N -m urae.data ...`).
"""

from urae.data.build import CachePlan, build_caches
from urae.data.loader import make_dataloader
from urae.data.options import DataOptions
from urae.data.prompt_cache import cache_prompts
from urae.data.status import CacheStatus, KindStatus, cache_status

__all__ = ["CachePlan", "CacheStatus", "DataOptions", "KindStatus", "build_caches", "cache_prompts", "cache_status",
           "make_dataloader"]
