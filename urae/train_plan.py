"""Stage 1 of a training run: everything that needs no model, checked in seconds, then printed.

A user's mistake (a missing data folder or base LoRA, an output folder holding another run, a size FLUX
cannot take, a full disk) is reported here, before any model loads or any cache is built.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from urae.common import human_bytes, parse_bool
from urae.config import ConfigError
from urae.train_options import DATA_KEYS

# Bytes a state and the adapter file take, per trainable parameter: fp32 factors + frozen copies, and the
# optimizer's fp32 moments (Prodigy keeps ~4 tensors per parameter, AdamW 2).
_ADAPTER_BYTES_PER_PARAM = 8
_OPTIMIZER_BYTES_PER_PARAM = {"prodigy": 16, "adamw": 8, "adamw8bit": 2, "adafactor": 4, "sgd": 0}
# Above this share of images without a usable caption a run is refused unless allow_missing_captions is set:
# a wrong caption_extension (or a folder of captionless images) would otherwise train on empty prompts.
MISSING_CAPTION_SHARE = 0.05


@dataclass
class RunPlan:
    """What stage 1 found: the places, the data and the settings every later stage uses."""

    out_dir: Path
    resume_path: Path | None
    data: object  # urae.data.DataOptions
    scan: object  # urae.data.datasets.ScanResult
    model_location: str
    model_config: dict | None  # the transformer's config.json, None while a hub id is not downloaded
    state_bytes: int  # one saved state (adapter + optimizer), estimated
    memory: object = None  # urae.train_memory.MemoryChoice, set once the device is known

    def summary(self, cfg: dict, world: int) -> str:
        n = len(self.scan.items)
        batch = cfg["train_batch_size"] * cfg["gradient_accumulation_steps"] * world
        return (f"plan: {cfg['max_train_steps']} step(s) x batch {batch} ({cfg['train_batch_size']} x "
                f"{cfg['gradient_accumulation_steps']} accumulation x {world} process(es)) on {n} image(s) at "
                f"{cfg['resolution']}, {_rank_words(cfg)}, {cfg['optimizer_type']} lr {cfg['learning_rate']}; "
                f"outputs to {self.out_dir} (a state is about {human_bytes(self.state_bytes)})"
                + (f"; resuming {self.resume_path}" if self.resume_path else ""))


    def paths(self, cfg: dict) -> str:
        """Every path of the run as it resolved (relative ones against the current folder: one rule)."""
        dirs = sorted({str(it.subset.image_dir) for it in self.scan.items})
        model = Path(self.model_location)
        items = [("data", ", ".join(dirs)), ("model", model.resolve() if model.exists() else self.model_location)]
        for key in ("transformer", "base_lora", "sample_prompts", "dataset_config", "cache_dir"):
            if key == "sample_prompts" and not (cfg.get("sample_every_n_steps") or cfg.get("sample_at_first")):
                continue  # not read when no samples are drawn
            p = Path(cfg[key]).expanduser() if cfg.get(key) else None
            if p is not None:  # a hub file (owner/repo/file) stays as written
                items.append((key, p.resolve() if p.exists() or key == "cache_dir" else cfg[key]))
        items.append(("output", self.out_dir.resolve()))
        return "paths: " + "; ".join(f"{k} {v}" for k, v in items)


def _rank_words(cfg: dict) -> str:
    init = _network_arg(cfg, "init", "minor")
    r = cfg["network_dim"]
    if init in ("minor", "major"):
        return (f"{init} LoRA rank {r} (its file is an exact rank-{2 * r} LoRA: {r} trained + {r} frozen "
                f"{init} components)")
    return f"{init} LoRA rank {r}"


def transformer_config(model_location: str) -> dict | None:
    """The transformer's config.json when it is on disk (a folder, or a hub id already downloaded); None for a
    hub id not downloaded yet: nothing is fetched in the plan stage."""
    from diffusers import FluxTransformer2DModel

    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated: not the user's
            warnings.simplefilter("ignore", UserWarning)
            return dict(FluxTransformer2DModel.load_config(model_location, subfolder="transformer",
                                                           local_files_only=True))
    except Exception:  # OSError for a missing file, assorted errors for a broken one
        return None


def _state_bytes(cfg: dict, model_config: dict | None) -> int:
    """URAE's targets (q, k, v, out of the double blocks; q, k, v of the single ones) at the model's width
    (FLUX.1's when its config is not on disk yet), r x (in + out) each."""
    from urae.memory.estimate import HIDDEN, URAE_TARGETS

    c = model_config
    if c is None:
        width, targets = HIDDEN, URAE_TARGETS
    else:
        width, targets = c["num_attention_heads"] * c["attention_head_dim"], 4 * c["num_layers"] + 3 * c[
            "num_single_layers"]
    params = cfg["network_dim"] * targets * 2 * width
    return params * (_ADAPTER_BYTES_PER_PARAM + _OPTIMIZER_BYTES_PER_PARAM.get(cfg["optimizer_type"], 16))


def _existing_parent(p: Path) -> Path:
    p = p.resolve()
    while not p.exists():
        p = p.parent
    return p


def _check_data(cfg: dict, is_main: bool):
    from urae.data import DataOptions
    from urae.data.datasets import scan

    for key, want in (("train_data_dir", "folder"), ("dataset_config", "file")):
        value = cfg[key]
        if value and not (Path(value).is_dir() if want == "folder" else Path(value).is_file()):
            raise ConfigError(f"{key}: {value} is not an existing {want}")
    try:
        options = DataOptions.from_dict({k: cfg[k] for k in DATA_KEYS})
        return options, scan(options, log=is_main)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e


def _check_model(cfg: dict) -> str:
    from urae.io import read_safetensors_header
    from urae.loading import resolve_model_location

    location = resolve_model_location(cfg["pretrained_model_name_or_path"])
    if cfg["transformer"]:
        try:
            read_safetensors_header(cfg["transformer"])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"transformer: {e}") from e
    return location


