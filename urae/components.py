"""Load single FLUX.1 pipeline components (the text side, or the VAE) without the rest.

Caching needs the text encoders and the VAE, training the transformer; loading the whole pipeline
(~34 GB at real size) for either wastes host RAM. Each component loads with the class the folder's
model_index.json names, as `FluxPipeline.from_pretrained` would. Weights are read memory-mapped from
safetensors (transformers and diffusers both do by default; diffusers with low_cpu_mem_usage), so
several processes on one node read them through one shared page cache and no model is built twice.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from urae.loading import ModelLoadError, _from_pretrained, parse_dtype, resolve_model_location

log = logging.getLogger("urae")

TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def _component_classes(location: str) -> dict[str, tuple[str, str]]:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(location)
    except Exception as e:  # OSError offline, ValueError for a broken model_index.json
        hint = "" if os.path.exists(location) else ("\n-> a hub id: check the id, your network and your login "
                                                    "(FLUX.1-dev is gated), or pass a local folder")
        raise ModelLoadError(f"could not read model_index.json of {location}: {e}{hint}") from e
    return {k: tuple(v) for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0]}


def load_components(model: str | os.PathLike, names, dtype=None, device=None) -> dict:
    """{name: component} for these pipeline components only, from a FLUX.1 folder or hub id."""
    location = resolve_model_location(model)
    dtype = parse_dtype(dtype, device)
    classes = _component_classes(location)
    out = {}
    for name in names:
        if name not in classes:
            raise ModelLoadError(f"{location} has no {name} (model_index.json lists {', '.join(sorted(classes))})")
        library, cls_name = classes[name]
        cls = getattr(importlib.import_module(library), cls_name)
        if name.startswith("tokenizer"):
            out[name] = _from_pretrained(cls, location, subfolder=name)
            continue
        kwargs = {"low_cpu_mem_usage": True} if library == "diffusers" else {}
        model_ = _from_pretrained(cls, location, subfolder=name, dtype=dtype, **kwargs).eval().requires_grad_(False)
        if device is not None:
            model_.to(device)
        n = sum(p.numel() for p in model_.parameters())
        log.info(f"{name}: {location}/{name} ({str(dtype).removeprefix('torch.')}, {n / 1e6:.2f} M params)")
        out[name] = model_
    return out


def load_text_encoders(model: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None) -> dict:
    """tokenizer, text_encoder (CLIP-L), tokenizer_2, text_encoder_2 (T5-XXL): what caching captions needs."""
    return load_components(model, TEXT_COMPONENTS, dtype, device)


def load_vae(model: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None):
    """The AutoencoderKL alone: what caching latents (and decoding samples) needs."""
    return load_components(model, ("vae",), dtype, device)["vae"]
