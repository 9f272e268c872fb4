"""Feature models from the hub (transformers, no torchvision): found before slow work, loaded once, run in batches.

Offline without the weights is a user's situation, not a bug: one line naming the model to fetch (`EvalError`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from urae.loading import _is_offline, default_device

BATCH = 16


class EvalError(ValueError):
    """A user's mistake or a missing download: one `error:` line and exit code 2."""


def check_available(model_id: str, metric: str) -> None:
    """A local folder, or a hub id that is in the cache or can be downloaded now; before anything slow runs."""
    if Path(model_id).expanduser().is_dir():
        return
    if model_id.startswith((".", "/", "~")):
        raise EvalError(f"metric {metric}: model folder {model_id} does not exist")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return
    if _is_offline():
        raise EvalError(f"metric {metric} needs the model {model_id}, which is not in the local cache and "
                        f"HF_HUB_OFFLINE is set: fetch it once with `hf download {model_id}`")
    try:  # the small config now: a wrong name or no network shows before anything slow runs
        hf_hub_download(model_id, "config.json")
    except Exception as e:  # the hub client raises several types (offline, gated, missing repository)
        raise EvalError(f"metric {metric} needs the model {model_id}, which is not in the local cache and could "
                        f"not be fetched ({type(e).__name__}); fetch it with `hf download {model_id}` or check "
                        f"the name") from None


def _load(fn, model_id: str, metric: str):
    try:
        return fn(os.path.expanduser(model_id))
    except OSError as e:
        raise EvalError(f"metric {metric} could not load {model_id} ({str(e).splitlines()[0]}); fetch it with "
                        f"`hf download {model_id}` or check the name") from None


@functools.lru_cache(maxsize=4)
def clip(model_id: str, processor_id: str | None = None, metric: str = "clip"):
    """(model, image processor, tokenizer) of a CLIP model; PickScore keeps its processor in another repository."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = _load(CLIPModel.from_pretrained, model_id, metric).eval().to(default_device())
    proc_id = processor_id or model_id
    return (model, _load(AutoImageProcessor.from_pretrained, proc_id, metric),
            _load(AutoTokenizer.from_pretrained, proc_id, metric))


@functools.lru_cache(maxsize=2)
def dinov2(model_id: str, metric: str = "fd_dinov2"):
    from transformers import AutoImageProcessor, Dinov2Model

    model = _load(Dinov2Model.from_pretrained, model_id, metric).eval().to(default_device())
    return model, _load(AutoImageProcessor.from_pretrained, model_id, metric)


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _batches(images):
    for i in range(0, len(images), BATCH):
        yield images[i:i + BATCH]


@torch.no_grad()
def clip_image_embeds(parts, images) -> torch.Tensor:
    model, proc, _ = parts
    out = []
    for chunk in _batches(images):
        pix = proc(images=[im.convert("RGB") for im in chunk], return_tensors="pt")["pixel_values"]
        out.append(_pooled(model.get_image_features(pixel_values=pix.to(model.device, model.dtype))).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def clip_text_embeds(parts, texts) -> torch.Tensor:
    model, _, tok = parts
    out = []
    for chunk in _batches(list(texts)):
        ids = tok(chunk, padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
        out.append(_pooled(model.get_text_features(**{k: v.to(model.device) for k, v in ids.items()})).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def dinov2_features(parts, images) -> torch.Tensor:
    """The normalised class token (what FD-DINOv2 uses)."""
    model, proc = parts
    out = []
    for chunk in _batches(images):
        pix = proc(images=[im.convert("RGB") for im in chunk], return_tensors="pt")["pixel_values"]
        out.append(model(pixel_values=pix.to(model.device, model.dtype)).pooler_output.float().cpu())
    return torch.cat(out)
