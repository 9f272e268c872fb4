"""Describe a FLUX LoRA file: its form, modules, ranks, scales, dtype, targets and metadata.

    python -m networks.inspect_lora FILE [--json]

Forms (by the keys): `kohya` (lora_unet_<BFL path>, lora_down/lora_up), `peft` (transformer.<diffusers
path>.lora_A/lora_B) and `urae-official` (the 4K attention-processor file,
`<path>.attn.processor.to_q_a.weight`; see networks.convert_lora). A file written by networks.minor_lora
(urae_* metadata) is one of the first two and is named as such, with the layout it was written in.
Targets are counted in diffusers Linear names; a fused kohya module counts the row slices (q, k, v,
MLP) its block-diagonal up actually changes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter

import torch

from networks.lora_files import FINAL_BFL, FINAL_DIFFUSERS, UserError, run_cli, user_errors
from networks.minor_lora import (
    PEFT_TE,
    PEFT_UNET,
    PREFIX_TE,
    PREFIX_UNET,
    TARGET_PRESETS,
    bfl_equivalents,
    bfl_row_sizes,
    check_finite,
    group_lora_keys,
    read_lora_file,
)
from urae.flux_keys import linear_pairs

FLUX_URAE_LAYERS = 190  # 19 double blocks x 4 + 38 single blocks x 3 attention projections of FLUX.1
OFFICIAL_RE = re.compile(
    r"^(?:transformer\.)?((?:single_)?transformer_blocks\.\d+)\.attn\.processor\.(to_q|to_k|to_v|to_out)_(a|b)\.weight$"
)
_URAE_RE = re.compile(TARGET_PRESETS["urae"])


def read_lora(path) -> tuple[dict, dict]:
    """Tensors and metadata of a LoRA file; missing, truncated or non-finite files are clear errors."""
    from urae.io import load_safetensors

    path = os.fspath(path)
    if path.endswith(".safetensors"):
        with user_errors():
            sd, meta = load_safetensors(path)
    else:
        try:
            sd, meta = read_lora_file(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # torch.load raises assorted errors for a damaged file
            raise UserError(f"{path}: not a readable LoRA file (truncated or corrupt?): {e}") from e
    if not sd:
        raise UserError(f"{path}: the file holds no tensors")
    with user_errors():
        check_finite(sd, path)
    return sd, dict(meta)


def is_official(sd: dict) -> bool:
    return any(OFFICIAL_RE.match(k) for k in sd)


def _kohya_table(keys) -> dict[str, str]:
    """kohya module name -> BFL dotted path, for blocks up to the largest index the file uses."""
    ids = {"double": 0, "single": 0}
    for k in keys:
        m = re.match(rf"^{PREFIX_UNET}_(double|single)_blocks_(\d+)_", k)
        if m:
            ids[m.group(1)] = max(ids[m.group(1)], int(m.group(2)) + 1)
    pairs = linear_pairs(ids["double"], ids["single"])
    table = {f"{PREFIX_UNET}_{bfl.replace('.', '_')}": bfl for bfl, _ in pairs}
    table[f"{PREFIX_UNET}_{FINAL_BFL.replace('.', '_')}"] = FINAL_BFL
    return table


def _kohya_diffusers_table(keys) -> dict[str, str]:
    """kohya module name -> diffusers path, for kohya-form files written with diffusers names."""
    ids = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    for k in keys:
        m = re.match(rf"^{PREFIX_UNET}_((?:single_)?transformer_blocks)_(\d+)_", k)
        if m:
            ids[m.group(1)] = max(ids[m.group(1)], int(m.group(2)) + 1)
    names = [d for _, ds in linear_pairs(ids["transformer_blocks"], ids["single_transformer_blocks"]) for d in ds]
    return {f"{PREFIX_UNET}_{d.replace('.', '_')}": d for d in names + [FINAL_DIFFUSERS]}


def lora_modules(sd: dict, source: str = "LoRA file") -> list[dict]:
    """One record per module: key, form, layout, path (native name), te index, down, up, rank, alpha, scale.

    kohya keys are read in the BFL layout (what sd-scripts writes); PEFT keys in diffusers names.
    A key that is neither is an error that names it.
    """
    if is_official(sd):
        raise UserError(f"{source} is an official URAE 4K adapter file; convert it first "
                        f"(python -m networks.convert_lora IN OUT --from-urae-official --base MODEL)")
    with user_errors(source):
        groups = group_lora_keys(sd)
    if not groups:
        raise UserError(f"{source}: no LoRA weights (lora_down/lora_up or lora_A/lora_B keys) found; "
                        f"keys look like {sorted(sd)[:3]}")
    table, dtable = _kohya_table(groups), _kohya_diffusers_table(groups)
    known = {s for s in (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")}
    stray = [k for k in sd if not any(k.endswith(s) for s in known)]
    if stray:
        raise UserError(f"{source}: unsupported tensors (not a plain LoRA: DoRA/LoHa/...?): {stray[:4]}")
    out, foreign = [], []
    for key, g in sorted(groups.items()):
        rec = {"key": key, "form": g["form"], "down": g["down"], "up": g["up"], "rank": g["down"].shape[0], "te": None}
        rec["alpha"] = float(g["alpha"]) if "alpha" in g else float(rec["rank"])
        rec["scale"] = rec["alpha"] / rec["rank"] if rec["rank"] else 0.0
        if g["form"] == "kohya":
            te = next((i for i, p in enumerate(PREFIX_TE) if key.startswith(p + "_")), None)
            if te is not None:
                rec.update(te=te, path=key[len(PREFIX_TE[te]) + 1:], layout="te")
            elif key in table:
                rec.update(path=table[key], layout="bfl")
            elif key in dtable:
                rec.update(path=dtable[key], layout="diffusers")
            else:
                foreign.append(key)
                continue
        else:
            te = next((i for i, p in enumerate(PEFT_TE) if key.startswith(p + ".")), None)
            if te is not None:
                rec.update(te=te, path=key[len(PEFT_TE[te]) + 1:], layout="te")
            else:
                path = key[len(PEFT_UNET) + 1:] if key.startswith(PEFT_UNET + ".") else key
                if not re.match(r"^((single_)?transformer_blocks\.\d+\.|x_embedder|context_embedder|proj_out|"
                                r"norm_out\.|time_text_embed\.)", path):
                    foreign.append(key)
                    continue
                rec.update(path=path, layout="diffusers")
        out.append(rec)
    if foreign:
        what = "none of its modules" if not out else f"{len(foreign)} of its modules"
        raise UserError(f"{source}: LoRA for another model: {what} are FLUX transformer Linear layers, "
                        f"e.g. {foreign[:3]}")
    return out


def diffusers_slices(rec: dict) -> list[str]:
    """Diffusers Linear names a module record changes (fused BFL modules: the slices with non-zero rows)."""
    if rec["te"] is not None:
        return []
    if rec["layout"] == "diffusers":
        return [rec["path"]]
    if rec["path"] == FINAL_BFL:
        return [FINAL_DIFFUSERS]
    eq = bfl_equivalents(rec["path"])
    if eq is None:
        pairs = dict(linear_pairs(0, 0))
        return pairs.get(rec["path"], [rec["path"]])
    if len(eq) == 1:
        return eq
    up = rec["up"]
    sizes = bfl_row_sizes(rec["path"], up.shape[0], rec["down"].shape[1])
    names, pos = [], 0
    for name, size in zip(eq, sizes):
        if up[pos: pos + size].any():
            names.append(name)
        pos += size
    return names


def detect_form(sd: dict, meta: dict) -> str:
    """The form the keys are in; who wrote the file is `written_by` in describe()."""
    if is_official(sd):
        return "urae-official"
    keys = list(sd)
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return "peft"
    return "unknown"


def _official_summary(sd: dict) -> dict:
    mods = {}
    for k, v in sd.items():
        m = OFFICIAL_RE.match(k)
        if m:
            mods.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = v
    ranks = Counter(int(g["a"].shape[0]) for g in mods.values() if "a" in g)
    names = [f"{blk}.attn.{'to_out.0' if p == 'to_out' else p}" for blk, p in mods]
    return {"modules": len(mods), "ranks": dict(ranks), "alphas": {"none (scale 1)": len(mods)},
            "scales": {"1.0": len(mods)}, "diffusers_layers": len(names),
            "urae_layers": sum(bool(_URAE_RE.match(n)) for n in names), "fused_modules": 0, "text_encoder_modules": 0}


def describe(path) -> dict:
    """Facts about a LoRA file as a JSON-ready dict."""
    sd, meta = read_lora(path)
    form = detect_form(sd, meta)
    factors = [v for k, v in sd.items() if not k.endswith(".alpha")]
    info: dict = {"file": os.fspath(path), "bytes": os.path.getsize(path), "form": form, "tensors": len(sd),
                  "dtypes": dict(Counter(str(v.dtype).replace("torch.", "") for v in factors))}
    if form == "urae-official":
        info.update(_official_summary(sd), layout="diffusers",
                    note="official URAE 4K adapter: no init copies; converting needs the base model")
    else:
        recs = lora_modules(sd, os.fspath(path))
        unet = [r for r in recs if r["te"] is None]
        names = [n for r in unet for n in diffusers_slices(r)]
        info.update({
            "layout": "bfl" if any(r["layout"] == "bfl" for r in unet) else "diffusers",
            "modules": len(unet),
            "text_encoder_modules": len(recs) - len(unet),
            "ranks": dict(sorted(Counter(r["rank"] for r in recs).items())),
            "alphas": {f"{a:g}": n for a, n in sorted(Counter(r["alpha"] for r in recs).items())},
            "scales": {f"{s:g}": n for s, n in sorted(Counter(r["scale"] for r in recs).items())},
            "fused_modules": sum(r["layout"] == "bfl" and len(bfl_equivalents(r["path"]) or []) > 1 for r in unet),
            "diffusers_layers": len(names),
            "urae_layers": sum(bool(_URAE_RE.match(n)) for n in names),
            "params": sum(r["down"].numel() + r["up"].numel() for r in recs),
        })
    info["other_layers"] = info["diffusers_layers"] - info["urae_layers"]
    note = rank_note(meta, info)
    if note:
        info["rank_note"] = note
    if "urae_format" in meta:
        info["written_by"] = "minor_lora"
    if "urae_format" in meta and meta.get("urae_layout") not in (None, info["layout"]):
        info["converted_from"] = meta["urae_layout"]
        info["note"] = (f"written by minor_lora in the {meta['urae_layout']} layout and converted: it applies the "
                        f"same ΔW; minor_lora resumes training only from a file in the model's own layout")
    ours = {k: v for k, v in meta.items() if k.startswith("urae_") and k not in ("urae_structure",
                                                                                  "urae_source_structure")}
    if "urae_runtime" in ours:
        ours["urae_runtime"] = json.loads(ours["urae_runtime"])
    if "urae_structure" in meta:
        ours["urae_structure"] = f"{len(json.loads(meta['urae_structure']))} modules (lets minor_lora resume)"
    if "urae_source_structure" in meta:
        ours["urae_source_structure"] = (f"{len(json.loads(meta['urae_source_structure']))} modules of the "
                                         f"{meta.get('urae_layout', '?')}-layout original (convert back to resume)")
    info["urae_metadata"] = ours
    info["ss_metadata"] = {k: v for k, v in meta.items() if k.startswith(("ss_", "sshs_"))}
    info["other_metadata"] = sorted(k for k in meta if not k.startswith(("urae_", "ss_", "sshs_")))
    return info


def rank_note(meta: dict, info: dict) -> str | None:
    """Why the file's ranks are not the rank it was trained at (a minor/major adapter is saved as 2r)."""
    init, r = meta.get("urae_init"), meta.get("urae_rank", "")
    if init not in ("minor", "major") or not r.isdigit():
        return None
    r = int(r)
    note = (f"trained at rank {r} with init={init}: each adapted layer holds {r} trained + {r} frozen {init} "
            f"components, so its exact standard-LoRA form has rank {2 * r} (the trained change is their "
            f"difference); extract_lora needs --rank {2 * r} to recover it")
    if info.get("fused_modules"):
        note += "; fused qkv/linear1 modules hold the ranks of their q, k, v (and MLP) slices side by side"
    if any(int(k) > 2 * r for k in info.get("ranks", {})) and not info.get("fused_modules"):
        note += "; larger ranks hold a LoRA stacked with it (ranks add)"
    return note


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_text(info: dict) -> str:
    def counts(d):
        return ", ".join(f"{k} ({v})" if len(d) > 1 else str(k) for k, v in d.items()) or "-"

    lines = [
        f"{info['file']}: {info['form']} LoRA ({info['layout']} layout"
        + (", written by minor_lora" if info.get("written_by") else "")
        + (f", converted from its {info['converted_from']} layout" if info.get("converted_from") else "")
        + f"), {_size(info['bytes'])}, "
        f"{info['tensors']} tensors",
        f"  modules:   {info['modules']} transformer" + (f" + {info['text_encoder_modules']} text encoder"
                                                        if info.get("text_encoder_modules") else "")
        + (f" ({info['fused_modules']} fused qkv/linear1)" if info.get("fused_modules") else ""),
        f"  ranks:     {counts(info['ranks'])}" + (f"\n             ({info['rank_note']})"
                                                     if info.get("rank_note") else ""),
        f"  alphas:    {counts(info['alphas'])}   effective scale alpha/rank: {counts(info['scales'])}",
        f"  dtype:     {counts(info['dtypes'])}" + (f"   parameters: {_count(info['params'])}" if "params" in info else ""),
        f"  targets:   {info['diffusers_layers']} diffusers Linear layers: {info['urae_layers']} URAE layers"
        + (" (the full FLUX.1 URAE set)" if info["urae_layers"] == FLUX_URAE_LAYERS else "")
        + (f" + {info['other_layers']} others" if info["other_layers"] else ""),
    ]
    if info.get("note"):
        lines.append(f"  note:      {info['note']}")
    for k, v in [*info["urae_metadata"].items(), *info["ss_metadata"].items()]:
        v = json.dumps(v) if isinstance(v, dict) else str(v)
        lines.append(f"  {k}: {v if len(v) < 120 else v[:117] + '...'}")
    if info["other_metadata"]:
        lines.append(f"  other metadata keys: {', '.join(info['other_metadata'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m networks.inspect_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="LoRA file (.safetensors)")
    ap.add_argument("--json", action="store_true", help="print the facts as JSON")
    a = ap.parse_args(argv)

    def body():
        info = describe(a.file)
        print(json.dumps(info, indent=1) if a.json else format_text(info))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
