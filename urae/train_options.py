"""The training config keys (sd-scripts names where one exists) and their checks."""

from __future__ import annotations

from urae.config import ConfigError, Option, check_ranges
from urae.flow import TIMESTEP_SAMPLING, TRAIN_GUIDANCE
from urae.optim import OPTIMIZERS, SCHEDULERS
from urae.rope import SCHEMES

DATA_KEYS = ("train_data_dir", "dataset_config", "caption_extension", "real_prompt_ratio", "resolution",
             "bucket_mode", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
             "random_crop", "cache_dir", "cache_only")

_CACHED = "not needed: latents and text embeddings are always cached on disk (cache_dir; --cache_only builds them)"
_SDPA = "not needed: attention always runs through PyTorch's scaled_dot_product_attention"
_MEMORY = "not needed: memory = auto picks blocks_to_swap / offload_activations / fp8_base for your GPU"
_ONLY_TRANSFORMER = "not needed: only the transformer is trained (text embeddings are cached); use learning_rate"
_SEPARATE_FILES = ("not needed: the VAE and text encoders come from pretrained_model_name_or_path (a diffusers "
                   "folder or hub id); a single-file transformer goes in transformer")
# sd-scripts' flags that have no key of the same name here, with what to use instead: said in place of a guess
SD_SCRIPTS_FLAGS = {
    "sdpa": _SDPA, "xformers": _SDPA, "mem_eff_attn": _SDPA, "flash_attn": _SDPA,
    "cache_latents": _CACHED, "cache_latents_to_disk": _CACHED, "cache_text_encoder_outputs": _CACHED,
    "cache_text_encoder_outputs_to_disk": _CACHED, "vae_batch_size": "not needed: latents are cached one image "
    "at a time (split into row chunks above 2048²)",
    "network_weights": "use resume = auto (or a state folder) to continue a run, or base_lora to train on top of "
    "a finished LoRA",
    "dim_from_weights": "not needed: resume reads the rank from the state; base_lora may have any rank",
    "network_train_unet_only": _ONLY_TRANSFORMER, "unet_lr": _ONLY_TRANSFORMER, "text_encoder_lr": _ONLY_TRANSFORMER,
    "ae": _SEPARATE_FILES, "clip_l": _SEPARATE_FILES, "t5xxl": _SEPARATE_FILES,
    "max_train_epochs": "use max_train_steps", "save_every_n_epochs": "use save_every_n_steps",
    "sample_every_n_epochs": "use sample_every_n_steps", "sample_sampler": "not needed: samples use FLUX's "
    "flow-matching Euler sampler", "save_last_n_epochs": "use save_last_n_steps",
    "save_state": "not needed: every save_every_n_steps save writes a training state (resume = auto continues it)",
    "save_model_as": "not needed: adapters are always .safetensors", "full_bf16": "use mixed_precision = bf16",
    "highvram": _MEMORY, "lowvram": _MEMORY, "split_mode": _MEMORY, "cpu_offload_checkpointing": _MEMORY,
    "apply_t5_attn_mask": "not supported: as in FLUX.1's own pipeline, padding tokens are attended to",
    "max_token_length": "use t5_max_length", "output_config": "not needed: train_config.toml in output_dir holds "
    "every resolved key",
    "model_prediction_type": "not needed: the model predicts URAE's flow-matching target (noise - x0)",
}

