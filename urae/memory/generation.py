"""Expected GPU memory of generation (one FLUX.1-dev transformer forward per step), for the printed plan.

Weights follow from the model's sizes (urae.memory.estimate); the activations of one forward grow with the
tokens: 105.6 KB per token (bf16, PyTorch's memory-efficient attention) plus 7.5 MB, fitted on fake-tensor
forwards of the real-size transformer under no_grad: 0.46 / 1.67 / 6.50 GiB at 1024² / 2048² / 4096², the
same with fp8 storage (its upcast is one layer at a time). Peaks: 22.6 / 23.8 / 28.7 GiB in bf16 and
11.6 / 12.8 / 17.6 GiB with fp8 storage. The CUDA context and the allocator's fragmentation come on top.
"""

from __future__ import annotations

from urae.memory.estimate import (
    DOUBLE_LINEAR,
    DOUBLE_PARAMS,
    N_DOUBLE,
    N_SINGLE,
    OTHER_PARAMS,
    SINGLE_LINEAR,
    SINGLE_PARAMS,
    TXT_TOKENS,
)

WORK_PER_TOKEN = 105_560
WORK_FIXED = 7_500_000


def transformer_bytes(fp8: bool = False, param_bytes: int = 2) -> int:
    """FLUX.1-dev's transformer at `param_bytes` per weight (2: bf16/fp16, 4: fp32), or with its blocks'
    Linear weights stored as float8 (1 byte each)."""
    linear = N_DOUBLE * DOUBLE_LINEAR + N_SINGLE * SINGLE_LINEAR
    total = N_DOUBLE * DOUBLE_PARAMS + N_SINGLE * SINGLE_PARAMS + OTHER_PARAMS
    return param_bytes * total - ((param_bytes - 1) * linear if fp8 else 0)


def forward_work_bytes(width: int, height: int, text_tokens: int = TXT_TOKENS, param_bytes: int = 2) -> int:
    """One forward's activations; fitted in bf16, proportional to the element size."""
    return (WORK_PER_TOKEN * ((width // 16) * (height // 16) + text_tokens) + WORK_FIXED) * param_bytes // 2


def denoise_peak_bytes(width: int, height: int, fp8: bool = False, param_bytes: int = 2) -> int:
    """The transformer resident plus one forward's activations: the peak of a denoising step."""
    return transformer_bytes(fp8, param_bytes) + forward_work_bytes(width, height, param_bytes=param_bytes)
