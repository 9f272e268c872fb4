"""URAE's high-resolution settings as plain numbers: no torch, no ComfyUI, no diffusers.

The same formulas and the same priority as the project's command line (`urae/runtime.py`,
`urae/inference.py`); tests/test_comfyui_node.py checks that the two agree.
"""

from __future__ import annotations

import json
import math

FLUX_ROPE_THETA = 10000
# N0 = 512 text tokens + 64 x 64 image tokens: the sequence length FLUX.1 was trained at (1024²).
DEFAULT_BASE_SEQ_LEN = 512 + 64 * 64
RUNTIME_METADATA_KEY = "urae_runtime"
# The static shift of FLUX.1's diffusers scheduler configs.
DEFAULT_SHIFT = {"dev": 3.0, "schnell": 1.0}
# Position schemes (rope.py, a copy of the project's urae/rope.py) and their options with the reference's defaults.
ROPE_SCHEMES = ("ntk", "yarn", "dype-yarn", "dype-ntk", "none")
ROPE_DEFAULTS = {"rope_base_resolution": 1024, "dype_lambda": 2.0, "yarn_beta": [1.25, 0.75], "yarn_gamma": [16.0, 2.0]}


def rope_theta(ntk_factor: float) -> float:
    """NTK-scaled RoPE base, the same on every axis."""
    return FLUX_ROPE_THETA * ntk_factor


def attention_scale(seq_len: int, head_dim: int, base_seq_len: int = DEFAULT_BASE_SEQ_LEN) -> float:
    """Proportional attention's softmax scale for a sequence of seq_len tokens."""
    return math.sqrt(math.log(seq_len) / math.log(base_seq_len)) / math.sqrt(head_dim)


def shifted_sigma(t: float, shift: float) -> float:
    """Static timestep shift of flow matching (diffusers' FlowMatchEulerDiscreteScheduler)."""
    return shift * t / (1 + (shift - 1) * t)


def is_high_res(width: int, height: int) -> bool:
    return width * height >= 2048 * 2048 or max(width, height) >= 2048


def runtime_from_metadata(meta: dict | None) -> dict | None:
    """The settings a LoRA file was trained with (its `urae_runtime` JSON), or None."""
    raw = (meta or {}).get(RUNTIME_METADATA_KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def resolve(width: int, height: int, variant: str, ntk_factor: float | None = None,
            proportional_attention: bool | None = None, shift: float | None = None,
            metadata_runtime: dict | None = None, rope: str | None = None) -> dict:
    """Explicit value, then the LoRA's metadata, then URAE's defaults for the target size.

    None means "not given". As on the command line, a file's metadata replaces the size-based defaults
    as a whole (a scheme other than the file's drops its NTK factor), the size defaults (NTK 10 and
    proportional attention from 2048 px on) belong to the `ntk` scheme, and the shift never comes from
    metadata (it is the model variant's static shift).
    """
    if metadata_runtime:
        base = {"ntk_factor": float(metadata_runtime.get("ntk_factor", 1.0)),
                "proportional_attention": bool(metadata_runtime.get("proportional_attention", False)),
                "base_seq_len": int(metadata_runtime.get("base_seq_len", DEFAULT_BASE_SEQ_LEN)),
                "rope": str(metadata_runtime.get("rope", "ntk"))}
        base.update({k: metadata_runtime.get(k, v) for k, v in ROPE_DEFAULTS.items()})
        if rope is not None and rope != base["rope"]:
            base["ntk_factor"] = 1.0
    else:
        hi = is_high_res(width, height) and rope in (None, "ntk")
        base = {"ntk_factor": 10.0 if hi else 1.0, "proportional_attention": hi,
                "base_seq_len": DEFAULT_BASE_SEQ_LEN, "rope": "ntk", **ROPE_DEFAULTS}
    if rope is not None:
        base["rope"] = rope
    if base["rope"] not in ROPE_SCHEMES:
        raise ValueError(f"unknown rope {base['rope']!r}; choose one of {', '.join(ROPE_SCHEMES)}")
    if ntk_factor is not None:
        base["ntk_factor"] = float(ntk_factor)
    if proportional_attention is not None:
        base["proportional_attention"] = bool(proportional_attention)
    base["shift"] = float(shift) if shift is not None else DEFAULT_SHIFT[variant]
    if not (math.isfinite(base["ntk_factor"]) and base["ntk_factor"] > 0):
        raise ValueError(f"ntk_factor must be a positive number, got {base['ntk_factor']!r}")
    if base["rope"] != "ntk" and base["ntk_factor"] != 1:
        raise ValueError(f"ntk_factor {base['ntk_factor']:g} is for rope = ntk; rope = {base['rope']} sets its own "
                         f"frequencies (leave ntk_factor at 0 = auto)")
    if not base["shift"] > 0:
        raise ValueError(f"shift must be positive, got {base['shift']!r}")
    if base["base_seq_len"] < 2:
        raise ValueError(f"base_seq_len must be >= 2, got {base['base_seq_len']!r}")
    return base