OPTIONS = [
    # model
    Option("pretrained_model_name_or_path", str, "black-forest-labs/FLUX.1-dev", "FLUX.1 diffusers folder or hub id"),
    Option("transformer", str, None, "single-file transformer checkpoint (BFL layout) to use instead"),
    Option("demo", bool, False, "build the tiny offline model and procedural dataset at the configured paths"),
    # data (urae.data)
    Option("train_data_dir", str, None, "folder of images with .txt/.json captions"),
    Option("dataset_config", str, None, "sd-scripts dataset TOML"),
    Option("caption_extension", str, None, "caption side file: .txt, .json (prompt / generated_prompt keys) or "
           ".caption; default: whichever of them exists, in that order"),
    Option("allow_missing_captions", bool, False, "train even when many images have no usable caption (they get "
           "an empty one); otherwise more than 5% without one is refused"),
    Option("real_prompt_ratio", float, 0.5, "probability of the original prompt over the generated caption"),
    Option("resolution", str, "2048", "base size: long side of URAE buckets (or 'W,H')"),
    Option("bucket_mode", str, "urae", "aspect buckets", choices=("urae", "area")),
    Option("min_bucket_reso", int, None, "area buckets: smallest side"),
    Option("max_bucket_reso", int, None, "area buckets: largest side"),
    Option("bucket_reso_steps", int, 64, "area buckets: side step (multiple of 16)"),
    Option("bucket_no_upscale", bool, False, "never enlarge images; use a smaller bucket instead"),
    Option("random_crop", bool, False, "random instead of centre crop"),
    Option("cache_dir", str, None, "where latent/text caches go (default: beside the images)"),
    Option("cache_only", bool, False, "build the caches and stop"),
    Option("t5_max_length", int, None, "T5 tokens (default 512 dev, 256 schnell)"),
    # adapter
    Option("network_module", str, "networks.minor_lora", "the network module (sd-scripts interface)"),
    Option("network_dim", int, 16, "LoRA rank r"),
    Option("network_alpha", float, 16.0, "LoRA alpha (scale = alpha / r)"),
    Option("network_args", list, [], "module options as key=value (init=minor, targets=urae, …)"),
    Option("allow_quantised_svd", bool, False, "init=minor/major on a transformer file stored in float8/int8: take "
           "the SVD of the rounded weights anyway (lossy; the plan says by how much). Better: network_args "
           "svd_weights=<a full-precision file>"),
    Option("base_lora", str, None, "LoRA to train on top of (the 4K recipe starts from the 2K one): the minor SVD is "
           "taken of W + its change, which is applied frozen in every forward (W itself is not modified) and saved "
           "in the final file with the trained change; a path or a hub file owner/repo/file.safetensors"),
    # high-res runtime
    Option("ntk_factor", float, 1.0, "RoPE theta = 10000 x ntk_factor"),
    Option("proportional_attention", bool, False, "softmax scale sqrt(log N / log 4608) / sqrt(d)"),
    Option("rope", str, "ntk", "position scheme in training and in the file's metadata: ntk (URAE's, theta x "
           "ntk_factor), yarn, dype-yarn, dype-ntk (DyPE: patent pending for commercial use), none; "
           "see docs/runtime.md", choices=SCHEMES),
    Option("rope_base_resolution", int, 1024, "yarn/dype: the size the base model was trained at"),
    Option("dype_lambda", float, 2.0, "dype: strength sigma^lambda of each sample's noise level"),
    # objective
    Option("guidance_scale", float, TRAIN_GUIDANCE, "guidance embedding in training: must be 1 for FLUX.1-dev"),
    Option("allow_training_guidance", bool, False, "expert override: train with guidance_scale != 1"),
    Option("timestep_sampling", str, "uniform", "training timesteps", choices=TIMESTEP_SAMPLING),
    Option("sigmoid_scale", float, 1.0, "scale for sigmoid/shift timestep sampling"),
    Option("discrete_flow_shift", float, 3.0, "shift for timestep_sampling = shift"),
    # optimisation
    Option("max_train_steps", int, 2000, "optimizer steps"),
    Option("learning_rate", float, 1.0, "learning rate (1.0 for Prodigy)"),
    Option("train_batch_size", int, 1, "batch per process"),
    Option("gradient_accumulation_steps", int, 1, "micro-batches per optimizer step"),
    Option("optimizer_type", str, "prodigy", "optimizer", choices=OPTIMIZERS),
    Option("optimizer_args", list, [], "optimizer options as key=value (weight_decay=1e-4, …)"),
    Option("lr_scheduler", str, "constant", "LR schedule", choices=SCHEDULERS),
    Option("lr_warmup_steps", int, 0, "warm-up steps"),
    Option("max_grad_norm", float, 1.0, "gradient clipping (0 = off)"),
    # no fp16: T5-XXL overflows in fp16 and FLUX is trained in bf16
    Option("mixed_precision", str, "auto", "bf16 on GPU, fp32 on CPU by default", choices=("auto", "no", "bf16")),
    Option("gradient_checkpointing", bool, True, "recompute activations in backward (needed at 2K/4K)"),
    Option("seed", int, 0, "seed for everything random"),
    # outputs
    Option("output_dir", str, "out", "where adapters, states, samples and logs go"),
    Option("output_name", str, "urae", "final file: <output_dir>/<output_name>.safetensors"),
    Option("save_every_n_steps", int, None, "save adapter + training state every N steps"),
    Option("save_last_n_steps", int, None, "keep only states from the last N steps"),
    Option("save_precision", str, "fp32", "adapter file dtype", choices=("fp32", "bf16", "fp16")),
    Option("no_metadata", bool, False, "final file: only what loaders need (structure, runtime settings), no training "
           "details (sd-scripts' no_metadata)"),
    Option("resume", str, None, "'auto' (newest state in output_dir) or a state folder"),
    Option("overwrite", bool, False, "allow output_dir to hold another run's files"),
    Option("sample_prompts", str, None, "prompts file for samples, one per line with sd-scripts' flags: --w/--h size, "
           "--d seed, --s steps, --g embedded guidance, --l CFG scale (> 1: true CFG), --n negative prompt"),
    Option("sample_every_n_steps", int, None, "make samples every N steps"),
    Option("sample_at_first", bool, False, "also make samples before training"),
    Option("sample_resolution", str, None, "sample size 'W,H' (default: the base resolution)"),
    Option("sample_steps", int, None, "sample denoising steps (default 28 dev, 4 schnell)"),
    Option("validation_prompts", str, None, "prompts file for validation images (fixed seeds, training resolution; "
           "e.g. presets/eval_prompts.txt)"),
    Option("validation_every_n_steps", int, None, "make and score validation images every N steps (and at step 0); "
           "values go to train_log.jsonl and TensorBoard as validation/<metric>"),
    Option("validation_metrics", str, "detail", "comma-separated image metrics of flux_urae_eval.py (default: the "
           "weight-free detail metric, so nothing is downloaded)"),
    Option("log_with", str, None, "tensorboard (when installed); unset = none", choices=("tensorboard", "none")),
    Option("logging_dir", str, None, "TensorBoard folder (default <output_dir>/logs)"),
    # GPU memory (urae.memory); explicit keys override what memory = auto chose
    Option("memory", str, "auto", "auto: block swap / activation offload / fp8 chosen from the GPU's memory and the "
           "resolution; off: everything resident", choices=("auto", "off")),
    Option("blocks_to_swap", int, None, "N transformer blocks live in host memory, copied in just before they run "
           "(lossless; needs gradient_checkpointing)"),
    Option("fp8_base", bool, None, "store the frozen base weights as float8 e4m3, upcast per layer (lossy: see the "
           "README's fp8 note)"),
    Option("offload_activations", bool, None, "checkpointed block inputs wait in pinned host memory for backward "
           "(true), or in a file (disk: hundreds of TB written over a 4096² run, see the README); lossless",
           choices=("disk",)),
    Option("checkpoint_segments", int, None, "two-level checkpointing: keep one block input in k and rebuild the "
           "others in backward (about one extra forward per step; lossless)"),
    Option("activation_dir", str, None, "offload_activations = disk: the folder of its file, removed on exit "
           "(default: the cache folder, else the output folder)"),
    Option("host_memory_budget", float, None, "memory = auto: GiB of pinned host RAM one process may use for the "
           "staging buffers and offloaded inputs (default: 70% of the machine's RAM shared by its processes)"),
]


