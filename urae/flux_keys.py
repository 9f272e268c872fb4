"""FLUX.1 transformer key layouts: the original BFL single file <-> diffusers' FluxTransformer2DModel.

BFL fuses q/k/v (`img_attn.qkv`, `txt_attn.qkv`) and, in single blocks, q/k/v plus the MLP input
(`linear1`); diffusers keeps them apart. The mapping is a table of (BFL name, diffusers names):
one diffusers name is a rename, several are row slices concatenated in that order. Sizes come from
the tensors, so it works for any width (diffusers' own converter assumes FLUX.1's 3072).
"""

from __future__ import annotations

import re

import torch

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _global_pairs(guidance: bool) -> list[tuple[str, list[str]]]:
    pairs = [
        ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
        ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
        ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
        ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
        ("txt_in", ["context_embedder"]),
        ("img_in", ["x_embedder"]),
        ("final_layer.linear", ["proj_out"]),
    ]
    if guidance:
        pairs += [
            ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
            ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
        ]
    return pairs


def double_block_pairs(i: int) -> list[tuple[str, list[str]]]:
    b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    return [
        (b + "img_mod.lin", [d + "norm1.linear"]),
        (b + "txt_mod.lin", [d + "norm1_context.linear"]),
        (b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"]),
        (b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"]),
        (b + "img_attn.proj", [d + "attn.to_out.0"]),
        (b + "txt_attn.proj", [d + "attn.to_add_out"]),
        (b + "img_mlp.0", [d + "ff.net.0.proj"]),
        (b + "img_mlp.2", [d + "ff.net.2"]),
        (b + "txt_mlp.0", [d + "ff_context.net.0.proj"]),
        (b + "txt_mlp.2", [d + "ff_context.net.2"]),
    ]


def single_block_pairs(i: int) -> list[tuple[str, list[str]]]:
    b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return [
        (b + "modulation.lin", [d + "norm.linear"]),
        (b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"]),
        (b + "linear2", [d + "proj_out"]),
    ]


def _norm_pairs(num_layers: int, num_single_layers: int) -> list[tuple[str, str]]:
    """RMSNorm scales: BFL `.scale` <-> diffusers `.weight`."""
    pairs = []
    for i in range(num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        pairs += [
            (b + "img_attn.norm.query_norm.scale", d + "norm_q.weight"),
            (b + "img_attn.norm.key_norm.scale", d + "norm_k.weight"),
            (b + "txt_attn.norm.query_norm.scale", d + "norm_added_q.weight"),
            (b + "txt_attn.norm.key_norm.scale", d + "norm_added_k.weight"),
        ]
    for i in range(num_single_layers):
        b, d = f"single_blocks.{i}.norm.", f"single_transformer_blocks.{i}.attn."
        pairs += [(b + "query_norm.scale", d + "norm_q.weight"), (b + "key_norm.scale", d + "norm_k.weight")]
    return pairs


def linear_pairs(num_layers: int, num_single_layers: int, guidance: bool = True) -> list[tuple[str, list[str]]]:
    """Every Linear of the transformer as (BFL module, diffusers modules whose rows it concatenates)."""
    pairs = _global_pairs(guidance)
    for i in range(num_layers):
        pairs += double_block_pairs(i)
    for i in range(num_single_layers):
        pairs += single_block_pairs(i)
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # BFL's final AdaLN emits (shift, scale); diffusers' AdaLayerNormContinuous emits (scale, shift).
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def strip_bfl_prefix(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in BFL_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def count_blocks(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def is_bfl_flux(keys) -> bool:
    keys = [strip_bfl_prefix({k: None}).popitem()[0] for k in keys]
    return any(k.startswith("double_blocks.") for k in keys) and any(k.startswith("img_in.") for k in keys)


def is_diffusers_flux(keys) -> bool:
    return any(k.startswith("transformer_blocks.") for k in keys) and any(k.startswith("x_embedder.") for k in keys)


def bfl_to_diffusers(sd: dict) -> dict:
    """Convert a BFL FLUX transformer state dict (optionally prefixed) to diffusers names. Lossless."""
    sd = strip_bfl_prefix(sd)
    n, ns = count_blocks(sd, "double_blocks"), count_blocks(sd, "single_blocks")
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for bfl, names in linear_pairs(n, ns, guidance="guidance_in.in_layer.weight" in sd):
        for suffix in ("weight", "bias"):
            key = f"{bfl}.{suffix}"
            if key not in sd:
                continue
            t = sd.pop(key)
            if len(names) == 1:
                out[f"{names[0]}.{suffix}"] = t
                continue
            sizes = [hidden] * 3 + ([t.shape[0] - 3 * hidden] if len(names) == 4 else [])
            for name, part in zip(names, torch.split(t, sizes, dim=0)):
                out[f"{name}.{suffix}"] = part.contiguous()
    for bfl, dif in _norm_pairs(n, ns):
        out[dif] = sd.pop(bfl)
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(sd.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    if sd:
        raise KeyError(f"unexpected keys in the BFL FLUX checkpoint: {sorted(sd)[:8]}")
    return out


def diffusers_to_bfl(sd: dict, num_layers: int | None = None, num_single_layers: int | None = None) -> dict:
    """Convert a diffusers FluxTransformer2DModel state dict to BFL names (flux1-dev.safetensors layout)."""
    sd = dict(sd)
    n = num_layers if num_layers is not None else count_blocks(sd, "transformer_blocks")
    ns = num_single_layers if num_single_layers is not None else count_blocks(sd, "single_transformer_blocks")
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    out: dict[str, torch.Tensor] = {}
    for bfl, names in linear_pairs(n, ns, guidance):
        for suffix in ("weight", "bias"):
            parts = [sd.pop(f"{name}.{suffix}") for name in names if f"{name}.{suffix}" in sd]
            if parts:
                out[f"{bfl}.{suffix}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    for bfl, dif in _norm_pairs(n, ns):
        out[bfl] = sd.pop(dif)
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(sd.pop(f"norm_out.linear.{suffix}"))
    if sd:
        raise KeyError(f"unexpected keys in the diffusers FLUX state dict: {sorted(sd)[:8]}")
    return out
