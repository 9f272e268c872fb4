"""flux_urae_infer.py: prompts -> 2K/4K images with URAE adapters."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from urae.config import ConfigError, Option, format_table, resolve
from urae.runtime import HighResSettings, check_resolution

log = logging.getLogger("urae")

OPTIONS = [
    Option("model", str, None, "diffusers FLUX.1 folder or hub id", aliases=("pretrained_model_name_or_path",)),
    Option("transformer", str, None, "single-file transformer checkpoint (BFL layout, e.g. flux1-dev.safetensors)"),
    Option("prompt", list, None, "a prompt (repeat for several)", repeat=True),
    Option("prompts_file", str, None, "one prompt per line (sd-scripts --w/--h/--d/--s/--l flags allowed) or JSONL"),
    Option("width", int, 4096, "image width (multiple of 16)"),
    Option("height", int, 4096, "image height (multiple of 16)"),
    Option("seed", int, 0, "seed of the first image; image i uses seed + i"),
    Option("num_images", int, 1, "images per prompt"),
    Option("steps", int, None, "denoising steps (default 28 dev, 4 schnell)"),
    Option("guidance", float, None, "guidance embedding (default 3.5 dev; ignored by schnell)"),
    Option("max_sequence_length", int, None, "T5 tokens (default 512 dev, 256 schnell)"),
    Option("output_dir", str, "outputs", "where images and images.jsonl go"),
    Option("lora", list, [], "LoRA file (repeat for several)", repeat=True),
    Option("lora_scale", list, [], "scale per --lora (one value applies to all)", repeat=True),
    Option("fuse_lora", bool, False, "merge the LoRAs into the weights instead of attaching them"),
    Option("ntk_factor", float, None, "RoPE NTK factor (default: adapter metadata, else 10 at >= 2048)"),
    Option("proportional_attention", bool, None, "proportional attention (default: on at >= 2048)"),
    Option("shift", float, None, "static timestep shift (default: the scheduler config's, 3.0 dev)"),
    Option("dynamic_shift", bool, False, "FLUX's resolution-dependent shift instead of the static one"),
    Option("offload", str, "auto", "GPU memory mode", choices=("auto", "none", "model", "sequential")),
    Option("vae_tiling", bool, None, "split the VAE decode into row chunks (exact; automatic above 2048²)"),
    Option("init_resolution", int, None, "two-stage hi-res: draft at this long side, then refine"),
    Option("init_image", str, None, "refine this image at the target size (image-to-image)"),
    Option("strength", float, 0.6, "how much the refine stage changes the draft/init image (0-1]"),
    Option("dtype", str, "auto", "weights dtype", choices=("auto", "bf16", "fp16", "fp32")),
    Option("device", str, None, "cuda, cuda:1, cpu (default: cuda if available)"),
]


def parse(argv=None) -> dict:
    cfg = resolve(OPTIONS, argv, "flux_urae_infer.py", "Generate 2K/4K images with FLUX.1 and URAE adapters.")
    if not cfg["model"]:
        raise ConfigError("give --model (a FLUX.1 folder or hub id, e.g. black-forest-labs/FLUX.1-dev)")
    return cfg


def _scales(cfg) -> list[float]:
    raw = [float(s) for s in cfg["lora_scale"]] or [1.0]
    n = len(cfg["lora"])
    if len(raw) == 1:
        return raw * n
    if len(raw) != n:
        raise ConfigError(f"{len(raw)} --lora_scale values for {n} --lora files; give one, or one per file")
    return raw


def build_requests(cfg) -> list:
    """Every image to make, validated before any model is loaded."""
    from PIL import Image

    from urae.prompts import read_prompts
    from urae.sampling import SampleRequest

    records = [{"prompt": p} for p in (cfg["prompt"] or [])]
    if cfg["prompts_file"]:
        records += read_prompts(cfg["prompts_file"])
    if not records:
        raise ConfigError("no prompts: give --prompt TEXT or --prompts_file FILE")
    init = None
    if cfg["init_image"]:
        try:
            with Image.open(cfg["init_image"]) as im:
                init = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ConfigError(f"--init_image {cfg['init_image']}: cannot read it as an image ({e})") from e
    out = []
    for i, rec in enumerate(records):
        for k in range(cfg["num_images"]):
            req = SampleRequest(
                prompt=rec["prompt"],
                width=rec.get("width", cfg["width"]),
                height=rec.get("height", cfg["height"]),
                seed=rec.get("seed", cfg["seed"] + i * cfg["num_images"]) + k,
                steps=rec.get("steps", cfg["steps"]),
                guidance=rec.get("guidance", cfg["guidance"]),
                max_sequence_length=cfg["max_sequence_length"],
                init_image=init,
                strength=cfg["strength"],
            )
            req.validate()
            out.append(req)
    if cfg["init_resolution"] is not None:
        if init is not None:
            raise ConfigError("give --init_resolution (generate a draft) or --init_image (refine this image), not both")
        check_resolution(cfg["init_resolution"], cfg["init_resolution"])
    return out


def runtime_settings(cfg, req, adapter_runtime: dict | None) -> HighResSettings:
    """Command line > adapter metadata > URAE defaults for the target size."""
    explicit = {k: cfg[k] for k in ("ntk_factor", "proportional_attention", "shift") if cfg[k] is not None}
    if cfg["dynamic_shift"]:
        explicit["dynamic_shift"] = True
    if adapter_runtime:
        keep = ("ntk_factor", "proportional_attention", "base_seq_len")
        base = {k: v for k, v in adapter_runtime.items() if k in keep}
        return HighResSettings.from_dict({**base, **explicit})
    return HighResSettings.for_resolution(req.width, req.height, **explicit)


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


def run(cfg: dict) -> list[Path]:
    from tqdm.auto import tqdm

    from urae.adapters import attach_adapters, check_adapter_file, runtime_from_metadata
    from urae.loading import load_pipeline
    from urae.outputs import append_jsonl, save_png
    from urae.sampling import fill_defaults, generate, steps_for, two_stage

    requests = build_requests(cfg)
    scales = _scales(cfg)
    metas = [check_adapter_file(p) for p in cfg["lora"]]
    adapter_runtime = next((r for r in map(runtime_from_metadata, metas) if r), None)
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe = load_pipeline(cfg["model"], cfg["transformer"], dtype=cfg["dtype"], device=None)
    networks = attach_adapters(pipe.transformer, cfg["lora"], scales, fuse=cfg["fuse_lora"])
    placement = place_pipeline(pipe, cfg["offload"], cfg["device"])
    if not cfg["fuse_lora"]:  # attached adapters are not submodules of the transformer: move them along
        for net in networks:
            net.to(pipe._execution_device)
    two = cfg["init_resolution"] is not None and requests[0].init_image is None
    total = sum(steps_for(r, pipe.transformer, two) for r in requests)
    first = fill_defaults(requests[0], pipe.transformer)
    s0 = runtime_settings(cfg, first, adapter_runtime)
    print(f"generating {len(requests)} image(s), {first.width}x{first.height}, {first.steps} steps, "
          f"guidance {first.guidance}, ntk {s0.ntk_factor}, proportional attention "
          f"{'on' if s0.proportional_attention else 'off'}, shift "
          f"{'dynamic' if s0.dynamic_shift else (s0.shift or pipe.scheduler.config.get('shift'))}, "
          f"{len(cfg['lora'])} LoRA(s){' fused' if cfg['fuse_lora'] and cfg['lora'] else ''}, on {placement}"
          f"{', two-stage from ' + str(cfg['init_resolution']) if two else ''} -> {out_dir}", flush=True)
    written = []
    bar = tqdm(total=total, unit="step", desc="generating")
    for i, req in enumerate(requests):
        req = fill_defaults(req, pipe.transformer)
        settings = runtime_settings(cfg, req, adapter_runtime)
        t0 = time.perf_counter()
        if two:
            image = two_stage(pipe, req, cfg["init_resolution"], settings, on_step=lambda: bar.update(1),
                              split_vae=cfg["vae_tiling"])
        else:
            image = generate(pipe, req, settings, on_step=lambda: bar.update(1), split_vae=cfg["vae_tiling"])
        info = {
            "prompt": req.prompt, "seed": req.seed, "width": req.width, "height": req.height, "steps": req.steps,
            "guidance": req.guidance, "model": cfg["model"], "transformer": cfg["transformer"],
            "loras": [{"file": str(f), "scale": s} for f, s in zip(cfg["lora"], scales)],
            "runtime": settings.to_dict(), "init_resolution": cfg["init_resolution"] if two else None,
            "strength": req.strength if (two or req.init_image is not None) else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        path = save_png(image, out_dir, f"{i:05d}_{req.seed}", info)
        append_jsonl(out_dir / "images.jsonl", {"file": path.name, **info})
        written.append(path)
    bar.close()
    print(f"wrote {len(written)} image(s) to {out_dir}")
    return written


def main(argv=None) -> int:
    from urae.adapters import AdapterError
    from urae.loading import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = parse(argv)
        print("settings:\n" + format_table(cfg, only_changed=True))
        run(cfg)
    except (ConfigError, ModelLoadError, AdapterError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    return 0
