"""The URAE training run as five named stages: plan, caches, model, loop, save.

1. plan (urae.train_plan): every check that needs no model; fails in seconds; prints what will run.
2. caches: text encoders and VAE in, latents and captions cached, encoders out; nothing else resident.
3. model: the transformer, the memory options, the high-res runtime, the network module.
4. loop: one short loop; states and samples at step boundaries.
5. save: the exact standard-LoRA file.

Multi-process through accelerate: every rank trains on its share of each step's batches and the adapter
gradients are averaged as urae.train_sync explains. Randomness (batch order, timesteps, noise, dropout)
is a function of (seed, step, rank), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from urae.checkpoints import (
    RUN_MARKER,
    clear_run,
    forget_unstarted_run,
    list_states,
    load_adapter_state,
    load_optimizer_state,
    prune_states,
    remove_partial_saves,
    run_started,
    save_state,
    state_dir,
    truncate_log,
)
from urae.common import DTYPES, dtype_from_name, human_bytes, human_count
from urae.config import ConfigError, resolve, to_toml
from urae.flow import flow_loss, sample_timesteps
from urae.io import atomic_path
from urae.optional_imports import defer_bitsandbytes
from urae.runtime import HighResSettings, apply_highres
from urae.sharding import fsdp_requested, shard_base, sharded_bytes_per_rank
from urae.train_memory import resolve_memory
from urae.train_options import OPTIONS, SD_SCRIPTS_FLAGS, check, network_kwargs, runtime_settings
from urae.train_plan import RunPlan, make_plan
from urae.train_sync import (
    BatchStream,
    all_reduce_mean,
    any_rank,
    broadcast_from_main,
    check_ranks_agree,
    init_rng,
    mean_over_ranks,
    seed_for,
)

log = logging.getLogger("urae")


class TrainingStopped(RuntimeError):
    """A run that stopped on purpose (NaN loss, full disk); the message says where the last good state is."""


class Interrupted(Exception):
    """Ctrl-C outside the training loop (which saves a state instead); the message says what is kept."""


@contextlib.contextmanager
def _on_ctrl_c(what: str):
    """A Ctrl-C in this phase becomes one line saying what of the work is kept, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(what) from None


def parse(argv=None) -> dict:
    cfg = resolve(OPTIONS, argv, "flux_urae_train.py",
                  "URAE training for FLUX.1: `accelerate launch flux_urae_train.py --config presets/4k.toml`",
                  sections=("model", "data", "network", "runtime", "training", "optimizer", "output", "sample", "validation"),
                  foreign=SD_SCRIPTS_FLAGS)
    check(cfg)
    return cfg


