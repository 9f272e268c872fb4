"""The URAE training run: load, cache, adapt, train with the flow objective, save, sample, resume.

Multi-process through accelerate: every rank holds the frozen model and its adapter; each trains on
its share of every step's batches and the adapter gradients are averaged explicitly (all-reduce) before
each optimizer step, so every rank holds the same adapter. Randomness (batch order, timesteps, noise,
dropout) is a function of (seed, step, rank), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import math
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch

from urae.checkpoints import (
    RUN_MARKER,
    check_output_dir,
    clear_run,
    list_states,
    load_adapter_state,
    load_optimizer_state,
    prune_states,
    remove_partial_saves,
    resolve_resume,
    save_state,
    state_dir,
    truncate_log,
)
from urae.config import ConfigError, format_table, resolve, to_toml
from urae.flow import flow_loss, sample_timesteps
from urae.io import atomic_path
from urae.runtime import HighResSettings, apply_highres
from urae.train_options import DATA_KEYS, OPTIONS, check, network_kwargs

log = logging.getLogger("urae")


class TrainingStopped(RuntimeError):
    """A run that stopped on purpose (NaN loss); the message says where the last good state is."""


def parse(argv=None) -> dict:
    cfg = resolve(OPTIONS, argv, "flux_urae_train.py",
                  "URAE training for FLUX.1: `accelerate launch flux_urae_train.py --config presets/4k.toml`",
                  sections=("model", "data", "network", "runtime", "training", "optimizer", "output", "sample"))
    check(cfg)
    return cfg


class BatchStream:
    """Batch number m of this rank, for any m: epoch = m // per_rank, so resuming needs no replay."""

    def __init__(self, loader, rank: int, world: int):
        self.dataset, self.sampler, self.collate = loader.dataset, loader.batch_sampler, loader.collate_fn
        self.rank, self.world = rank, world
        self.sampler.set_epoch(0)
        total = len(list(self.sampler))
        self.per_rank = total // world  # equal counts keep the ranks in step
        if self.per_rank == 0:
            raise ValueError(f"{total} batch(es) per epoch for {world} processes: add images or lower the batch size")
        self._epoch, self._batches = None, None

    def get(self, m: int) -> dict:
        epoch, pos = divmod(m, self.per_rank)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._batches = list(self.sampler)[self.rank::self.world][: self.per_rank]
            self._epoch = epoch
        return self.collate([self.dataset[key] for key in self._batches[pos]])


