"""Small facts and parsers the whole package shares, each written once: dtype names, true/false words,
"did you mean" hints, the dev/schnell test, a free local port for multi-process runs, and readable counts
and byte sizes."""

from __future__ import annotations

import difflib
import socket

import torch

# The dtype names users type (sd-scripts' spellings first), and their torch dtypes.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "no": "fp32"}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def dtype_from_name(name: str) -> torch.dtype:
    """`bf16`/`bfloat16`, `fp16`/`float16`, `fp32`/`float32` (and `no`, mixed precision off) -> torch dtype."""
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_bool(value) -> bool:
    """A bool, or one of true/false, 1/0, yes/no, on/off (any case); anything else is a ValueError."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def did_you_mean(name: str, known, cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def has_guidance_embedding(model_or_config) -> bool:
    """True for FLUX.1-dev (guidance-distilled: a guidance embedding), False for schnell.

    Takes a transformer, its config object, or the config as a dict read from config.json.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    value = cfg.get("guidance_embeds", False) if isinstance(cfg, dict) else getattr(cfg, "guidance_embeds", False)
    return bool(value)


def free_port() -> int:
    """A TCP port that is free now on this machine (for a local process group; not the default 29500,
    which other runs on the same machine may hold)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def human_count(n: float) -> str:
    """7168 -> '7.17 K', 18_700_000 -> '18.7 M': parameter counts people can read."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