class _InterruptFlag:
    """Ctrl-C or SIGTERM asks for a clean stop: save a state at the end of the current step, then exit 128 + the
    signal's number (130, 143: the shell's convention, so `train && infer` does not go on without a final file).

    Signals within a few seconds of the first count as the same request (under `accelerate launch` each
    worker gets the terminal's SIGINT and then the launcher's forwarded copy); a later one aborts at once.
    """

    GRACE_SECONDS = 5.0

    def __init__(self):
        self.set = False
        self.signum = signal.SIGINT  # the first signal received (SIGINT when another rank got it)
        self._first = 0.0
        self._old: dict = {}

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.set and now - self._first > self.GRACE_SECONDS:
            raise KeyboardInterrupt
        if not self.set:
            self.set, self._first, self.signum = True, now, signum
            print(f"\n{signal.Signals(signum).name}: saving a state at the end of this step "
                  f"(signal again after {self.GRACE_SECONDS:.0f} s to abort)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _mixed_precision(cfg) -> str:
    mp = cfg["mixed_precision"]
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mp


def _parse_size(value) -> tuple[int, int]:
    from urae.data.options import parse_resolution

    return parse_resolution(value)


def inference_settings(cfg, training: HighResSettings) -> HighResSettings:
    """What a file should be generated with: the training runtime when it was changed (the 4K recipe), else
    URAE's defaults at the trained size (the 2K recipe trains with stock RoPE but generates with NTK 10 and
    proportional attention, as the public URAE inference does)."""
    if training.ntk_factor != 1 or training.proportional_attention or training.rope != "ntk":
        return training
    w, h = _parse_size(cfg["resolution"])
    return HighResSettings.for_resolution(w, h)


@functools.lru_cache(maxsize=4)
def _base_lora_record(spec: str) -> dict:
    """Shared files name their parent by file name and content, never by a local path. Once per run: every
    state save writes it, and a hub name would otherwise be looked up again each time."""
    from urae.adapters import resolve_lora_file
    from urae.data.identity import file_fingerprint

    base = Path(resolve_lora_file(spec))
    return {"name": base.name, "fingerprint": file_fingerprint(base)}


def _adapter_metadata(cfg, step: int) -> dict:
    recipe = {k: cfg[k] for k in ("network_dim", "network_alpha", "network_args", "resolution",
                                  "real_prompt_ratio", "timestep_sampling", "optimizer_type", "learning_rate",
                                  "ntk_factor", "proportional_attention", "rope",
                                  "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "seed")}
    if cfg["base_lora"]:
        recipe["base_lora"] = _base_lora_record(cfg["base_lora"])
    return {
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg["max_train_steps"]),
        "ss_learning_rate": str(cfg["learning_rate"]),
        "ss_optimizer": cfg["optimizer_type"],
        "ss_lr_scheduler": cfg["lr_scheduler"],
        "ss_resolution": str(cfg["resolution"]),
        "ss_seed": str(cfg["seed"]),
        "ss_guidance_scale": str(cfg["guidance_scale"]),
        "ss_timestep_sampling": cfg["timestep_sampling"],
        "ss_sd_model_name": Path(str(cfg["pretrained_model_name_or_path"])).name,
        "urae_recipe": json.dumps(recipe, sort_keys=True),
    }


# ---------------------------------------------------------------- stage 1: plan

def _make_accelerator(cfg, out_dir: Path, tb: bool):
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Long single-rank phases (4K samples, uneven cache shares) outlast NCCL's default 10-minute watchdog.
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), log_with="tensorboard" if tb else None,
                              project_dir=cfg["logging_dir"] or str(out_dir / "logs"),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        # accelerate on a machine without GPUs starts the processes but treats each as alone
        raise ConfigError(f"{torch.distributed.get_world_size()} processes were launched but accelerate sees "
                          f"{accelerator.num_processes}; on a machine without GPUs launch with ACCELERATE_USE_CPU=1 "
                          f"accelerate launch --multi_gpu --num_processes N …")
    return accelerator


def _tensorboard(cfg) -> bool:
    if cfg["log_with"] != "tensorboard":
        return False
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        print("warning: log_with = tensorboard, but tensorboard is not installed; logging to JSONL only")
        return False
    return True


def config_line(cfg: dict, out_dir: Path) -> str:
    """One line in place of the whole resolved config: where it came from and where all of it is written."""
    sources = cfg.get("_sources", {})
    changed = [k for k, v in sources.items() if v != "default"]
    origin = " + ".join(x for x in (cfg.get("_config_file"), "command line" if "command line" in sources.values()
                                    else None) if x) or "defaults"
    return (f"config: {origin} ({len(changed)} of {len(sources)} keys set); every resolved key is written to "
            f"{out_dir / RUN_MARKER} when training starts")


def plan_stage(cfg, accelerator) -> RunPlan:
    main = accelerator.is_main_process
    if cfg["demo"] and main:
        from urae.demo import ensure_demo_assets

        ensure_demo_assets(cfg["pretrained_model_name_or_path"], cfg["train_data_dir"])
    accelerator.wait_for_everyone()
    # every rank checks before any rank writes, so a slow rank never mistakes this run's files for another's
    plan = make_plan(cfg, is_main=main, world=accelerator.num_processes)
    plan.memory = resolve_memory(cfg, accelerator.device, plan.model_config, fsdp_requested(accelerator),
                                 accelerator.num_processes, plan.model_location)
    accelerator.wait_for_everyone()
    if main:
        if cfg["guidance_scale"] != 1.0:
            log.warning(f"WARNING: training with guidance_scale = {cfg['guidance_scale']} (allow_training_guidance). "
                        f"FLUX.1-dev is guidance-distilled; URAE trains with 1.0 and the result may lose quality.")
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        print(config_line(cfg, plan.out_dir), flush=True)
        print(plan.summary(cfg, accelerator.num_processes), flush=True)
        print(plan.paths(cfg), flush=True)
        print(plan.memory.summary(), flush=True)
        if plan.resume_path is None and (cfg["overwrite"] or not run_started(plan.out_dir, cfg["output_name"])):
            clear_run(plan.out_dir, cfg["output_name"])  # also the marker and log of a run that never saved
        remove_partial_saves(plan.out_dir)
    accelerator.wait_for_everyone()
    return plan


# ---------------------------------------------------------------- stage 2: caches

def cache_stage(cfg, plan: RunPlan, accelerator, weight_dtype):
    """Latents and caption embeddings on disk, sample-prompt embeddings in memory. Only the encoders of an
    incomplete cache are loaded, and they are freed before the transformer loads: host RAM never holds the
    text encoders and the transformer at once, and a run with complete caches loads neither encoder nor VAE.
    Returns (CachePlan, sample prompts with their embeddings)."""
    from urae.components import load_text_encoders, load_vae
    from urae.data import build_caches, cache_prompts, cache_status

    main, device = accelerator.is_main_process, accelerator.device
    prompts = _sample_prompts(cfg)
    # each prompt, then the negative prompt of each CFG line (sd-scripts' --l > 1 with --n; "" when unset)
    negatives = [r.get("negative_prompt") or "" for r in prompts if r.get("cfg_scale", 1.0) > 1]
    texts = [r["prompt"] for r in prompts] + negatives
    status = cache_status(plan.data, plan.model_location, dtype=weight_dtype, t5_max_length=cfg["t5_max_length"],
                          prompts=texts, accelerator=accelerator, log=main, found=plan.scan)
    parts = load_text_encoders(plan.model_location, weight_dtype, device) if status.needs_text_encoders else {}
    if status.needs_vae:
        parts["vae"] = load_vae(plan.model_location, weight_dtype, device)
    caches = build_caches(plan.data, parts, accelerator, status=status, prompts=texts)
    if main and caches.skipped:
        print(f"skipped {len(caches.skipped)} image(s): "
              + "; ".join(f"{p.name} ({why})" for p, why in caches.skipped[:5]))
    embeds = cache_prompts(texts, caches, parts if status.needs_text_encoders else None)
    del parts
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    negative = iter(embeds[len(prompts):])
    return caches, [{**rec, "embeds": e, "negative_embeds": next(negative) if rec.get("cfg_scale", 1.0) > 1 else None}
                    for rec, e in zip(prompts, embeds)]


def _sample_prompts(cfg) -> list[dict]:
    """Sample prompts, then validation prompts (marked `validation`): their embeddings are cached alike."""
    from urae.eval.validation import records
    from urae.prompts import read_prompts

    if not cfg["sample_prompts"] or not (cfg["sample_every_n_steps"] or cfg["sample_at_first"]):
        return records(cfg)
    return list(read_prompts(cfg["sample_prompts"])) + records(cfg)


def load_for_training(cfg, plan: RunPlan, weight_dtype, sampling: bool):
    """The transformer alone (memory-mapped), plus the VAE and scheduler when samples are drawn."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from urae.components import load_vae
    from urae.loading import _from_pretrained, load_transformer

    transformer = load_transformer(plan.model_location, cfg["transformer"], dtype=weight_dtype)
    if not sampling:
        return transformer, None, None
    scheduler = _from_pretrained(FlowMatchEulerDiscreteScheduler, plan.model_location, subfolder="scheduler")
    return transformer, load_vae(plan.model_location, weight_dtype), scheduler


# ---------------------------------------------------------------- stage 3: model

@dataclass
class Model:
    transformer: torch.nn.Module
    network: torch.nn.Module
    trainable: list
    settings: HighResSettings
    fsdp: bool = False  # the base is sharded: every rank must run every forward (samples included)
    memory: object = None  # urae.memory.MemoryHandle when memory options are active (transfer statistics)


def model_stage(cfg, plan: RunPlan, transformer, accelerator) -> Model:
    device = accelerator.device
    fsdp = fsdp_requested(accelerator)
    transformer.requires_grad_(False)
    if not fsdp and not plan.memory.active:  # otherwise weights move when sharded / placed by urae.memory
        transformer.to(device)
    if cfg["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    settings = runtime_settings(cfg)
    module = importlib.import_module(cfg["network_module"])
    kwargs = network_kwargs(cfg)
    known = getattr(module, "KNOWN_ARGS", None)  # the plan stage already warned about the others
    kwargs = {k: v for k, v in kwargs.items() if known is None or k in known}
    kwargs.setdefault("runtime", json.dumps(inference_settings(cfg, settings).to_dict()))
    if not accelerator.is_main_process and (known is None or "verbose" in known):
        kwargs["verbose"] = "False"  # its summary line and SVD bar once, from rank 0
    try:  # the plan checked these on the tiny model; the real one can still differ (a base LoRA, odd targets)
        with init_rng(cfg["seed"]):
            network = module.create_network(1.0, cfg["network_dim"], cfg["network_alpha"], None, [], transformer,
                                            **kwargs)
        network.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
        if plan.resume_path is not None:  # the saved factors and frozen copies make the SVD unnecessary
            load_adapter_state(plan.resume_path, network)
    except ValueError as e:
        raise ConfigError(f"network: {e}") from None
    with init_rng(cfg["seed"]):
        network.prepare_grad_etc(None, transformer)  # minor/major SVD (shared across ranks) unless resumed
    network.to(device)
    broadcast_from_main(network, accelerator.num_processes)
    if fsdp:
        shard_base(transformer, device)
        if accelerator.is_main_process:
            print(f"FSDP: the frozen base is split over {accelerator.num_processes} processes, "
                  f"{human_bytes(sharded_bytes_per_rank(transformer))} of weights each", flush=True)
    handle = None
    if plan.memory.active:  # after the SVD: the minor components come from the full-precision weights
        from urae.memory import setup_memory

        handle = setup_memory(transformer, plan.memory.options, device, cfg["gradient_checkpointing"],
                              disk_dir=plan.memory.disk_dir)
    trainable = [p for p in network.parameters() if p.requires_grad]
    return Model(transformer, network, trainable, settings, fsdp, handle)


def _optimizer(cfg, network):
    from urae.optim import make_optimizer, make_scheduler

    params = network.prepare_optimizer_params(None, cfg["learning_rate"], cfg["learning_rate"])
    if isinstance(params, tuple):
        params = params[0]
    optimizer = make_optimizer(cfg["optimizer_type"], params, cfg["learning_rate"], cfg["optimizer_args"])
    return optimizer, make_scheduler(cfg["lr_scheduler"], optimizer, cfg["lr_warmup_steps"], cfg["max_train_steps"])


# ---------------------------------------------------------------- stage 4: loop

class Saver:
    """States and the final file; a save that fails for lack of space stops the run with what to do."""

    def __init__(self, cfg, plan: RunPlan, network, optimizer, lr_sched, accelerator):
        self.cfg, self.plan = cfg, plan
        self.network, self.optimizer, self.lr_sched = network, optimizer, lr_sched
        self.device, self.world, self.main = (accelerator.device, accelerator.num_processes,
                                              accelerator.is_main_process)
        self.last_good = plan.resume_path

    def agree(self, when: str) -> None:
        """Every rank calls it: a diverged adapter stops the run as a bug before anything is written."""
        check_ranks_agree(self.network, self.device, self.world, when, self.last_good)

    def _guard(self, what: str, fn):
        try:
            return fn()
        except Exception as e:
            if getattr(e, "errno", None) != errno.ENOSPC and "No space left" not in str(e):
                raise
            kept = f"the last good state {self.last_good} is intact" if self.last_good else "no state was saved yet"
            raise TrainingStopped(
                f"saving {what} failed: no space left on the disk of {self.plan.out_dir} ({kept}; nothing partial "
                f"was left). A state needs about {human_bytes(self.plan.state_bytes)}; free space, then run again "
                f"with --resume auto") from None

    def state(self, step: int) -> None:
        """Every rank calls it: the ranks' agreement is checked, then rank 0 writes the state."""
        self.agree(f"at step {step}")
        if self.main:
            self.write(step)
        self.last_good = state_dir(self.plan.out_dir, step)

    def write(self, step: int) -> None:
        cfg = self.cfg
        path = self._guard(f"the state of step {step}", lambda: save_state(
            self.plan.out_dir, step, self.network, self.optimizer, self.lr_sched, {"seed": cfg["seed"]},
            _adapter_metadata(cfg, step)))
        prune_states(self.plan.out_dir, step, cfg["save_last_n_steps"])
        self.last_good = path

    def final(self) -> Path:
        cfg = self.cfg
        final = self.plan.out_dir / f"{cfg['output_name']}.safetensors"
        dtype = DTYPES[cfg["save_precision"]]
        meta = {} if cfg["no_metadata"] else _adapter_metadata(cfg, cfg["max_train_steps"])
        self._guard(final.name, lambda: self.network.save_weights(str(final), dtype, meta))
        return final


def make_samples(cfg, parts, prompts, step: int, out_dir: Path, network, settings, device, rank: int = 0,
                 world: int = 1, main: bool = True, write: bool = True, folder: str = "samples",
                 size: str | None = None) -> list[Path]:
    """This rank's share of the sample prompts (prompt k of the file is `prompts[k // world]` on rank k % world)."""
    from diffusers import FluxPipeline
    from tqdm.auto import tqdm

    from urae.outputs import save_png
    from urae.sampling import SampleRequest, generate

    transformer, vae, scheduler = parts
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.to(device), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    w, h = _parse_size(size or cfg["sample_resolution"] or cfg["resolution"])
    used = settings.with_scheduler_shift(scheduler)  # what the images record: the shift actually applied
    was_training = network.training
    network.eval()
    paths = []
    try:
        for j, rec in enumerate(tqdm(prompts, desc=f"{folder} at step {step}", unit="image", leave=False,
                                     disable=not main)):
            i = j * world + rank
            req = SampleRequest(rec["prompt"], rec.get("width", w), rec.get("height", h), rec.get("seed", cfg["seed"]),
                                steps=rec.get("steps", cfg["sample_steps"]), guidance=rec.get("guidance"),
                                cfg_scale=rec.get("cfg_scale", 1.0), negative_prompt=rec.get("negative_prompt"))
            neg = rec.get("negative_embeds")
            img = generate(pipe, req, used, prompt_embeds=tuple(t.to(device) for t in rec["embeds"]),
                           negative_embeds=None if neg is None else tuple(t.to(device) for t in neg))
            if write:
                paths.append(save_png(img, out_dir / folder, f"{step:07d}_{i:02d}",
                                      {"prompt": req.prompt, "step": step, "seed": req.seed, "width": req.width,
                                       "height": req.height, "cfg_scale": req.cfg_scale, "runtime": used.to_dict()}))
    finally:
        network.train(was_training)
        vae.to("cpu")
    if main and paths:  # above the training bar, not glued onto it
        tqdm.write(f"{folder} of step {step}: {len(paths) * world if world > 1 else len(paths)} image(s) in "
                   f"{out_dir / folder}")
    return paths


def train_step(cfg, model: Model, stream: BatchStream, step: int, accelerator) -> float:
    """One optimizer step's forward/backward over its micro-batches; returns this rank's mean loss."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    accum = cfg["gradient_accumulation_steps"]
    total = 0.0
    for micro in range(accum):
        m = step * accum + micro
        batch = stream.get(m)
        gen = torch.Generator().manual_seed(seed_for(cfg["seed"], m, rank, world))
        torch.manual_seed(seed_for(cfg["seed"] + 1, m, rank, world))  # adapter dropout
        x0 = batch["latents"].to(device, torch.float32)
        t = sample_timesteps(x0.shape[0], cfg["timestep_sampling"], gen, sigmoid_scale=cfg["sigmoid_scale"],
                             shift=cfg["discrete_flow_shift"])
        noise = torch.randn(x0.shape, generator=gen).to(device)
        with accelerator.autocast():
            loss = flow_loss(model.transformer, x0, batch["t5_embeds"].to(device), batch["clip_pooled"].to(device),
                             t.to(device), noise, guidance=cfg["guidance_scale"])
        (loss / accum).backward()
        total += loss.detach().float().item() / accum
    return total


def _transfer_stats(handle) -> dict:
    """This step's host <-> device and disk traffic of the memory options (empty when none is active)."""
    if handle is None:
        return {}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in handle.step_stats().items()}