def _network_arg(cfg: dict, key: str, default: str | None = None) -> str | None:
    args = dict(a.partition("=")[::2] for a in cfg["network_args"])
    value = args.get(key)
    return default if value is None else value.strip()


def _check_quantised(cfg: dict, location: str, is_main: bool) -> None:
    """A transformer file stored in float8/int8 (read from its header): init=plain trains on it as loaded
    (upcast); the minor/major SVD would take its components from rounded weights, so it is refused unless the
    SVD gets full-precision weights (svd_weights=) or the user accepts the rounding (allow_quantised_svd)."""
    import logging

    from urae.quantised import describe, quantised_weights, rounding_against_minor

    if not cfg["transformer"]:
        return
    found = quantised_weights(cfg["transformer"])
    init = _network_arg(cfg, "init", "minor")
    if not found or init not in ("minor", "major"):
        return
    svd_weights = _network_arg(cfg, "svd_weights")
    if svd_weights:
        if not Path(svd_weights).exists():
            raise ConfigError(f"network_args svd_weights={svd_weights}: no such file or folder")
        theirs = quantised_weights(svd_weights)
        if theirs:
            raise ConfigError(f"network_args svd_weights={svd_weights} stores {describe(theirs)} too; the SVD needs "
                              f"the full-precision (bf16/fp32) weights")
        return
    name = Path(cfg["transformer"]).name
    if not cfg["allow_quantised_svd"]:
        folder = Path(location) / "transformer"
        full = str(folder) if folder.is_dir() else "<a bf16/fp32 transformer file or folder>"
        raise ConfigError(
            f"transformer: {name} stores {describe(found)}, and init={init} would take its singular components from "
            f"the rounded weights (float8 rounding can exceed the minor components): pass network_args "
            f"svd_weights={full} (the SVD reads W there; training still uses {name}), or unset transformer to train "
            f"on {location} itself, or set allow_quantised_svd = true to go on with the rounded weights")
    if is_main:
        seen = rounding_against_minor(cfg["transformer"], cfg["network_dim"])
        size = (f": in {seen[0]} the rounding is about {seen[1]:.3g} in spectral norm, {seen[1] / seen[2]:.1f}x the "
                f"largest of the {cfg['network_dim']} smallest singular values ({seen[2]:.3g})") if seen else ""
        logging.getLogger("urae").warning(
            f"WARNING: allow_quantised_svd: init={init} on {name}, which stores {describe(found)}{size}; the "
            f"{init} components are taken from rounded weights")


