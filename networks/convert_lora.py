"""Convert FLUX LoRA files between diffusers/PEFT form and kohya (BFL layout) form, losslessly;
import the official URAE 4K adapter format into a standard LoRA.

    python -m networks.convert_lora IN OUT --to kohya|peft
    python -m networks.convert_lora URAE_4K.safetensors OUT --from-urae-official --base MODEL \
        [--base-lora URAE_2K.safetensors]

PEFT -> kohya: q/k/v (and, in single blocks, q/k/v/MLP) LoRAs become one fused `qkv` / `linear1`
LoRA: down = [down_q; down_k; down_v], up block-diagonal with zero rows for slices without a LoRA
(FLUX's MLP width, 4 x hidden, is assumed for a `linear1` whose proj_mlp has none). Per-slice scales
are folded into up relative to the first slice; `urae_fused_split` metadata records the split so
the way back returns the very same factors. kohya -> PEFT splits a fused LoRA when its up is block
diagonal (each rank changes one slice only); a LoRA trained on the whole fused weight is refused.

Official URAE 4K format (read from the public URAE code: its 4K inference script and the
`FluxAttnAdaptationProcessor2_0` processors it installs):
  * keys `transformer_blocks.N.attn.processor.to_{q,k,v,out}_{a,b}.weight` and
    `single_transformer_blocks.N.attn.processor.to_{q,k,v}_{a,b}.weight` (no `to_out` in single
    blocks), `_a` = down [r, in], `_b` = up [out, r], r = 16, no alpha: the processor's __call__
    computes `attn.to_q(x) + to_q_b(to_q_a(x))` (likewise k, v and to_out.0), i.e. scale 1;
  * the base is FLUX.1-dev with the 2K LoRA fused in (`load_lora_weights` + `fuse_lora`); per layer
    a full SVD W = U S Vh, the base weight is replaced by W_res = U[:, :-r] S Vh[:-r] and the
    processor starts at to_q_b = U[:, -r:] sqrt(S), to_q_a = sqrt(S) Vh[-r:], i.e. the minor part;
  * the file stores the trained to_*_a / to_*_b only, which *include* the minor part (no init
    copies), so ΔW = b·a − b0·a0 with b0·a0 the rank-r minor component of the (2K-fused) weight.
    Their own notebook-style conversion writes lora_A = [−a0; a; A_2K], lora_B = [b0 | b | B_2K].
This import recomputes b0·a0 with minor_lora's fp64 SVD code from the base weights (+ the 2K LoRA)
and writes the same kind of standard LoRA: [a; a0; A_2K], [b | −b0 | B_2K], scale 1 (the 2K part is
included unless --exclude-base-lora). b0·a0 is unique up to ties between the r-th and (r+1)-th
smallest singular values, so it matches theirs to fp32 accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from networks.inspect_lora import OFFICIAL_RE, detect_form, lora_modules, read_lora
from networks.lora_files import (
    DTYPES,
    FINAL_BFL,
    FINAL_DIFFUSERS,
    Checkpoint,
    UserError,
    file_record,
    output_metadata,
    output_path,
    parse_dtype,
    progress_bar,
    run_cli,
    user_errors,
)
from networks.minor_lora import (
    PEFT_UNET,
    PREFIX_TE,
    PREFIX_UNET,
    TargetMap,
    addnet_hashes,
    bfl_equivalents,
    bfl_row_sizes,
    kohya_name,
    svd_components,
)
from urae.flux_keys import linear_pairs

SPLIT_META = "urae_fused_split"


class NotBlockDiagonalError(UserError):
    """A fused kohya LoRA whose ranks each change several q/k/v slices: it has no exact PEFT form."""
_SLICE = ("q", "k", "v", "mlp")


def _put(out: dict, key: str, form: str, down, up, alpha: float, dtype) -> None:
    a, b = (".lora_down.weight", ".lora_up.weight") if form == "kohya" else (".lora_A.weight", ".lora_B.weight")
    out[key + a] = down.to(dtype).contiguous()
    out[key + b] = up.to(dtype).contiguous()
    out[key + ".alpha"] = torch.tensor(float(alpha))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _diffusers_to_bfl(paths) -> dict[str, tuple[str, int, int]]:
    """diffusers Linear -> (BFL Linear, slice index, slice count), for as many blocks as `paths` mention."""
    def count(prefix):
        ids = [int(m.group(1)) for p in paths if (m := re.match(rf"^{prefix}\.(\d+)\.", p))]
        return max(ids) + 1 if ids else 0

    table = {}
    for bfl, names in linear_pairs(count("transformer_blocks"), count("single_transformer_blocks")):
        for i, d in enumerate(names):
            table[d] = (bfl, i, len(names))
    table[FINAL_DIFFUSERS] = (FINAL_BFL, 0, 1)
    return table


def to_kohya(sd: dict, meta: dict, source: str = "LoRA file", dtype=None) -> tuple[dict, dict]:
    """Any supported LoRA as a kohya-form, BFL-layout LoRA with exactly the same ΔW per Linear."""
    recs = lora_modules(sd, source)
    dmap = _diffusers_to_bfl([r["path"] for r in recs if r["layout"] == "diffusers"])
    out, split, groups = {}, {}, {}
    for r in recs:
        dt = dtype or r["down"].dtype
        if r["te"] is not None:
            _put(out, f"{PREFIX_TE[r['te']]}_{r['path'].replace('.', '_')}" if r["form"] == "peft" else r["key"],
                 "kohya", r["down"], r["up"], r["alpha"], dt)
        elif r["layout"] == "bfl":
            _put(out, r["key"], "kohya", r["down"], r["up"], r["alpha"], dt)
        else:
            if r["path"] not in dmap:
                raise UserError(f"{source}: {r['key']} is not a Linear of the FLUX transformer")
            bfl, i, n = dmap[r["path"]]
            groups.setdefault(bfl, (n, {}))[1][i] = r
    for bfl, (n, parts) in groups.items():
        key = kohya_name(PREFIX_UNET, bfl)
        first = parts[min(parts)]
        dt = dtype or first["down"].dtype
        if n == 1:
            up = _swap_halves(first["up"]) if bfl == FINAL_BFL else first["up"]
            _put(out, key, "kohya", first["down"], up, first["alpha"], dt)
            continue
        hidden = first["down"].shape[1]
        # Rows of slices without a LoRA: q/k/v are hidden wide; FLUX's single-block MLP is 4 x hidden.
        sizes = [parts[i]["up"].shape[0] if i in parts else (hidden if i < 3 else 4 * hidden) for i in range(n)]
        ref = first["scale"]
        total = sum(p["rank"] for p in parts.values())
        down = torch.cat([parts[i]["down"].float() for i in sorted(parts)])
        up = torch.zeros(sum(sizes), total)
        row = col = 0
        info = []
        for i, size in enumerate(sizes):
            if i in parts:
                p = parts[i]
                ratio = p["scale"] / ref if ref else 1.0
                up[row: row + size, col: col + p["rank"]] = p["up"].float() * ratio
                info.append([_SLICE[i], p["rank"], ratio])
                col += p["rank"]
            row += size
        split[key] = info
        _put(out, key, "kohya", down, up, ref * total, dt)
    meta = dict(meta)
    meta.pop(SPLIT_META, None)
    if split:
        meta[SPLIT_META] = json.dumps(split, separators=(",", ":"))
    return out, meta


def _split_columns(rec: dict, sizes: list[int], recorded, source: str) -> list[tuple[int, list[int], float]]:
    """(slice index, columns of up/down, scale ratio) for each slice a fused kohya LoRA changes."""
    up = rec["up"]
    if recorded is not None:
        res, col = [], 0
        for label, rank, ratio in recorded:
            res.append((_SLICE.index(label), list(range(col, col + rank)), ratio))
            col += rank
        if col != rec["rank"]:
            raise UserError(f"{source}: {SPLIT_META} for {rec['key']} lists {col} ranks, the file has {rec['rank']}")
        return res
    bounds, pos = [], 0
    for size in sizes:
        bounds.append((pos, pos + size))
        pos += size
    used = torch.stack([(up[a:b] != 0).any(0) for a, b in bounds])  # [slices, rank]
    shared = (used.sum(0) > 1).nonzero().flatten().tolist()
    if shared:
        names = "/".join(_SLICE[: len(sizes)])
        raise NotBlockDiagonalError(
            f"{source}: {rec['key']} is not block-diagonal: {len(shared)} of its {rec['rank']} ranks change rows of "
            f"several {names} slices (a LoRA trained on the whole fused weight, like sd-scripts' lora_flux without "
            f"split_qkv). The PEFT form has one LoRA per diffusers Linear, so it cannot hold this one without "
            f"copying the whole down matrix into every slice. Use the kohya file as it is (diffusers' "
            f"load_lora_weights, ComfyUI and Forge read it) or merge it into the model with networks.merge_lora."
        )
    return [(i, used[i].nonzero().flatten().tolist(), 1.0) for i in range(len(sizes)) if used[i].any()]


def to_peft(sd: dict, meta: dict, source: str = "LoRA file", dtype=None, skip_text_encoder: bool = False):
    """Any supported LoRA as a PEFT-form LoRA in diffusers names with exactly the same ΔW per Linear."""
    recs = lora_modules(sd, source)
    recorded = json.loads(meta.get(SPLIT_META, "{}"))
    globals_ = {bfl: names[0] for bfl, names in linear_pairs(0, 0)}
    out = {}
    for r in recs:
        dt = dtype or r["down"].dtype
        if r["te"] is not None:
            if r["form"] == "peft":
                _put(out, r["key"], "peft", r["down"], r["up"], r["alpha"], dt)
            elif not skip_text_encoder:
                raise UserError(f"{source}: text-encoder module {r['key']}: kohya text-encoder names cannot be "
                                f"mapped back to module paths without the model; pass --skip-text-encoder to drop "
                                f"the text-encoder part")
            continue
        if r["layout"] == "diffusers":
            _put(out, f"{PEFT_UNET}.{r['path']}", "peft", r["down"], r["up"], r["alpha"], dt)
            continue
        path = r["path"]
        if path == FINAL_BFL:
            _put(out, f"{PEFT_UNET}.{FINAL_DIFFUSERS}", "peft", r["down"], _swap_halves(r["up"]), r["alpha"], dt)
            continue
        eq = bfl_equivalents(path) or [globals_[path]]
        if len(eq) == 1:
            _put(out, f"{PEFT_UNET}.{eq[0]}", "peft", r["down"], r["up"], r["alpha"], dt)
            continue
        sizes = bfl_row_sizes(path, r["up"].shape[0], r["down"].shape[1])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for i, cols, ratio in _split_columns(r, sizes, recorded.get(r["key"]), source):
            idx = torch.tensor(cols, dtype=torch.long)
            down = r["down"].float()[idx]
            up = r["up"].float()[starts[i]: starts[i] + sizes[i]][:, idx] / ratio
            _put(out, f"{PEFT_UNET}.{eq[i]}", "peft", down, up, r["scale"] * ratio * len(cols), dt)
    meta = dict(meta)
    meta.pop(SPLIT_META, None)
    return out, meta


# --------------------------------------------------------------------------------------------
# The official URAE 4K adapter format
# --------------------------------------------------------------------------------------------


def _official_modules(sd: dict, source: str) -> dict[str, dict]:
    mods: dict[str, dict] = {}
    for k, v in sd.items():
        m = OFFICIAL_RE.match(k)
        if not m:
            raise UserError(f"{source}: unexpected key {k} in an official URAE adapter file")
        name = f"{m.group(1)}.attn.{'to_out.0' if m.group(2) == 'to_out' else m.group(2)}"
        mods.setdefault(name, {})[m.group(3)] = v
    for name, g in mods.items():
        if set(g) != {"a", "b"}:
            raise UserError(f"{source}: {name} lacks its to_*_{'b' if 'a' in g else 'a'} weight")
        if g["a"].dim() != 2 or g["b"].dim() != 2 or g["b"].shape[1] != g["a"].shape[0]:
            raise UserError(f"{source}: {name}: inconsistent shapes a {tuple(g['a'].shape)}, b {tuple(g['b'].shape)}")
    return mods


def import_official(sd: dict, base, base_lora=None, include_base_lora: bool = True, source: str = "URAE file",
                    progress: bool = True, svd_device=None) -> tuple[dict, dict]:
    """(PEFT-form tensors, metadata) of the standard LoRA equal to an official URAE 4K adapter on `base`."""
    mods = _official_modules(sd, source)
    ranks = {g["a"].shape[0] for g in mods.values()}
    with Checkpoint(base) as ck:
        shapes = ck.diffusers_linear_shapes()
        absent = [n for n in mods if n not in shapes]
        if absent:
            raise UserError(f"{source}: adapter for another model: {absent[:3]} are not Linear layers of {base}")
        for name, g in mods.items():
            if (g["b"].shape[0], g["a"].shape[1]) != shapes[name]:
                raise UserError(f"{source}: {name}: adapter is {g['b'].shape[0]}x{g['a'].shape[1]}, the model's "
                                f"weight is {shapes[name][0]}x{shapes[name][1]}: a LoRA for another model")
        base_parts: dict[str, list] = {}
        if base_lora is not None:
            lsd, _ = read_lora(base_lora)
            with user_errors(os.fspath(base_lora)):
                resolved = TargetMap(shapes).resolve(lsd, 1.0, source=os.fspath(base_lora))
            for m, a, b, down, up in resolved:
                full = torch.zeros(shapes[m][0], up.shape[1])
                full[a:b] = up
                base_parts.setdefault(m, []).append((down, full))
        out = {}
        for name in progress_bar(sorted(mods), "minor components", progress):
            g = mods[name]
            r = g["a"].shape[0]
            w = ck.diffusers_weight(name).double()
            for down, up in base_parts.get(name, []):
                w += up.double() @ down.double()
            up0, down0, _ = svd_components(w, r, "minor", device=svd_device)
            downs, ups = [g["a"].float(), down0.float().cpu()], [g["b"].float(), -up0.float().cpu()]
            if include_base_lora:
                downs += [d for d, _ in base_parts.get(name, [])]
                ups += [u for _, u in base_parts.get(name, [])]
            down, up = torch.cat(downs), torch.cat(ups, 1)
            _put(out, f"{PEFT_UNET}.{name}", "peft", down, up, down.shape[0], torch.float32)
        if include_base_lora:
            for name, items in base_parts.items():
                if name not in mods:
                    down, up = torch.cat([d for d, _ in items]), torch.cat([u for _, u in items], 1)
                    _put(out, f"{PEFT_UNET}.{name}", "peft", down, up, down.shape[0], torch.float32)
    dims = {v.shape[0] for k, v in out.items() if k.endswith(".lora_A.weight")}
    meta = {
        "ss_network_dim": str(max(dims)), "ss_network_alpha": "scale 1 (alpha = rank per module)",
        "ss_base_model_version": "flux1", "urae_init": "minor", "urae_rank": str(max(ranks)),
        "urae_imported_from": "urae-official-4k",
        "urae_import_base_lora": json.dumps(file_record(base_lora)) if base_lora and include_base_lora else "",
    }
    return out, meta


def _describes(structure: dict, ranks: dict[str, int]) -> bool:
    return set(structure) == set(ranks) and all(
        sum(seg[2] for seg in e["segments"]) == ranks[k] for k, e in structure.items())


def refreshed_metadata(tensors: dict, meta: dict, source: str = "LoRA file") -> dict:
    """Metadata that still describes `tensors` after a conversion.

    minor_lora's `urae_structure` names the modules of the file it wrote; where it no longer does (another
    form or layout) it is kept as `urae_source_structure`, which minor_lora ignores and which becomes
    `urae_structure` again when a later conversion gives back the modules it names. sd-scripts'
    ss_network_dim / ss_network_alpha are the trained rank and alpha where that structure still holds (as
    minor_lora writes them; `urae_export_rank` is the rank of the tensors), else the written ranks (fusing
    q/k/v adds them).
    """
    meta = dict(meta)
    recs = lora_modules(tensors, source)
    ranks = {r["key"]: r["rank"] for r in recs}
    dim = max(ranks.values())
    scales = {round(r["scale"], 6) for r in recs}
    alpha = float(scales.pop() * dim) if len(scales) == 1 else None
    text = meta.pop("urae_structure", None) or meta.pop("urae_source_structure", None)
    kept = bool(text) and _describes(json.loads(text), ranks)
    if text:
        meta["urae_structure" if kept else "urae_source_structure"] = text
    if "urae_export_rank" in meta:
        meta["urae_export_rank"] = str(dim)
        meta["urae_export_alpha"] = str(alpha) if alpha is not None else "mixed"
    if kept and "urae_rank" in meta:
        trained = {"ss_network_dim": meta["urae_rank"], "ss_network_alpha": meta.get("urae_alpha")}
    else:
        trained = {"ss_network_dim": str(dim), "ss_network_alpha": str(alpha) if alpha is not None else "mixed"}
    for key, value in trained.items():
        if key in meta and value is not None:
            meta[key] = value
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m networks.convert_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output", help="output file; a folder (or a path ending in /) takes the input's file name")
    ap.add_argument("--to", choices=("peft", "kohya"), help="target form (default: peft for --from-urae-official)")
    ap.add_argument("--from-urae-official", action="store_true", help="input is an official URAE 4K adapter file")
    ap.add_argument("--base", help="with --from-urae-official: FLUX.1 diffusers folder or single-file transformer")
    ap.add_argument("--base-lora", help="with --from-urae-official: the 2K LoRA the 4K adapter was trained on")
    ap.add_argument("--exclude-base-lora", action="store_true", help="leave the 2K LoRA out of the output")
    ap.add_argument("--svd-device", help="with --from-urae-official: device for the SVDs, e.g. cuda (default cpu)")
    ap.add_argument("--skip-text-encoder", action="store_true", help="drop kohya text-encoder modules for --to peft")
    ap.add_argument("--save_dtype", "--save-dtype", choices=list(DTYPES),
                    help="dtype of the factors (default: the input's)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--no_metadata", "--no-metadata", action="store_true",
                    help="write only the metadata loaders read (runtime settings, resume structure), no training "
                         "record or names")
    a = ap.parse_args(argv)
    return run_cli(lambda: _run(a))


def _run(a) -> int:
    from urae.io import save_safetensors_atomic

    inputs = [a.input] + [p for p in (a.base_lora,) if p]
    output = output_path(a.output, overwrite=a.overwrite, name_in_folder=os.path.basename(a.input), inputs=inputs)
    sd, meta = read_lora(a.input)
    form = detect_form(sd, meta)
    dtype = parse_dtype(a.save_dtype)
    if a.from_urae_official:
        if form != "urae-official":
            raise UserError(f"{a.input} is a {form} LoRA, not an official URAE adapter "
                            f"(keys like transformer_blocks.0.attn.processor.to_q_a.weight)")
        if not a.base:
            raise UserError("--from-urae-official needs --base MODEL to recompute the minor components")
        mods = _official_modules(sd, a.input)
        print(f"{a.input}: official URAE adapter, {len(mods)} modules, rank "
              f"{sorted({g['a'].shape[0] for g in mods.values()})}; base {a.base}"
              + (f" + {a.base_lora}" if a.base_lora else "") + f" -> {output} ({a.to or 'peft'})")
        out, meta = import_official(sd, a.base, a.base_lora, not a.exclude_base_lora, a.input,
                                    svd_device=a.svd_device)
        if a.to == "kohya":
            out, meta = to_kohya(out, meta, a.input, dtype)
        elif dtype is not None:
            out, meta = to_peft(out, meta, a.input, dtype)
    else:
        if form == "urae-official":
            raise UserError(f"{a.input} is an official URAE adapter; add --from-urae-official --base MODEL")
        if not a.to:
            raise UserError("say which form to write: --to peft or --to kohya")
        recs = lora_modules(sd, a.input)
        print(f"{a.input}: {form} LoRA, {len(recs)} modules -> {output} ({a.to})")
        conv = to_kohya if a.to == "kohya" else to_peft
        kwargs = {"skip_text_encoder": a.skip_text_encoder} if a.to == "peft" else {}
        out, meta = conv(sd, meta, a.input, dtype, **kwargs)
    meta = output_metadata(refreshed_metadata(out, meta, a.input), a.no_metadata)
    if any(k.startswith("sshs_") for k in meta):  # sd-scripts' file hashes: recompute for the new tensors
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(out, meta)
    save_safetensors_atomic(out, output, meta)
    n = sum(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in out)
    print(f"wrote {output}: {n} modules")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
