"""Cheap fingerprints that tell whether a cache was made from the same model / the same file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

_EDGE = 1024  # values hashed from each end of every tensor


def _config_dict(module) -> dict:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    # Paths and library versions do not change what the model computes.
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}


def module_fingerprint(module, extra: str = "") -> str:
    """Class, config, and every tensor's name, shape, dtype and first/last values.

    Reading all weights of T5-XXL (9.5 GB) would take seconds and a GPU->CPU copy; the edge values of
    every tensor change with any fine-tune or re-quantisation, which is what the cache has to notice.
    """
    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
    h.update(extra.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        edge = torch.cat([flat[:_EDGE], flat[-_EDGE:]]) if flat.numel() > 2 * _EDGE else flat
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(edge.to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    h.update(f"{type(tok).__name__}:{len(tok)}:{getattr(tok, 'model_max_length', '')}".encode())
    probe = "a photo of a cat, 4k, detailed; ünïcode ✓"
    h.update(json.dumps(tok(probe)["input_ids"]).encode())
    return h.hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Size plus a hash of the first and last 64 KiB: survives copies (unlike mtime), cheap on 4K images."""
    size = path.stat().st_size
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(65536))
        if size > 65536:
            f.seek(max(65536, size - 65536))
            h.update(f.read(65536))
    return f"{size}:{h.hexdigest()[:16]}"
