"""Cheap fingerprints that tell whether a cache was made from the same model / the same file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

_EDGE = 1024  # values hashed from each end of every tensor
_BLOCK = 65536  # bytes hashed per sampled file block


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


def file_fingerprint(path: Path, samples: int = 0) -> str:
    """Size plus a hash of the first and last 64 KiB: survives copies (unlike mtime), cheap on 4K images.

    samples: also hash that many 64 KiB blocks spread evenly between the ends. Model weight files use
    it, since a fine-tune may leave both ends of a multi-GB file unchanged.
    """
    size = path.stat().st_size
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(_BLOCK))
        for i in range(1, samples + 1) if size > 2 * _BLOCK else ():
            f.seek(_BLOCK + (size - 2 * _BLOCK) * i // (samples + 1))
            h.update(f.read(_BLOCK))
        if size > _BLOCK:
            f.seek(max(_BLOCK, size - _BLOCK))
            h.update(f.read(_BLOCK))
    return f"{size}:{h.hexdigest()[:16]}"


def folder_fingerprint(folder: Path, samples: int = 16) -> str:
    """Every file under `folder` (hidden ones skipped): relative name, size, sampled hash. No model is loaded."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}:{file_fingerprint(p, samples)}".encode() + b"\0")
    return h.hexdigest()[:24]