def _check_output(cfg: dict) -> tuple[Path, Path | None]:
    from urae.checkpoints import check_output_dir, resolve_resume

    out_dir = Path(cfg["output_dir"])
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output_dir: {out_dir} is a file, not a folder")
    try:
        resume_path = resolve_resume(out_dir, cfg["resume"])
        check_output_dir(out_dir, cfg["resume"] is not None, cfg["overwrite"], cfg["output_name"])
    except (FileNotFoundError, FileExistsError) as e:
        raise ConfigError(str(e)) from e
    return out_dir, resume_path


def _check_network(cfg: dict) -> None:
    """Build the network module on the tiny FLUX.1 of the same architecture (same module names): a misspelt
    init, a target pattern that matches nothing or a bad value fails now, not after the model has loaded."""
    import importlib

    from urae.tiny import build_transformer
    from urae.train_options import network_kwargs

    try:
        module = importlib.import_module(cfg["network_module"])
    except ImportError as e:
        raise ConfigError(f"network_module: cannot import {cfg['network_module']}: {e}") from None
    kwargs = network_kwargs(cfg)
    kwargs.pop("base_lora", None)  # checked as a file above; fusing it needs the real weights
    kwargs["verbose"] = "False"
    try:
        module.create_network(1.0, cfg["network_dim"], cfg["network_alpha"], None, [], build_transformer(), **kwargs)
        train_t5 = parse_bool(kwargs.get("train_t5xxl", False))
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: a missing svd_weights / init_cache folder
        raise ConfigError(f"network_args {cfg['network_args']}: {e}") from None
    if train_t5:
        raise ConfigError("network_args: train_t5xxl is not supported here: training reads cached T5 embeddings, "
                          "so a T5 LoRA would never see a gradient")


def _check_resume(cfg: dict, resume_path: Path | None) -> None:
    """A state from another network or past the end of this run is refused before anything loads."""
    import json

    from urae.io import read_safetensors_header

    if resume_path is None:
        return
    step = json.loads((resume_path / "train_state.json").read_text())["step"]
    if step > cfg["max_train_steps"]:
        raise ConfigError(f"resume: {resume_path} is at step {step}, past max_train_steps = {cfg['max_train_steps']}; "
                          f"raise max_train_steps to continue it")
    _, meta = read_safetensors_header(resume_path / "adapter.safetensors")
    saved = json.loads(meta.get("urae_recipe", "{}"))
    for key in ("network_dim", "network_alpha", "network_args"):
        if key in saved and saved[key] != cfg[key]:
            raise ConfigError(f"resume: {resume_path} was trained with {key} = {saved[key]!r}, this run has "
                              f"{cfg[key]!r}; resume with the same network settings or start a new output_dir")


def _check_captions(cfg: dict, found) -> None:
    missing, total = sum(it.captions == {"prompt": ""} for it in found.items), len(found.items)
    if cfg["allow_missing_captions"] or missing <= MISSING_CAPTION_SHARE * total:
        return
    ext = cfg["caption_extension"]
    looked = f"{ext} side files" if ext else "a .txt, .json or .caption side file"
    raise ConfigError(f"{missing} of {total} images have no usable caption (looked for {looked} beside each image"
                      + (f"; {len(found.bad_captions)} of them empty or unreadable, named above" if found.bad_captions
                         else "") + "); add the captions"
                      + (", or unset caption_extension to read whichever exists" if ext else "")
                      + ", or set allow_missing_captions = true to train those images with an empty caption")


