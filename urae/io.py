"""Safe, atomic file I/O shared by every tool that writes or reads weights."""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

_umask_lock = threading.Lock()
_umask_fallback: int | None = None


def process_umask() -> int:
    """The process umask, read without changing it where the OS shows it (Linux /proc); elsewhere read once,
    on first use, by the set-and-restore that is the only portable way (under a lock, never at import)."""
    global _umask_fallback
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        if _umask_fallback is None:
            _umask_fallback = os.umask(0o022)
            os.umask(_umask_fallback)
        return _umask_fallback


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a temp file (0600) or temp folder (0700) the mode a plain open()/mkdir() would, before renaming
    it into place: outputs must be readable by the other programs (ComfyUI, a web UI) that load them."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~process_umask())


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        set_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata; a missing, truncated or non-safetensors file is a clear ValueError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Keys and metadata without reading tensor data (cheap on a 24 GB checkpoint)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def cached_file_meta(path: str | os.PathLike, keys: set[str]) -> tuple[str | None, dict[str, str]]:
    """(problem, metadata) of a cache file expected to hold exactly `keys`: problem is "missing", "corrupt"
    (unreadable or other keys) or None, in which case the metadata is returned for the caller's own checks."""
    if not Path(path).is_file():
        return "missing", {}
    try:
        found, meta = read_safetensors_header(path)
    except ValueError:
        return "corrupt", {}
    return (None, meta) if set(found) == set(keys) else ("corrupt", {})
