"""Transformer files stored pre-quantised (flux1-dev-fp8.safetensors and the like), found from the header alone.

Such a file loads upcast (inference and init=plain work as with any file), but its weights are already rounded:
at 4K URAE trains the r *smallest* singular components of each weight, and a float8 rounding is larger than they
are (benchmarks/bench_fp8_minor.py), so the minor/major SVD must read full-precision weights.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import torch

# safetensors dtype names of quantised storage -> the name users know
QUANTISED = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
             "I8": "int8", "U8": "uint8", "F4": "float4"}
# spacing between neighbouring float8 values: mantissa bits, smallest normal exponent
_FP8_GRID = {"F8_E4M3": (3, -6), "F8_E5M2": (2, -14)}


def stored_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """{tensor name: safetensors dtype} from the header, without reading tensor data."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def quantised_weights(path: str | os.PathLike) -> Counter:
    """{dtype name users know: number of weights} of the quantised weights in a .safetensors file (or every
    .safetensors file of a folder); empty for a full-precision one."""
    path = os.fspath(path)
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
             if os.path.isdir(path) else [path])
    found = Counter()
    for file in files:
        for name, dtype in stored_dtypes(file).items():
            if name.endswith(".weight") and dtype in QUANTISED:
                found[QUANTISED[dtype]] += 1
    return found


def describe(found: Counter) -> str:
    return ", ".join(f"{n} weights as {dtype}" for dtype, n in found.most_common())


def _rounding_rms(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per element, the rms error of rounding to the float8 grid a stored value lies on: spacing / sqrt(12)."""
    mantissa, min_exp = _FP8_GRID[dtype]
    exp = torch.floor(torch.log2(w.abs().clamp_min(2.0 ** min_exp)))
    return torch.pow(2.0, exp - mantissa) / math.sqrt(12)


def rounding_against_minor(path: str | os.PathLike, rank: int) -> tuple[str, float, float] | None:
    """(layer, rounding, sigma_minor) for the first URAE target stored in float8: the rounding's spectral norm,
    estimated from the spacing of the stored values as a random matrix of that rms (Bai-Yin: rms (sqrt(m) +
    sqrt(n))), and the largest of the r smallest singular values of the stored weight, i.e. the scale of what
    init=minor would take. None when no target is stored in float8."""
    from safetensors import safe_open

    from networks.minor_lora import svd_components

    dtypes = stored_dtypes(path)
    targets = ("img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight")
    name = next((k for k in dtypes if k.endswith(targets) and dtypes[k] in _FP8_GRID), None)
    if name is None:
        return None
    with safe_open(os.fspath(path), framework="pt") as f:
        w = f.get_tensor(name).double()
    if name.endswith("qkv.weight"):  # fused q, k, v: the q rows, as minor_lora adapts them
        w = w[: w.shape[0] // 3]
    rms = _rounding_rms(w, dtypes[name]).square().mean().sqrt().item()
    rounding = rms * (math.sqrt(w.shape[0]) + math.sqrt(w.shape[1]))
    rank = max(1, min(rank, min(w.shape) - 1))
    _, _, sigma = svd_components(w, rank, "minor")
    return name, rounding, sigma.max().item()
