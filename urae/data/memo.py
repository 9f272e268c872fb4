"""Model identities without loading the models: a memo from the model files on disk to the identity
the loaded models had.

The cache file names and checks use identities computed from loaded weights (`TextEncoders.identity`,
the VAE's `module_fingerprint`); loading T5-XXL just to learn its identity costs ~10 GB of host RAM.
Every time the models are loaded for caching, the identity is recorded here under a key made of the
component folders' files (name, size, sampled hash: `folder_fingerprint`), the dtype they were loaded
in, and (texts) the T5 max length. A later run with the same files looks the identity up instead.
Any change to the files gives another key, hence "unknown", and the models load as before.

The memo is `model_identities.json` in each cache root; it holds at most `MAX_ENTRIES` keys per kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from urae.data.identity import folder_fingerprint
from urae.io import atomic_path

logger = logging.getLogger(__name__)

MEMO_NAME = "model_identities.json"
MEMO_FORMAT = "urae-identity-memo-v1"
MAX_ENTRIES = 32
TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
VAE_PARTS = ("vae",)


def local_model_folder(location: str | os.PathLike | None) -> Path | None:
    """The folder holding a model: a local path as is, a hub id's cached snapshot (never downloaded), else None."""
    if location is None:
        return None
    p = Path(str(location)).expanduser()
    if p.is_dir():
        return p
    s = str(location)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, local_files_only=True))
    except Exception:  # not in the local hub cache (or a malformed id): identity unknown, the models must load
        return None


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def disk_key(folder: Path | None, parts: tuple[str, ...], dtypes: tuple[torch.dtype, ...], extra: str = "") -> str | None:
    """Key of these component subfolders as loaded in `dtypes`; None when a subfolder is missing or empty."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for part in parts:
        sub = folder / part
        if not sub.is_dir() or not any(sub.iterdir()):
            return None
        h.update(f"{part}:{folder_fingerprint(sub)}".encode() + b"\0")
    h.update(",".join(_dtype_name(d) for d in dtypes).encode() + b"\0" + extra.encode())
    return h.hexdigest()[:32]


def text_key(folder: Path | None, clip_dtype: torch.dtype, t5_dtype: torch.dtype, t5_max_length: int) -> str | None:
    return disk_key(folder, TEXT_PARTS, (clip_dtype, t5_dtype), f"t5_max_length={t5_max_length}")


def vae_key(folder: Path | None, dtype: torch.dtype) -> str | None:
    return disk_key(folder, VAE_PARTS, (dtype,))


def _read(root: Path) -> dict:
    try:
        data = json.loads((root / MEMO_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("format") == MEMO_FORMAT else {}


def lookup(roots, kind: str, key: str | None) -> str | None:
    """The identity recorded for (kind, key) in any of the cache roots, or None."""
    if key is None:
        return None
    for root in roots:
        found = _read(Path(root)).get(kind, {}).get(key)
        if isinstance(found, str):
            return found
    return None


def record(roots, kind: str, key: str | None, identity: str) -> None:
    """Remember identity for (kind, key) in every cache root (atomic rewrite; the newest entries are kept)."""
    if key is None:
        return
    for root in roots:
        root = Path(root)
        entries = _read(root)
        if entries.get(kind, {}).get(key) == identity:
            continue
        per_kind = {k: v for k, v in entries.get(kind, {}).items() if k != key}
        per_kind[key] = identity  # dicts keep insertion order: the newest key last
        entries[kind] = dict(list(per_kind.items())[-MAX_ENTRIES:])
        try:
            with atomic_path(root / MEMO_NAME) as tmp:
                tmp.write_text(json.dumps({"format": MEMO_FORMAT, "entries": entries}, indent=1))
        except OSError as e:  # a read-only cache still works; the next run only loads the models again
            logger.warning("could not write %s: %s", root / MEMO_NAME, e)