def loop_stage(cfg, plan: RunPlan, model: Model, caches, prompts, vae, scheduler, accelerator, tb: bool) -> int:
    from tqdm.auto import tqdm

    from urae.data import make_dataloader
    from urae.optim import step_size

    device, rank, world, main = (accelerator.device, accelerator.process_index, accelerator.num_processes,
                                 accelerator.is_main_process)
    network, trainable, settings = model.network, model.trainable, model.settings
    optimizer, lr_sched = _optimizer(cfg, network)
    saver = Saver(cfg, plan, network, optimizer, lr_sched, accelerator)
    start = 0
    if plan.resume_path is not None:
        start = int(load_optimizer_state(plan.resume_path, optimizer, lr_sched)["step"])
        if main:
            truncate_log(plan.out_dir / "train_log.jsonl", start)
            print(f"resumed from {plan.resume_path} at step {start}")
    elif cfg["resume"] == "auto" and main:
        print(f"resume auto: no saved state in {plan.out_dir}; starting at step 0")
    stream = BatchStream(make_dataloader(caches, batch_size=cfg["train_batch_size"], seed=cfg["seed"]), rank, world)
    if main:
        print(f"training {cfg['max_train_steps'] - start} step(s) (from {start}) on {world} process(es), "
              f"{len(caches.entries)} image(s), {human_count(sum(p.numel() for p in trainable))} trainable parameters, "
              f"rope {settings.describe_rope()}, proportional attention {'on' if settings.proportional_attention else 'off'}, "
              f"guidance {cfg['guidance_scale']}, {'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision} "
              f"on {device}", flush=True)
    if tb:
        accelerator.init_trackers("urae", config={k: v for k, v in cfg.items()
                                                  if not k.startswith("_") and isinstance(v, (int, float, str, bool))})
    parts = (model.transformer, vae, scheduler)
    checks = [p for p in prompts if p.get("validation")]
    prompts = [p for p in prompts if not p.get("validation")]

    def samples(step, recs=prompts, **kw):
        if model.fsdp:  # sharded blocks need every rank in each forward: all ranks draw every sample, one writes
            make_samples(cfg, parts, recs, step, plan.out_dir, network, settings, device, write=main, main=main, **kw)
        else:
            make_samples(cfg, parts, recs[rank::world], step, plan.out_dir, network, settings, device, rank, world,
                         main=main, **kw)
        accelerator.wait_for_everyone()

    log_path = plan.out_dir / "train_log.jsonl"
    metrics = None
    if checks and main:
        from urae.eval.validation import metrics_for, score_step

        metrics = metrics_for(cfg)

    def validate(step):
        """Validation images at the training resolution, scored on the main process, logged like the loss."""
        samples(step, checks, folder="validation", size=cfg["resolution"])
        if main:
            values = score_step(metrics, plan.out_dir, step)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            if tb:
                accelerator.log(values, step=step)
            print(f"validation at step {step}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}"
                                                            for k, v in values.items()), flush=True)
        accelerator.wait_for_everyone()

    every = cfg["validation_every_n_steps"] if checks else None
    network.train()
    bar = tqdm(total=cfg["max_train_steps"], initial=start, disable=not main, unit="step", desc="training",
               dynamic_ncols=True)
    ema = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(apply_highres(model.transformer, settings))
        interrupt = stack.enter_context(_InterruptFlag())
        if cfg["sample_at_first"] and prompts and start == 0:
            samples(0)
        if every and start == 0:  # the base model's values: where the curves start
            validate(0)
        for step in range(start, cfg["max_train_steps"]):
            if any_rank(interrupt.set, device, world):
                bar.close()  # the lines below start on their own line
                saver.state(step)
                if main:
                    print(f"stopped at step {step}; state saved to {saver.last_good}\nresume with the same command "
                          f"plus --resume auto", flush=True)
                return 128 + int(interrupt.signum)
            t0 = time.perf_counter()
            network.on_step_start(None, model.transformer)
            loss = train_step(cfg, model, stream, step, accelerator)
            for p in trainable:  # a module skipped by module_dropout on this rank still joins the reduce
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in trainable], world)
            loss = mean_over_ranks(loss, device, world)
            if not math.isfinite(loss):
                where = f"the last good state is {saver.last_good}" if saver.last_good else "no state was saved yet"
                raise TrainingStopped(f"loss is {loss} at step {step + 1}; stopping without saving ({where}). "
                                      f"Lower the learning rate or check the data.")
            if cfg["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(trainable, cfg["max_grad_norm"])
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            lr, dt = step_size(optimizer), time.perf_counter() - t0
            moved = _transfer_stats(model.memory)
            if main:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", **{k: f"{v:.3g}" for k, v in lr.items()}, s_step=f"{dt:.2f}")
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "loss": loss, **lr, "seconds": round(dt, 4),
                                        **({"memory": moved} if moved else {})}) + "\n")
                if tb:
                    accelerator.log({"loss": loss, **lr, **{f"memory/{k}": v for k, v in moved.items()}}, step=done)
            if cfg["save_every_n_steps"] and done % cfg["save_every_n_steps"] == 0 and done < cfg["max_train_steps"]:
                saver.state(done)
                accelerator.wait_for_everyone()
            if prompts and cfg["sample_every_n_steps"] and done % cfg["sample_every_n_steps"] == 0:
                samples(done)
            if every and done % every == 0:
                validate(done)
        bar.close()
        saver.agree("after training")
        if main:
            save_stage(cfg, plan, saver, world)
        if prompts and cfg["sample_every_n_steps"] and cfg["max_train_steps"] % cfg["sample_every_n_steps"]:
            samples(cfg["max_train_steps"])
        if every and cfg["max_train_steps"] % every:
            validate(cfg["max_train_steps"])
    return 0


