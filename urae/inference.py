"""flux_urae_infer.py: prompts -> 2K/4K images with URAE adapters."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from urae import speed
from urae.config import ConfigError, Option, check_ranges, format_table, resolve
from urae.rope import SCHEMES, TABLE_SCHEMES
from urae.runtime import ROPE_KEYS, HighResSettings, check_resolution

log = logging.getLogger("urae")

OPTIONS = [
    Option("model", str, None, "diffusers FLUX.1 folder or hub id", aliases=("pretrained_model_name_or_path",)),
    Option("transformer", str, None, "single-file transformer checkpoint (BFL layout, e.g. flux1-dev.safetensors)"),
    Option("prompt", list, None, "a prompt (repeat for several)", repeat=True),
    Option("prompts_file", str, None, "one prompt per line with sd-scripts' flags (--w --h --d --s, --g embedded "
           "guidance, --l CFG scale, --n negative prompt), or JSONL; a line's value wins over the flag below"),
    Option("width", int, 4096, "image width, multiple of 16 (a prompt line's --w wins)"),
    Option("height", int, 4096, "image height, multiple of 16 (a prompt line's --h wins)"),
    Option("seed", int, 0, "seed of the first image; image i uses seed + i"),
    Option("num_images", int, 1, "images per prompt"),
    Option("steps", int, None, "denoising steps (default 28 dev, 4 schnell)"),
    Option("guidance", float, None, "FLUX's embedded guidance, sd-scripts' --g (default 3.5 dev; ignored by schnell)"),
    Option("cfg_scale", float, 1.0, "true classifier-free guidance, sd-scripts' --l (1 = off; > 1 runs the model "
           "twice per step)"),
    Option("negative_prompt", str, None, "negative prompt for cfg_scale > 1, sd-scripts' --n (default empty)"),
    Option("max_sequence_length", int, None, "T5 tokens (default 512 dev, 256 schnell)"),
    Option("output_dir", str, "outputs", "where images and images.jsonl go"),
    Option("lora", list, [], "LoRA file, or a hub file owner/repo/file.safetensors (repeat for several)",
           repeat=True),
    Option("lora_scale", list, [], "scale per --lora (one value applies to all)", repeat=True),
    Option("fuse_lora", bool, False, "merge the LoRAs into the weights instead of attaching them"),
    Option("rope", str, None, "position scheme: ntk (URAE's), yarn, dype-yarn, dype-ntk (DyPE: patent pending for "
           "commercial use), none (default: the adapter's, else ntk); see docs/runtime.md", choices=SCHEMES),
    Option("rope_base_resolution", int, None, "yarn/dype: the size the model was trained at (default 1024)"),
    Option("dype_lambda", float, None, "dype: strength sigma^lambda over the steps (default 2)"),
    Option("ntk_factor", float, None, "RoPE NTK factor (default: adapter metadata, else 10 at >= 2048)"),
    Option("proportional_attention", bool, None, "proportional attention (default: on at >= 2048)"),
    Option("shift", float, None, "static timestep shift (default: the scheduler config's, 3.0 dev)"),
    Option("dynamic_shift", bool, False, "FLUX's resolution-dependent shift instead of the static one"),
    Option("offload", str, "auto", "GPU memory mode", choices=("auto", "none", "model", "sequential")),
    Option("fp8", bool, False, "store the transformer blocks' weights as float8 e4m3, upcast per layer (as training's "
           "fp8_base; FLUX.1-dev: 11.1 instead of 22.2 GiB, so 4096² fits a 24 GB GPU); values change by fp8 "
           "rounding; the line after loading says what it stored"),
    Option("vae_tiling", bool, None, "split the VAE decode into row chunks (exact; automatic above 2048²)"),
    Option("init_resolution", int, None, "two-stage hi-res: draft at this long side, then refine"),
    Option("init_image", str, None, "refine this image at the target size (image-to-image)"),
    Option("strength", float, 0.6, "how much the refine stage changes the draft/init image (0-1]"),
    Option("dtype", str, "auto", "weights dtype", choices=("auto", "bf16", "fp16", "fp32")),
    Option("device", str, None, "cuda, cuda:1, cpu (default: cuda if available)"),
    *speed.OPTIONS,
]


# Numbers checked before anything loads (sizes, --shift, --cfg_scale: where the requests are built).
RANGES = {**{k: (1, True, None) for k in ("num_images", "steps", "max_sequence_length")},
          **{k: (0, True, None) for k in ("guidance", "seed")}, "ntk_factor": (0, False, None)}


def parse(argv=None) -> dict:
    cfg = resolve(OPTIONS, argv, "flux_urae_infer.py", "Generate 2K/4K images with FLUX.1 and URAE adapters.")
    if not cfg["model"]:
        raise ConfigError("give --model (a FLUX.1 folder or hub id, e.g. black-forest-labs/FLUX.1-dev)")
    check_ranges(cfg, RANGES, prefix="--")
    if not 0 < cfg["strength"] <= 1:  # used by --init_resolution / --init_image, after the model has loaded
        raise ConfigError(f"--strength must be in (0, 1] (the share of the steps the refine stage runs), "
                          f"got {cfg['strength']}")
    return cfg


def _scales(cfg) -> list[float]:
    try:
        raw = [float(s) for s in cfg["lora_scale"]] or [1.0]
    except ValueError:
        raise ConfigError(f"--lora_scale {cfg['lora_scale']}: each value must be a number") from None
    n = len(cfg["lora"])
    if len(raw) == 1:
        return raw * n
    if len(raw) != n:
        raise ConfigError(f"{len(raw)} --lora_scale values for {n} --lora files; give one, or one per file")
    return raw


def build_requests(cfg) -> tuple[list, list[str]]:
    """Every image to make, validated before any model is loaded, and the plan lines that describe them.

    A prompt line's own values (sd-scripts' --w/--h/--d/--s/--g/--l/--n) win over the command line's,
    as in sd-scripts: a line that says its size means it. The plan says where each size came from.
    """
    from PIL import Image

    from urae.prompts import read_prompts
    from urae.sampling import SampleRequest

    records = [{"prompt": p} for p in (cfg["prompt"] or [])]
    if cfg["prompts_file"]:
        try:
            records += read_prompts(cfg["prompts_file"])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from e
    if not records:
        raise ConfigError("no prompts: give --prompt TEXT or --prompts_file FILE")
    init = None
    if cfg["init_image"]:
        try:
            with Image.open(cfg["init_image"]) as im:
                init = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ConfigError(f"--init_image {cfg['init_image']}: cannot read it as an image ({e})") from e
    if cfg["init_resolution"] is not None and init is not None:
        raise ConfigError("give --init_resolution (generate a draft) or --init_image (refine this image), not both")
    out, sizes = [], Counter()
    for i, rec in enumerate(records):
        from_line = "width" in rec or "height" in rec
        for k in range(cfg["num_images"]):
            req = SampleRequest(
                prompt=rec["prompt"],
                width=rec.get("width", cfg["width"]),
                height=rec.get("height", cfg["height"]),
                seed=rec.get("seed", cfg["seed"] + i * cfg["num_images"]) + k,
                steps=rec.get("steps", cfg["steps"]),
                guidance=rec.get("guidance", cfg["guidance"]),
                cfg_scale=rec.get("cfg_scale", cfg["cfg_scale"]),
                negative_prompt=rec.get("negative_prompt", cfg["negative_prompt"]),
                max_sequence_length=cfg["max_sequence_length"],
                init_image=init,
                strength=cfg["strength"],
            )
            where = f"prompt {i + 1} ({'its --w/--h' if from_line else '--width/--height'})"
            try:
                req.validate()
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from e
            if cfg["init_resolution"] is not None:
                _check_two_stage(cfg["init_resolution"], req, where)
            sizes[(req.width, req.height, from_line)] += 1
            out.append(req)
    plan = [f"size {w}x{h}: {n} image(s), from " + ("the prompts file's --w/--h (a line's size wins over "
                                                   "--width/--height)" if line else "--width/--height")
            for (w, h, line), n in sizes.items()]
    cfgs = sorted({r.cfg_scale for r in out if r.cfg_scale > 1})
    if cfgs:
        plan.append(f"true CFG at scale {', '.join(map(str, cfgs))} for {sum(r.cfg_scale > 1 for r in out)} "
                    f"image(s): two model passes per step (negative prompt: --n / --negative_prompt, else empty)")
    return out, plan


def _check_two_stage(init_resolution: int, req, where: str) -> None:
    """A two-stage run drafts smaller, then refines at the target size; a draft as large as the target is a mistake."""
    from urae.sampling import draft_size

    try:
        check_resolution(init_resolution, init_resolution)
    except ValueError as e:
        raise ConfigError(f"--init_resolution: {e}") from e
    w, h = draft_size(req.width, req.height, init_resolution)
    if w >= req.width or h >= req.height:
        raise ConfigError(f"--init_resolution {init_resolution} gives a {w}x{h} draft, not smaller than the "
                          f"{req.width}x{req.height} target of {where}; use an --init_resolution below "
                          f"{max(req.width, req.height)}, or drop it for a single-stage run")


def runtime_settings(cfg, req, adapter_runtime: dict | None) -> HighResSettings:
    """Command line > adapter metadata > URAE defaults for the target size."""
    explicit = {k: cfg[k] for k in ("ntk_factor", "proportional_attention", "shift", "rope", "rope_base_resolution",
                                    "dype_lambda") if cfg.get(k) is not None}
    if cfg["dynamic_shift"]:
        explicit["dynamic_shift"] = True
    settings = _runtime_settings(explicit, req, adapter_runtime)
    if (cfg.get("context_parallel") or 1) > 1 and settings.rope in TABLE_SCHEMES:
        # diffusers splits img_ids across the processes, and these schemes take each axis's scale from the
        # largest position a process sees
        raise ConfigError(f"--context_parallel with rope = {settings.rope}: each process would see only part of the "
                          f"rows and scale them wrongly; use one process, or --rope ntk / none")
    return settings


def _runtime_settings(explicit: dict, req, adapter_runtime: dict | None) -> HighResSettings:
    try:
        if adapter_runtime:
            keep = ("ntk_factor", "proportional_attention", "base_seq_len", *ROPE_KEYS)
            base = {k: v for k, v in adapter_runtime.items() if k in keep}
            if explicit.get("rope", base.get("rope", "ntk")) != base.get("rope", "ntk"):
                base.pop("ntk_factor", None)  # another scheme than the file's: its NTK factor does not apply
            return HighResSettings.from_dict({**base, **explicit})
        return HighResSettings.for_resolution(req.width, req.height, **explicit)
    except ValueError as e:
        raise ConfigError(str(e)) from e



def rope_plan(settings: HighResSettings, cfg, adapter_runtime: dict | None) -> str:
    """The plan's position-scheme line: which scheme, and where it came from."""
    src = ("--rope" if cfg.get("rope") else "the adapter's metadata" if adapter_runtime and "rope" in adapter_runtime
           else "the default")
    return f"position scheme: {settings.describe_rope()} (from {src})"