def _seed_for(seed: int, micro: int, rank: int, world: int) -> int:
    return (seed * 1_000_003 + micro * world + rank) % (2**63 - 1)


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Average across ranks as reduce-to-0 then broadcast: the same traffic as an all-reduce, and every rank
    gets bit-identical values (gloo's all-reduce can round differently per rank, and adapters would drift)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.reduce(flat, dst=0)
    flat /= world
    torch.distributed.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def _any_rank(flag: bool, device, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


class _InterruptFlag:
    """Ctrl-C or SIGTERM asks for a clean stop: save a state at the end of the current step, then exit 0.

    Signals within a few seconds of the first count as the same request (under `accelerate launch` each
    worker gets the terminal's SIGINT and then the launcher's forwarded copy); a later one aborts at once.
    """

    GRACE_SECONDS = 5.0

    def __init__(self):
        self.set = False
        self._first = 0.0
        self._old: dict = {}

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.set and now - self._first > self.GRACE_SECONDS:
            raise KeyboardInterrupt
        if not self.set:
            self.set, self._first = True, now
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


def _encode_sample_prompts(cfg, pipe, device) -> list[dict]:
    from urae.prompts import read_prompts

    if not cfg["sample_prompts"]:
        return []
    out = []
    with torch.no_grad():
        for rec in read_prompts(cfg["sample_prompts"]):
            t5, pooled, _ = pipe.encode_prompt(rec["prompt"], prompt_2=None, device=device,
                                               max_sequence_length=cfg["t5_max_length"] or _t5_default(pipe))
            out.append({**rec, "embeds": (t5.cpu(), pooled.cpu())})
    return out


def _t5_default(pipe) -> int:
    from urae.sampling import model_defaults

    return model_defaults(pipe.transformer)["max_sequence_length"]


def _sample_size(cfg) -> tuple[int, int]:
    return _parse_size(cfg["sample_resolution"] or cfg["resolution"])


def make_samples(cfg, pipe_parts, prompts, step: int, out_dir: Path, network, settings, device, rank: int = 0,
                 world: int = 1) -> list[Path]:
    """This rank's share of the sample prompts (prompt k of the file is `prompts[k // world]` on rank k % world)."""
    from diffusers import FluxPipeline

    from urae.outputs import save_png
    from urae.sampling import SampleRequest, generate

    transformer, vae, scheduler = pipe_parts
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.to(device), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    w, h = _sample_size(cfg)
    was_training = network.training
    network.eval()
    paths = []
    try:
        for j, rec in enumerate(prompts):
            i = j * world + rank
            req = SampleRequest(rec["prompt"], rec.get("width", w), rec.get("height", h), rec.get("seed", cfg["seed"]),
                                steps=rec.get("steps", cfg["sample_steps"]), guidance=rec.get("guidance"))
            t5, pooled = rec["embeds"]
            img = generate(pipe, req, settings, prompt_embeds=(t5.to(device), pooled.to(device)))
            paths.append(save_png(img, out_dir / "samples", f"{step:07d}_{i:02d}",
                                  {"prompt": req.prompt, "step": step, "seed": req.seed, "width": req.width,
                                   "height": req.height, "runtime": settings.to_dict()}))
    finally:
        network.train(was_training)
        vae.to("cpu")
    return paths


def inference_settings(cfg, training: HighResSettings) -> HighResSettings:
    """What a file should be generated with: the training runtime when it was changed (the 4K recipe), else
    URAE's defaults at the trained size (the 2K recipe trains with stock RoPE but generates with NTK 10 and
    proportional attention, as the public URAE inference does)."""
    if training.ntk_factor != 1 or training.proportional_attention:
        return training
    w, h = _parse_size(cfg["resolution"])
    return HighResSettings.for_resolution(w, h)


def _parse_size(value) -> tuple[int, int]:
    from urae.data.options import parse_resolution

    return parse_resolution(value)


def _adapter_metadata(cfg, step: int) -> dict:
    recipe = {k: cfg[k] for k in ("network_dim", "network_alpha", "network_args", "base_lora", "resolution",
                                  "real_prompt_ratio", "timestep_sampling", "optimizer_type", "learning_rate",
                                  "ntk_factor", "proportional_attention",
                                  "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "seed")}
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


def train(cfg: dict) -> int:
    """Run training; returns the process exit code (0 also after a Ctrl-C checkpoint)."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from tqdm.auto import tqdm

    from urae.data import DataOptions, build_caches, make_dataloader
    from urae.loading import load_pipeline
    from urae.optim import make_optimizer, make_scheduler

    out_dir = Path(cfg["output_dir"])
    mp = _mixed_precision(cfg)
    if cfg["guidance_scale"] != 1.0:
        log.warning(f"WARNING: training with guidance_scale = {cfg['guidance_scale']} (allow_training_guidance). "
                    f"FLUX.1-dev is guidance-distilled; URAE trains with 1.0 and the result may lose quality.")
    tb = cfg["log_with"] == "tensorboard"
    if tb:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            print("warning: log_with = tensorboard, but tensorboard is not installed; logging to JSONL only")
            tb = False
    # Long single-rank phases (4K samples, uneven cache shares) outlast NCCL's default 10-minute watchdog.
    accelerator = Accelerator(mixed_precision=mp, log_with="tensorboard" if tb else None,
                              project_dir=cfg["logging_dir"] or str(out_dir / "logs"),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))])
    rank, world, device, main = (accelerator.process_index, accelerator.num_processes, accelerator.device,
                                 accelerator.is_main_process)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != world:
        # accelerate on a machine without GPUs starts the processes but treats each as alone
        raise ConfigError(f"{torch.distributed.get_world_size()} processes were launched but accelerate sees "
                          f"{world}; on a machine without GPUs launch with ACCELERATE_USE_CPU=1 "
                          f"accelerate launch --multi_gpu --num_processes N …")
    # every rank checks before any rank writes, so a slow rank never mistakes this run's files for another's
    resume_path = resolve_resume(out_dir, cfg["resume"])
    check_output_dir(out_dir, cfg["resume"] is not None, cfg["overwrite"], cfg["output_name"])
    accelerator.wait_for_everyone()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print("training config:\n" + format_table(cfg), flush=True)
        if cfg["overwrite"] and resume_path is None:
            clear_run(out_dir, cfg["output_name"])
        remove_partial_saves(out_dir)
        if cfg["demo"]:
            from urae.demo import ensure_demo_assets

            ensure_demo_assets(cfg["pretrained_model_name_or_path"], cfg["train_data_dir"])
    accelerator.wait_for_everyone()

    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    pipe = load_pipeline(cfg["pretrained_model_name_or_path"], cfg["transformer"], dtype=weight_dtype)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(device)

    # 1. caches (each rank its share), then sample-prompt embeddings, then free the text encoders
    options = DataOptions.from_dict({k: cfg[k] for k in DATA_KEYS})
    plan = build_caches(options, pipe, accelerator, t5_max_length=cfg["t5_max_length"])
    if main and plan.skipped:
        print(f"skipped {len(plan.skipped)} image(s): " + "; ".join(f"{p.name} ({why})" for p, why in plan.skipped[:5]))
    if cfg["cache_only"]:
        if main:
            print(f"caches ready: {len(plan.entries)} image(s); run again without --cache_only to train")
        return 0
    if main:
        with atomic_path(out_dir / RUN_MARKER) as tmp:
            tmp.write_text(to_toml(cfg))
    prompts = _encode_sample_prompts(cfg, pipe, device)  # every rank samples its share of them
    transformer, vae, scheduler = pipe.transformer, pipe.vae.to("cpu"), pipe.scheduler
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 2. model + adapter
    transformer.to(device).requires_grad_(False)
    if cfg["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    settings = HighResSettings(ntk_factor=cfg["ntk_factor"], proportional_attention=cfg["proportional_attention"])
    module = importlib.import_module(cfg["network_module"])
    kwargs = network_kwargs(cfg)
    kwargs.setdefault("runtime", json.dumps(inference_settings(cfg, settings).to_dict()))
    network = module.create_network(1.0, cfg["network_dim"], cfg["network_alpha"], None, [], transformer, **kwargs)
    network.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
    if resume_path is not None:  # the saved factors and frozen copies make the SVD unnecessary
        load_adapter_state(resume_path, network)
    network.prepare_grad_etc(None, transformer)  # minor/major SVD (shared across ranks) unless resumed
    network.to(device)
    params = network.prepare_optimizer_params(None, cfg["learning_rate"], cfg["learning_rate"])
    if isinstance(params, tuple):
        params = params[0]
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg["optimizer_type"], params, cfg["learning_rate"], cfg["optimizer_args"])
    lr_sched = make_scheduler(cfg["lr_scheduler"], optimizer, cfg["lr_warmup_steps"], cfg["max_train_steps"])

    start = 0
    if resume_path is not None:
        state = load_optimizer_state(resume_path, optimizer, lr_sched)
        start = int(state["step"])
        if main:
            truncate_log(out_dir / "train_log.jsonl", start)
            print(f"resumed from {resume_path} at step {start}")
    elif cfg["resume"] == "auto" and main:
        print(f"resume auto: no saved state in {out_dir}; starting at step 0")

    loader = make_dataloader(plan, batch_size=cfg["train_batch_size"], seed=cfg["seed"])
    stream = BatchStream(loader, rank, world)
    accum = cfg["gradient_accumulation_steps"]
    n_trainable = sum(p.numel() for p in trainable)
    if main:
        print(f"training {cfg['max_train_steps'] - start} step(s) (from {start}) on {world} process(es), "
              f"batch {cfg['train_batch_size']} x {accum} accumulation x {world} = "
              f"{cfg['train_batch_size'] * accum * world} per step, {len(plan.entries)} image(s), "
              f"{n_trainable / 1e6:.2f} M trainable, {cfg['optimizer_type']} lr {cfg['learning_rate']}, "
              f"ntk {settings.ntk_factor}, proportional attention {'on' if settings.proportional_attention else 'off'}, "
              f"guidance {cfg['guidance_scale']}, {mp if mp != 'no' else 'fp32'} on {device}", flush=True)
    if tb:
        accelerator.init_trackers("urae", config={k: v for k, v in cfg.items()
                                                  if not k.startswith("_") and isinstance(v, (int, float, str, bool))})
    log_path = out_dir / "train_log.jsonl"
    parts = (transformer, vae, scheduler)
    network.train()
    bar = tqdm(total=cfg["max_train_steps"], initial=start, disable=not main, unit="step", desc="training",
               dynamic_ncols=True)
    ema = None
    last_saved = resume_path
    with contextlib.ExitStack() as stack:
        stack.enter_context(apply_highres(transformer, settings))
        interrupt = stack.enter_context(_InterruptFlag())
        if cfg["sample_at_first"] and prompts and start == 0:
            make_samples(cfg, parts, prompts[rank::world], 0, out_dir, network, settings, device, rank, world)
            accelerator.wait_for_everyone()
        for step in range(start, cfg["max_train_steps"]):
            if _any_rank(interrupt.set, device, world):
                if main:
                    path = save_state(out_dir, step, network, optimizer, lr_sched, {"seed": cfg["seed"]},
                                      _adapter_metadata(cfg, step))
                    print(f"stopped at step {step}; state saved to {path}\nresume with the same command plus "
                          f"--resume auto")
                if tb:
                    accelerator.end_training()
                return 0
            t0 = time.perf_counter()
            network.on_step_start(None, transformer)
            total = 0.0
            for micro in range(accum):
                m = step * accum + micro
                batch = stream.get(m)
                gen = torch.Generator().manual_seed(_seed_for(cfg["seed"], m, rank, world))
                torch.manual_seed(_seed_for(cfg["seed"] + 1, m, rank, world))  # adapter dropout
                x0 = batch["latents"].to(device, torch.float32)
                t = sample_timesteps(x0.shape[0], cfg["timestep_sampling"], gen, sigmoid_scale=cfg["sigmoid_scale"],
                                     shift=cfg["discrete_flow_shift"])
                noise = torch.randn(x0.shape, generator=gen).to(device)
                with accelerator.autocast():
                    loss = flow_loss(transformer, x0, batch["t5_embeds"].to(device), batch["clip_pooled"].to(device),
                                     t.to(device), noise, guidance=cfg["guidance_scale"])
                (loss / accum).backward()
                total += loss.detach().float().item() / accum
            for p in trainable:  # a module skipped by module_dropout on this rank still joins the reduce
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _all_reduce_mean([p.grad for p in trainable], world)
            loss_t = torch.tensor([total], device=device)
            if world > 1:
                torch.distributed.all_reduce(loss_t)
                loss_t /= world
            loss_v = loss_t.item()
            if not math.isfinite(loss_v):
                where = f"the last good state is {last_saved}" if last_saved else "no state was saved yet"
                raise TrainingStopped(f"loss is {loss_v} at step {step + 1}; stopping without saving ({where}). "
                                      f"Lower the learning rate or check the data.")
            if cfg["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(trainable, cfg["max_grad_norm"])
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            ema = loss_v if ema is None else 0.9 * ema + 0.1 * loss_v
            lr = _current_lr(optimizer)
            dt = time.perf_counter() - t0
            if main:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.3g}", s_step=f"{dt:.2f}")
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "loss": loss_v, "lr": lr, "seconds": round(dt, 4)}) + "\n")
                if tb:
                    accelerator.log({"loss": loss_v, "lr": lr}, step=done)
            if cfg["save_every_n_steps"] and done % cfg["save_every_n_steps"] == 0 and done < cfg["max_train_steps"]:
                if main:
                    save_state(out_dir, done, network, optimizer, lr_sched, {"seed": cfg["seed"]},
                               _adapter_metadata(cfg, done))
                    prune_states(out_dir, done, cfg["save_last_n_steps"])
                last_saved = state_dir(out_dir, done)
                accelerator.wait_for_everyone()
            if prompts and cfg["sample_every_n_steps"] and done % cfg["sample_every_n_steps"] == 0:
                make_samples(cfg, parts, prompts[rank::world], done, out_dir, network, settings, device, rank, world)
                accelerator.wait_for_everyone()
        bar.close()
        if not _ranks_agree(trainable, device, world):
            raise TrainingStopped("the adapters differ between processes after training; this is a bug, please "
                                  "report it with your accelerate config")
        if main:
            if world > 1:
                print(f"adapter identical on all {world} processes")
            final = out_dir / f"{cfg['output_name']}.safetensors"
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["save_precision"], torch.float32)
            network.save_weights(str(final), dtype, _adapter_metadata(cfg, cfg["max_train_steps"]))
            if cfg["save_every_n_steps"]:
                save_state(out_dir, cfg["max_train_steps"], network, optimizer, lr_sched, {"seed": cfg["seed"]},
                           _adapter_metadata(cfg, cfg["max_train_steps"]))
                prune_states(out_dir, cfg["max_train_steps"], cfg["save_last_n_steps"])
            print(f"saved {final} ({len(list_states(out_dir))} state(s) kept)")
        if prompts and cfg["sample_every_n_steps"] and cfg["max_train_steps"] % cfg["sample_every_n_steps"]:
            make_samples(cfg, parts, prompts[rank::world], cfg["max_train_steps"], out_dir, network, settings, device,
                         rank, world)
    if tb:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return 0


def _ranks_agree(params: list[torch.Tensor], device, world: int) -> bool:
    """Every rank must hold the same adapter after training; compare a checksum across ranks."""
    if world == 1:
        return True
    c = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params])
    c = c.reshape(-1).to(device)
    hi, lo = c.clone(), c.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def _current_lr(optimizer) -> float:
    g = optimizer.param_groups[0]
    # Prodigy's effective step size is d * lr
    return float(g["lr"]) * float(g.get("d", 1.0))


def main(argv=None) -> int:
    from urae.adapters import AdapterError
    from urae.loading import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return train(parse(argv))
    except (ConfigError, ModelLoadError, AdapterError, FileNotFoundError, FileExistsError, TrainingStopped,
            ValueError) as e:
        print(f"error: {e}", flush=True)
        return 1
