"""Build the latent and text caches without training (also under `accelerate launch`).

    python -m urae.data --model FLUX_DIR --train_data_dir IMAGES --cache_dir CACHE [--resolution 2048]
    accelerate launch --multi_gpu --num_processes 2 -m urae.data --model FLUX_DIR --dataset_config data.toml

(`--multi_gpu` also on CPU-only machines: accelerate's `--cpu` launcher starts one process unless MPI is set up.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import torch

from urae.common import DTYPES
from urae.data.build import build_caches
from urae.data.options import DataOptions
from urae.data.status import cache_status


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m urae.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="FLUX.1 diffusers folder (vae, tokenizers, text encoders)")
    for f in fields(DataOptions):
        if f.name == "cache_only":
            continue
        if f.type in ("bool",):
            ap.add_argument(f"--{f.name}", action="store_true", default=None)
        else:
            ap.add_argument(f"--{f.name}", default=None, type=float if f.name == "real_prompt_ratio" else
                            int if f.name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps") else str)
    ap.add_argument("--t5_max_length", type=int, default=None, help="default: 512 dev, 256 schnell")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model and cache dtype (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--split_threshold", type=int, default=None, help="pixels above which the VAE encode is row-split")
    ap.add_argument("--stats_json", default=None, help="each rank writes <this>.rank<N>.json with its encode counts")
    ap.add_argument("--no_progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    try:
        _run(a)
    except (ValueError, FileNotFoundError) as e:  # ModelLoadError is a ValueError: a user's mistake, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _run(a: argparse.Namespace) -> None:
    from accelerate import PartialState

    from urae.components import load_text_encoders, load_vae
    from urae.loading import resolve_model_location

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = {f.name: getattr(a, f.name) for f in fields(DataOptions) if getattr(a, f.name, None) is not None}
    if isinstance(opts.get("resolution"), str) and opts["resolution"].isdigit():
        opts["resolution"] = int(opts["resolution"])
    options = DataOptions.from_dict(opts)
    resolve_model_location(a.model)

    # Without CUDA, cpu=True makes accelerate use gloo across the processes `accelerate launch` started.
    # A rank may wait hours at the barrier for a slower one; NCCL's default watchdog gives up after 10 minutes.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=3))
    device = state.device
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Only the models of incomplete caches are loaded (none when everything is cached).
    status = cache_status(options, a.model, dtype=dtype, t5_max_length=a.t5_max_length, accelerator=state)
    parts = load_text_encoders(a.model, dtype, device) if status.needs_text_encoders else {}
    if status.needs_vae:
        parts["vae"] = load_vae(a.model, dtype, device)

    calls = {"vae_encoder": 0, "text_encoder": 0, "text_encoder_2": 0}
    for name, mod in (("vae_encoder", getattr(parts.get("vae"), "encoder", None)),
                      ("text_encoder", parts.get("text_encoder")), ("text_encoder_2", parts.get("text_encoder_2"))):
        if mod is not None:
            mod.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    extra = {"split_threshold": a.split_threshold} if a.split_threshold else {}
    plan = build_caches(options, parts, state, status=status, progress=not a.no_progress, **extra)
    stats = {"rank": state.process_index, "processes": state.num_processes, "calls": calls, "loaded": sorted(parts),
             "latents_encoded": plan.latents.encoded, "latents_reused": plan.latents.reused,
             "latent_seconds": plan.latents.seconds,
             "texts_encoded": plan.texts.encoded, "entries": len(plan.entries), "skipped": len(plan.skipped)}
    if a.stats_json:
        Path(f"{a.stats_json}.rank{state.process_index}.json").write_text(json.dumps(stats))
    if state.is_main_process:
        print(f"caches ready: {len(plan.entries)} images, {len(plan.skipped)} skipped")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