def memory_plan(cfg, requests, dtype: torch.dtype) -> str:
    """The plan's GPU memory line: the expected peak of a denoising step at the largest size, at FLUX.1-dev's
    size (the model itself is not loaded yet), in the dtype the run will use."""
    from urae.common import human_bytes
    from urae.memory.generation import denoise_peak_bytes, forward_work_bytes, transformer_bytes

    big = max(requests, key=lambda r: r.width * r.height)
    size = torch.empty((), dtype=dtype).element_size()
    name = str(dtype).replace("torch.", "")
    return (f"memory (expected for FLUX.1-dev on the GPU): {name} transformer"
            f"{', blocks stored as fp8' if cfg['fp8'] else ''} {human_bytes(transformer_bytes(cfg['fp8'], size))} + "
            f"{human_bytes(forward_work_bytes(big.width, big.height, param_bytes=size))} activations at "
            f"{big.width}x{big.height}: peak while denoising "
            f"{human_bytes(denoise_peak_bytes(big.width, big.height, cfg['fp8'], size))} "
            f"(text encoders offloaded, plus the CUDA context)")


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def loaded_line(cfg, transformer, before: int, fp8_linears: int, placement: str) -> str:
    """What was actually loaded, in which dtype, and what --fp8 did to it, after loading."""
    from urae.common import human_bytes, human_count

    n = sum(p.numel() for p in transformer.parameters())
    dtype = str(transformer.dtype).replace("torch.", "")
    line = f"loaded: transformer of {cfg['transformer'] or cfg['model']}, {human_count(n)} parameters in {dtype}"
    if cfg["fp8"]:
        line += (f"; --fp8 stored {fp8_linears} block Linear weights as float8 e4m3 on {placement}: "
                 f"{human_bytes(before)} -> {human_bytes(module_bytes(transformer))} (upcast to {dtype} per layer)")
    else:
        line += f", {human_bytes(before)}, on {placement}"
    return line