def _check_batches(cfg: dict, found, world: int) -> None:
    """Batches never mix buckets (a short one is topped up from its own bucket): each process needs a batch
    every step, and a batch larger than every bucket only repeats images."""
    import logging
    import math
    from collections import Counter

    counts = Counter()
    for item in found.items:
        counts[item.bucket] += item.subset.num_repeats
    batch = cfg["train_batch_size"]
    per_epoch = sum(math.ceil(n / batch) for n in counts.values())
    if per_epoch < world:
        raise ConfigError(f"{per_epoch} batch(es) of {batch} per epoch for {world} processes: each process needs one "
                          f"per step; add images, lower train_batch_size or use fewer processes")
    if batch > max(counts.values()):
        logging.getLogger("urae").warning(
            f"WARNING: train_batch_size = {batch}, but the largest bucket holds {max(counts.values())} image(s) and "
            f"batches never mix buckets, so each batch repeats images")


def _check_base_lora(spec: str) -> None:
    from urae.adapters import looks_local

    path = Path(spec).expanduser()
    if looks_local(spec) and not path.is_file():
        raise ConfigError(f"base_lora: {path}: no such file. The 4K recipe starts from the 2K stage's LoRA: run the "
                          f"2K stage first (python flux_urae_train.py --config presets/2k.toml writes "
                          f"out/urae_2k/urae_2k.safetensors), or set base_lora to your 2K file")


def check_free_space(out_dir: Path, state_bytes: int) -> None:
    """A run that cannot save even one state and its adapter is refused now, not at its first save."""
    free = shutil.disk_usage(_existing_parent(out_dir)).free
    need = 2 * state_bytes
    if free < need:
        raise ConfigError(f"output_dir: {human_bytes(free)} free on the disk of {out_dir}, but a training state "
                          f"and the adapter need about {human_bytes(need)}; free some space or choose another "
                          f"--output_dir")


def make_plan(cfg: dict, is_main: bool = True, world: int = 1) -> RunPlan:
    """Check everything that needs no model, in the order a user would fix it."""
    from urae.adapters import check_adapter_file, check_adapter_fits, resolve_lora_file
    from urae.optim import check_optimizer

    out_dir, resume_path = _check_output(cfg)
    _check_resume(cfg, resume_path)
    check_optimizer(cfg["optimizer_type"], cfg["learning_rate"], cfg["optimizer_args"])
    _check_network(cfg)
    options, found = _check_data(cfg, is_main)
    _check_captions(cfg, found)
    _check_batches(cfg, found, world)
    base_lora = None
    if cfg["base_lora"]:
        _check_base_lora(cfg["base_lora"])
        base_lora = resolve_lora_file(cfg["base_lora"])  # once: a hub name is a download request
        check_adapter_file(base_lora)
    location = _check_model(cfg)
    _check_quantised(cfg, location, is_main)
    model_config = transformer_config(location)
    if model_config is None and not Path(location).exists():  # a hub id not downloaded yet: can it be?
        from urae.loading import hub_problem

        why = hub_problem(location)
        if why:
            raise ConfigError(f"pretrained_model_name_or_path: {location} is not downloaded yet and cannot be: {why}. "
                              f"Check the network and your login (FLUX.1-dev is gated), or pass a local folder")
    if base_lora:  # another architecture or width, before the transformer loads
        check_adapter_fits(base_lora, model_config)
    state_bytes = _state_bytes(cfg, model_config)
    check_free_space(out_dir, state_bytes)
    return RunPlan(out_dir, resume_path, options, found, location, model_config, state_bytes)
