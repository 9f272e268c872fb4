"""Sample-prompt embeddings through the text cache, so sampling during training needs no text encoder
once the prompts have been cached (by `build_caches(..., prompts=...)` or a first call here)."""

from __future__ import annotations

import torch

from urae.data.build import CachePlan, component_of
from urae.data.memo import TEXT_PARTS
from urae.data.status import CacheStatus, prompt_root
from urae.data.text_cache import TextEncoders, cache_texts, check_text_file, text_path
from urae.io import load_safetensors


def cache_prompts(prompts, source: CachePlan | CacheStatus, components=None, *, dtype: torch.dtype | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(t5 [1, L, d], clip_pooled [1, d]) on CPU per prompt, as `FluxPipeline.encode_prompt` returns them.

    source: the plan (or a status whose texts are complete) that fixes the text identity, the T5 max
    length and the cache root. Prompts without a valid file are encoded when `components` holds the
    four text parts (tokenizer, text_encoder, tokenizer_2, text_encoder_2), else ValueError.
    """
    prompts = list(prompts)
    if isinstance(source, CachePlan):
        identity, t5_len = source.text_identity, source.t5_max_length
    else:
        identity, t5_len = source.texts.identity, source.t5_max_length
    parts = [component_of(components, n) for n in TEXT_PARTS]
    if all(x is not None for x in parts):
        enc = TextEncoders(*parts, t5_max_length=t5_len)
        identity = enc.identity()
    elif identity is None:
        raise ValueError("text encoders' identity unknown: pass components with the text encoders")
    else:
        enc = None
    root = prompt_root(source.scan)
    jobs = {text_path(root, p, identity): p for p in prompts}
    missing = {p: c for p, c in jobs.items() if check_text_file(p, c, identity, dtype) is not None}
    if missing and enc is None:
        raise ValueError(f"{len(missing)} sample prompt(s) not cached (e.g. {next(iter(missing.values()))!r}); "
                         f"pass components with the text encoders")
    if missing:
        cache_texts(missing, enc, identity, dtype=dtype, progress=False)
    out = []
    for path in jobs:
        tensors, _ = load_safetensors(path)
        out.append((tensors["t5"][None], tensors["clip_pooled"][None]))
    return out