# Every numeric key's range, checked before anything runs: key -> (lowest, lowest allowed, highest or None).
RANGES = {
    **{k: (0, False, None) for k in ("learning_rate", "network_alpha", "ntk_factor", "sigmoid_scale", "dype_lambda",
                                     "discrete_flow_shift", "host_memory_budget")},
    **{k: (1, True, None) for k in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                                    "network_dim", "t5_max_length", "sample_steps")},
    **{k: (0, True, None) for k in ("lr_warmup_steps", "max_grad_norm", "seed", "guidance_scale", "blocks_to_swap",
                                    "save_every_n_steps", "sample_every_n_steps", "save_last_n_steps",
                                    "validation_every_n_steps")},
    **{k: (16, True, None) for k in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")},
    "real_prompt_ratio": (0, True, 1),
}


def check(cfg: dict) -> None:
    """Cross-key rules and the URAE guidance rule."""
    if cfg["guidance_scale"] != TRAIN_GUIDANCE and not cfg["allow_training_guidance"]:
        raise ConfigError(
            f"guidance_scale = {cfg['guidance_scale']} refused: FLUX.1-dev is guidance-distilled, and URAE trains "
            f"with the guidance embedding fixed at 1 (paper §3.4); use 3.5 only at inference. Set "
            f"allow_training_guidance = true to override (expert use).")
    check_ranges(cfg, RANGES)
    runtime_settings(cfg)
    if not cfg["train_data_dir"] and not cfg["dataset_config"]:
        raise ConfigError("no training data: set train_data_dir (a folder) or dataset_config (an sd-scripts TOML)")
    if (cfg["sample_every_n_steps"] or cfg["sample_at_first"]) and not cfg["sample_prompts"]:
        raise ConfigError("sample_every_n_steps/sample_at_first need sample_prompts (a prompts file)")
    if cfg["lr_warmup_steps"] and cfg["lr_scheduler"] == "constant":
        raise ConfigError(f"lr_warmup_steps = {cfg['lr_warmup_steps']} has no effect with lr_scheduler = constant; "
                          f"use constant_with_warmup (or cosine)")
    if cfg["sample_prompts"] and (cfg["sample_every_n_steps"] or cfg["sample_at_first"]):
        check_sample_prompts(cfg)
    from urae.eval import validation

    validation.check(cfg)


