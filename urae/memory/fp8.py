"""fp8 storage of the blocks' frozen Linear weights, through diffusers' layerwise casting hooks.

Each Linear inside the transformer blocks stores its weight and bias as float8_e4m3fn; diffusers' hook
casts the module to the compute dtype just before its forward and back to float8 just after. This works
for training: autograd keeps the upcast weight (a view made inside F.linear) until that layer's backward,
which under gradient checkpointing is one block's worth at a time. An adapter attached sd-scripts-style
has replaced the Linear's `forward`; the hook wraps that forward, so the adapter's own base call sees the
upcast weight. The cast is a plain round to nearest (as sd-scripts' `--fp8_base` and the fp8 FLUX files
of ComfyUI); `benchmarks/bench_fp8_minor.py` reports its error next to the minor components.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)


def block_linears(blocks) -> list[nn.Linear]:
    return [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]


class Fp8Storage:
    def __init__(self, blocks, compute_dtype: torch.dtype):
        from diffusers.hooks import apply_layerwise_casting

        self.compute_dtype = compute_dtype
        self.linears = block_linears(blocks)
        # what each Linear looked like before, so remove() can put it back (diffusers cannot undo this hook)
        self._before = [(m, m.__dict__.get("forward"), hasattr(m, "_diffusers_hook")) for m in self.linears]
        for m in self.linears:
            apply_layerwise_casting(m, storage_dtype=FP8, compute_dtype=compute_dtype, skip_modules_pattern=())

    def stored_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.linears for p in m.parameters())

    def remove(self) -> None:
        """Drop the hooks and cast the weights back to the compute dtype (their values keep the fp8 rounding)."""
        for m, forward, had_hook in self._before:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
            if not had_hook and hasattr(m, "_diffusers_hook"):
                del m._diffusers_hook
            m.to(dtype=self.compute_dtype)
