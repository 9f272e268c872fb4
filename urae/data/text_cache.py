"""Text-embedding cache: T5 sequence embedding + CLIP pooled embedding per distinct caption.

Files are content-addressed: the name is a hash of (caption, tokenizers, encoders, T5 max length),
so an edited caption or another encoder simply maps to another file, and two images with the same
caption share one. Keys: "t5" [max_length, d_t5], "t5_mask" [max_length] (uint8; FLUX does not use
it, kept for trainers that do), "clip_pooled" [d_clip]. The encode matches diffusers'
`FluxPipeline.encode_prompt` (T5 padded to max_length, CLIP padded to 77, pooled output).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from urae.data.distributed import Ranks
from urae.data.identity import module_fingerprint, tokenizer_fingerprint
from urae.io import cached_file_meta, save_safetensors_atomic

FORMAT = "urae-text-v1"
T5_MAX_LENGTH_DEV = 512
T5_MAX_LENGTH_SCHNELL = 256
_KEYS = {"t5", "t5_mask", "clip_pooled"}


@dataclass(frozen=True)
class TextEncoders:
    """The four text-side components of a FLUX pipeline (CLIP = tokenizer/text_encoder, T5 = *_2)."""

    tokenizer: object
    text_encoder: object
    tokenizer_2: object
    text_encoder_2: object
    t5_max_length: int = T5_MAX_LENGTH_DEV

    def identity(self) -> str:
        h = hashlib.sha256()
        for part in (tokenizer_fingerprint(self.tokenizer), module_fingerprint(self.text_encoder),
                     tokenizer_fingerprint(self.tokenizer_2), module_fingerprint(self.text_encoder_2),
                     str(self.t5_max_length)):
            h.update(part.encode() + b"\0")
        return h.hexdigest()[:24]


def text_path(cache_root: Path, caption: str, identity: str) -> Path:
    key = hashlib.sha256(f"{FORMAT}\0{identity}\0{caption}".encode()).hexdigest()[:32]
    return cache_root / "text" / key[:2] / f"{key}.safetensors"


def check_text_file(path: Path, caption: str, identity: str, dtype: torch.dtype | None = None) -> str | None:
    problem, meta = cached_file_meta(path, _KEYS)
    if problem:
        return problem
    if meta.get("identity") != identity or meta.get("caption") != caption:
        return "stale"
    if dtype is not None and meta.get("dtype", "") != str(dtype).removeprefix("torch."):
        return "stale"  # asked for another storage dtype
    return None


@torch.no_grad()
def encode_captions(enc: TextEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
    """Batched embeddings, as diffusers' FluxPipeline computes them."""
    clip_dev = next(enc.text_encoder.parameters()).device
    t5_dev = next(enc.text_encoder_2.parameters()).device
    clip_ids = enc.tokenizer(captions, padding="max_length", max_length=enc.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    pooled = enc.text_encoder(clip_ids.to(clip_dev), output_hidden_states=False).pooler_output
    t5_in = enc.tokenizer_2(captions, padding="max_length", max_length=enc.t5_max_length, truncation=True,
                            return_tensors="pt")
    t5 = enc.text_encoder_2(t5_in.input_ids.to(t5_dev), output_hidden_states=False)[0]
    return {"t5": t5, "t5_mask": t5_in.attention_mask.to(torch.uint8), "clip_pooled": pooled}


@dataclass
class TextCacheReport:
    total: int = 0
    reused: int = 0
    encoded: int = 0


def cache_texts(jobs: dict[Path, str], enc: TextEncoders, identity: str, ranks: Ranks | None = None,
                dtype: torch.dtype | None = None, batch_size: int = 8, progress: bool = True) -> TextCacheReport:
    """Write a valid file for every (path -> caption) job; this rank encodes its round-robin share."""
    from tqdm.auto import tqdm

    ranks = ranks or Ranks()
    unique = sorted(jobs.items())
    mine = ranks.share(unique)
    todo = [(p, c) for p, c in mine if check_text_file(p, c, identity, dtype) is not None]
    report = TextCacheReport(total=len(unique), reused=len(mine) - len(todo))
    if ranks.is_main:
        print(f"text cache: {len(unique)} distinct captions over {ranks.count} process(es); rank 0 share {len(mine)}: "
              f"{report.reused} valid, {len(todo)} to encode; T5 max length {enc.t5_max_length}", flush=True)
    bar = tqdm(total=len(todo), desc=f"captions (rank {ranks.index})", unit="cap",
               disable=not progress or not ranks.is_main)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        out = encode_captions(enc, [c for _, c in chunk])
        for i, (path, caption) in enumerate(chunk):
            tensors = {k: v[i].to("cpu", dtype if dtype and v.is_floating_point() else v.dtype) for k, v in out.items()}
            save_safetensors_atomic(tensors, path, {"format": FORMAT, "identity": identity, "caption": caption,
                                                    "t5_max_length": enc.t5_max_length,
                                                    "dtype": str(tensors["t5"].dtype).removeprefix("torch.")})
        report.encoded += len(chunk)
        bar.update(len(chunk))
    bar.close()
    ranks.barrier()
    # every rank checks the whole set after the barrier: ranks that listed different captions (files added
    # during start-up) would otherwise fail much later in the loader
    missing = [p for p, c in unique if check_text_file(p, c, identity) is not None] if ranks.synchronised else []
    if missing:
        raise RuntimeError(f"text cache incomplete after all ranks finished: {len(missing)} file(s), e.g. "
                           f"{missing[0]}; did the dataset change while caching started? Run again.")
    return report