# ---------------------------------------------------------------- stage 5: save

def save_stage(cfg, plan: RunPlan, saver: Saver, world: int) -> None:
    if world > 1:
        print(f"adapter identical on all {world} processes")
    final = saver.final()
    if cfg["save_every_n_steps"]:
        saver.write(cfg["max_train_steps"])  # rank 0 alone: the ranks were checked just before
    print(f"saved {final} ({len(list_states(plan.out_dir))} state(s) kept)")


def train(cfg: dict) -> int:
    """Run training; returns the process exit code (130 / 143 after a Ctrl-C / SIGTERM checkpoint). A run that
    fails before saving anything leaves no trace that would refuse the next one."""
    out_dir = Path(cfg["output_dir"])
    created = not out_dir.exists()
    try:
        return _train(cfg)
    except BaseException:
        if os.environ.get("RANK", "0") == "0":
            forget_unstarted_run(out_dir, cfg["output_name"], created)
        raise


def _train(cfg: dict) -> int:
    tb = _tensorboard(cfg)
    accelerator = _make_accelerator(cfg, Path(cfg["output_dir"]), tb)
    if not accelerator.is_main_process:  # each info line once, from rank 0; warnings and errors still show
        logging.getLogger("urae").setLevel(logging.WARNING)
    with _on_ctrl_c("during the checks; nothing was written"):
        plan = plan_stage(cfg, accelerator)
    weight_dtype = dtype_from_name(accelerator.mixed_precision)
    with _on_ctrl_c("while caching; the cache files finished so far are kept, and the next run reuses them"):
        caches, prompts = cache_stage(cfg, plan, accelerator, weight_dtype)
    if cfg["cache_only"]:
        if accelerator.is_main_process:
            print(f"caches ready: {len(caches.entries)} image(s); run again without --cache_only to train")
        return 0
    if accelerator.is_main_process:
        with atomic_path(plan.out_dir / RUN_MARKER) as tmp:
            tmp.write_text(to_toml(cfg))
    with _on_ctrl_c("while loading the model, before the first step; the caches are complete and kept"):
        transformer, vae, scheduler = load_for_training(cfg, plan, weight_dtype, sampling=bool(prompts))
        model = model_stage(cfg, plan, transformer, accelerator)
    try:
        rc = loop_stage(cfg, plan, model, caches, prompts, vae, scheduler, accelerator, tb)
    finally:
        if tb:
            accelerator.end_training()
    accelerator.wait_for_everyone()
    return rc


def _user_errors() -> tuple[type[Exception], ...]:
    """Mistakes a user can fix: one line and exit 2. Anything else is a bug and keeps its traceback."""
    from urae.adapters import AdapterError
    from urae.loading import ModelLoadError

    return ConfigError, ModelLoadError, AdapterError, TrainingStopped


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = parse(argv)
        if cfg["optimizer_type"] != "adamw8bit":  # before diffusers imports it (see urae.optional_imports)
            defer_bitsandbytes()
        return train(cfg)
    except _user_errors() as e:
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same mistake; one says so
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        if os.environ.get("RANK", "0") == "0":
            # on a line of its own: a progress bar may have been cut short mid-line
            print(f"\ninterrupted {str(e) or 'by Ctrl-C; the files finished before it are kept'}", file=sys.stderr,
                  flush=True)
        return 130