def apply_fp8(transformer) -> int:
    """float8 storage of the blocks' Linear weights, after the LoRAs are attached or fused (their change is
    computed from the full-precision weights); returns how many Linear layers it stores so."""
    from urae.memory import transformer_blocks
    from urae.memory.fp8 import Fp8Storage

    return len(Fp8Storage(transformer_blocks(transformer), next(transformer.parameters()).dtype).linears)


def place_pipeline(pipe, mode: str, device) -> str:
    """Move to the device, or offload when asked / when the model does not fit the GPU."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        pipe.to(device)
        return f"{device} (no offload)"
    if mode == "auto":
        need = sum(p.numel() * p.element_size() for m in pipe.components.values()
                   if isinstance(m, torch.nn.Module) for p in m.parameters())
        free, _ = torch.cuda.mem_get_info(device)
        mode = "none" if need * 1.3 < free else "model"
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return f"{device} (offload: {mode})"


def _check_device(name: str | None) -> None:
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")


class Interrupted(Exception):
    """Ctrl-C: the message says how far the run got and what of it is kept."""


def _report_ctrl_c(progress):
    """From now on Ctrl-C stops with `progress()` (how far the run got) instead of a traceback; every image is
    written whole as soon as it is finished, so what is done is kept. Returns the handler to put back (`run` does
    when it finishes, `main` also after an error)."""
    def stop(signum, frame):
        raise Interrupted(progress())

    if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
        return signal.signal(signal.SIGINT, stop)
    return None


def run(cfg: dict) -> list[Path]:
    from tqdm.auto import tqdm

    from urae.adapters import (
        attach_adapters,
        check_adapter_file,
        check_adapter_fits,
        resolve_lora_file,
        runtime_from_metadata,
    )
    from urae.loading import default_device, load_pipeline, parse_dtype, resolve_model_location
    from urae.outputs import append_jsonl, image_stem, next_index, save_png
    from urae.sampling import fill_defaults, generate, steps_for, two_stage

    # everything that needs no model first: prompts, sizes, files, output folder
    requests, plan = build_requests(cfg)
    scales = _scales(cfg)
    _check_device(cfg["device"])
    loras = [resolve_lora_file(p) for p in cfg["lora"]]
    metas = [check_adapter_file(p) for p in loras]
    adapter_runtime = next((r for r in map(runtime_from_metadata, metas) if r), None)
    # bad runtime settings (--shift -1, …) are found now, not after loading
    proportional = any([runtime_settings(cfg, r, adapter_runtime).proportional_attention for r in requests])
    plan.append(rope_plan(runtime_settings(cfg, requests[0], adapter_runtime), cfg, adapter_runtime))
    out_dir = Path(cfg["output_dir"])
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output_dir {out_dir} is a file, not a folder")
    location = resolve_model_location(cfg["model"])  # a mistyped folder or an offline hub id, before anything loads
    if loras:  # a LoRA for another architecture or width, from the config alone
        from urae.train_plan import transformer_config

        model_config = transformer_config(location)
        for path in loras:
            check_adapter_fits(path, model_config)
    if cfg["fp8"]:
        from urae.memory.options import float8_problem

        why = float8_problem(cfg["device"] or default_device())
        if why:
            raise ConfigError(f"--fp8: this device cannot store float8 weights ({why}); leave --fp8 off")
    device = torch.device(cfg["device"]) if cfg["device"] else default_device()
    dtype = parse_dtype(cfg["dtype"], device)
    two = cfg["init_resolution"] is not None and requests[0].init_image is None
    fast = speed.plan(cfg, requests, proportional, two)
    speed.start(fast)
    # GPU figures mean nothing for a CPU run; after loading, the line below says what the model really takes
    for line in [*plan, *([memory_plan(cfg, requests, dtype)] if device.type == "cuda" else []), *fast.lines]:
        print(line, flush=True)

    pipe = load_pipeline(cfg["model"], cfg["transformer"], dtype=dtype, device=None)
    networks = attach_adapters(pipe.transformer, loras, scales, fuse=cfg["fuse_lora"])
    before = module_bytes(pipe.transformer)
    fp8_linears = apply_fp8(pipe.transformer) if cfg["fp8"] else 0
    placement = place_pipeline(pipe, fast.offload or cfg["offload"], fast.device or cfg["device"])
    print(loaded_line(cfg, pipe.transformer, before, fp8_linears, placement), flush=True)
    if not cfg["fuse_lora"]:  # attached adapters are not submodules of the transformer: move them along
        for net in networks:
            net.to(pipe._execution_device)
    total = sum(steps_for(r, pipe.transformer, two) for r in requests)
    first = fill_defaults(requests[0], pipe.transformer)
    counter = speed.apply(pipe, fast, first.steps)
    s0 = runtime_settings(cfg, first, adapter_runtime).with_scheduler_shift(pipe.scheduler)
    print(f"generating {len(requests)} image(s), first {first.width}x{first.height}, {first.steps} steps, "
          f"guidance {first.guidance}{f', CFG {first.cfg_scale}' if first.cfg_scale > 1 else ''}, "
          f"rope {s0.describe_rope()}, proportional attention {'on' if s0.proportional_attention else 'off'}, "
          f"shift {'dynamic' if s0.dynamic_shift else s0.shift}, "
          f"{len(loras)} LoRA(s){' fused' if cfg['fuse_lora'] and loras else ''}, on {placement}"
          f"{', two-stage from ' + str(cfg['init_resolution']) if two else ''} -> {out_dir}", flush=True)
    if fast.writes:
        out_dir.mkdir(parents=True, exist_ok=True)
    first_index = next_index(out_dir)
    written = []
    on_ctrl_c = _report_ctrl_c(lambda: f"after {len(written)} of {len(requests)} image(s); " + (
        f"the {len(written)} finished are kept in {out_dir}" if written else "nothing was written"))
    bar = tqdm(total=total, unit="step", desc="generating", disable=not fast.writes)
    for i, req in enumerate(requests):
        req = fill_defaults(req, pipe.transformer)
        settings = runtime_settings(cfg, req, adapter_runtime).with_scheduler_shift(pipe.scheduler)
        t0 = time.perf_counter()
        if counter:
            counter.start_image()
        if two:
            image = two_stage(pipe, req, cfg["init_resolution"], settings, on_step=lambda: bar.update(1),
                              split_vae=cfg["vae_tiling"])
        else:
            image = generate(pipe, req, settings, on_step=lambda: bar.update(1), split_vae=cfg["vae_tiling"])
        info = {
            "prompt": req.prompt, "seed": req.seed, "width": req.width, "height": req.height, "steps": req.steps,
            "guidance": req.guidance, "cfg_scale": req.cfg_scale,
            "negative_prompt": (req.negative_prompt or "") if req.cfg_scale > 1 else None,
            "model": cfg["model"], "transformer": cfg["transformer"],
            "loras": [{"file": str(f), "scale": s} for f, s in zip(cfg["lora"], scales)],
            "runtime": settings.to_dict(), "init_resolution": cfg["init_resolution"] if two else None,
            "strength": req.strength if (two or req.init_image is not None) else None,
            "seconds": round(time.perf_counter() - t0, 2),
            **speed_record(fast, counter),
        }
        if not fast.writes:
            continue
        path = save_png(image, out_dir, image_stem(first_index + i, req.seed, req.width, req.height), info)
        append_jsonl(out_dir / "images.jsonl", {"file": path.name, **info})
        written.append(path)
    bar.close()
    if on_ctrl_c is not None:
        signal.signal(signal.SIGINT, on_ctrl_c)
    speed.finish(fast)
    print(f"wrote {len(written)} image(s) to {out_dir}")
    return written


def speed_record(fast, counter) -> dict:
    """The speed options an image was made with; a cached image says it is approximate and how many passes the
    cache answered."""
    rec = fast.record()
    if not rec:
        return {}
    if counter:
        rec["cached_passes"] = f"{counter.reused} of {counter.passes}"
        return {"approximate": fast.label(), "speed": rec}
    return {"speed": rec}


def main(argv=None) -> int:
    """A user's mistake (config, model path, LoRA file, hub download) is one `error:` line and exit code 2;
    anything else is a bug and keeps its traceback."""
    from urae.adapters import AdapterError
    from urae.loading import ModelLoadError
    from urae.logs import setup_logging
    from urae.optional_imports import defer_bitsandbytes, quantised_with_bitsandbytes

    setup_logging()
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        cfg = parse(argv)
        if not quantised_with_bitsandbytes(cfg["model"]):  # before diffusers imports it (urae.optional_imports)
            defer_bitsandbytes()
        print("settings:\n" + format_table(cfg, only_changed=True))
        run(cfg)
    except (ConfigError, ModelLoadError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)  # as the training command
        return 2
    except (Interrupted, KeyboardInterrupt) as e:  # on a line of its own: a progress bar may be cut mid-line
        print(f"\ninterrupted {str(e) or 'before the first image; nothing was written'}", file=sys.stderr, flush=True)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_ctrl_c)
    return 0