def runtime_settings(cfg: dict):
    """The high-res runtime a run trains (and samples) under."""
    from urae.runtime import HighResSettings

    try:
        return HighResSettings(ntk_factor=cfg["ntk_factor"], proportional_attention=cfg["proportional_attention"],
                               rope=cfg["rope"], rope_base_resolution=cfg["rope_base_resolution"],
                               dype_lambda=cfg["dype_lambda"])
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_sample_prompts(cfg: dict) -> None:
    """Read and size-check the sample prompts now, not hours later at the first sampling step."""
    from urae.data.options import parse_resolution
    from urae.prompts import read_prompts
    from urae.runtime import check_resolution

    try:
        w, h = parse_resolution(cfg["sample_resolution"] or cfg["resolution"])
        for rec in read_prompts(cfg["sample_prompts"]):
            check_resolution(rec.get("width", w), rec.get("height", h))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"sample_prompts: {e}") from e


def network_kwargs(cfg: dict) -> dict:
    """`network_args` strings -> kwargs for create_network (kept as strings, as sd-scripts passes them)."""
    out = {}
    for item in cfg["network_args"]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"network_args: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    if cfg["base_lora"]:
        from urae.adapters import resolve_lora_file

        out["base_lora"] = resolve_lora_file(cfg["base_lora"])  # a hub file: from the usual cache
    return out
