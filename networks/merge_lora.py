"""Merge LoRA files into a FLUX transformer checkpoint, or combine LoRA files into one LoRA.

    python -m networks.merge_lora MODEL OUT --lora a.safetensors[:SCALE] [--lora b.safetensors:0.5 ...]
        [--save_dtype bf16]
    python -m networks.merge_lora --lora-only OUT --lora a.safetensors --lora b.safetensors:0.5 [--to peft]

MODEL is a diffusers FLUX.1 folder (the pipeline, or its `transformer/` folder; the output is the
same kind of folder, other components copied) or a single-file transformer (BFL layout as
flux1-dev.safetensors, or diffusers names); the output keeps that layout, sharding and the stored
dtype of each tensor unless --save_dtype is given. Tensors are streamed one at a time (a FLUX.1-dev
transformer is ~24 GB): each changed weight is computed in fp32 as W + Σ scale·ΔW and rounded once.

Outputs: a single-file MODEL gives a file; OUT ending in a slash (or an existing folder) means "inside
this folder, under MODEL's file name". An existing output is replaced only with --overwrite. The free
space beside OUT is checked before any work (one model size is needed); the output is written to a
temporary name and renamed only when complete, and Ctrl-C or SIGTERM removes the partial file. The
merged files record the LoRAs they hold by file name, sha256, scale and rank (`urae_merged_loras`,
which extract_lora reads); --no_metadata leaves that out.

--lora-only concatenates ranks (down = [d1; d2; ...], up = [s1·u1 | s2·u2 | ...] with each file's
alpha/rank and scale folded into up, alpha = total rank), so its ΔW is exactly Σ scale·ΔW.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from networks.convert_lora import NotBlockDiagonalError, to_kohya, to_peft
from networks.inspect_lora import detect_form, lora_modules, read_lora
from networks.lora_files import (
    DTYPES,
    ST_NAMES,
    Checkpoint,
    UserError,
    check_free_space,
    file_record,
    human_size,
    output_folder,
    output_metadata,
    output_path,
    progress_bar,
    replace_folder,
    run_cli,
    user_errors,
    write_safetensors_streaming,
)
from networks.minor_lora import TargetMap
from urae.io import save_safetensors_atomic, set_default_mode

# --------------------------------------------------------------------------------------------
# Merging into a checkpoint
# --------------------------------------------------------------------------------------------


def parse_lora_arg(spec: str) -> tuple[str, float]:
    """'file.safetensors[:scale]' -> (file, scale)."""
    path, _, scale = spec.rpartition(":")
    if path and not os.path.exists(spec):
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def _deltas(ck: Checkpoint, loras: list[tuple[str, float]]) -> tuple[dict[str, list], list[dict]]:
    """({checkpoint module: [(first row, last row, down, up·scale)]}, a record per file), checked against the model."""
    tmap = TargetMap(ck.linear_shapes())
    items: dict[str, list] = {}
    records = []
    for path, scale in loras:
        sd, meta = read_lora(path)
        te = {k.rsplit(".", 2)[0] for k in sd if k.startswith(("lora_te", "text_encoder"))}
        if te:
            print(f"note: {path}: {len(te)} text-encoder modules are not merged (transformer only)", file=sys.stderr)
        # The rank per diffusers Linear (what extract_lora needs to hold this change), before any fusing.
        try:
            peft = to_peft(sd, meta, os.fspath(path), skip_text_encoder=True)[0]
        except NotBlockDiagonalError:
            peft = None  # a fused LoRA that is not block-diagonal: TargetMap applies it to the q/k/v rows as it is
        rank = max(v.shape[0] for k, v in (peft or sd).items() if k.endswith((".lora_A.weight", ".lora_down.weight")))
        # In the checkpoint's own naming, global layers (x_embedder/img_in, norm_out/final_layer) map too.
        if ck.layout == "diffusers" and peft is not None:
            sd = peft
        elif ck.layout == "bfl":
            try:
                sd = to_kohya(sd, meta, os.fspath(path))[0]
            except NotBlockDiagonalError:
                pass
        with user_errors(os.fspath(path)):
            resolved = tmap.resolve(sd, scale, source=os.fspath(path))
        for m, a, b, down, up in resolved:
            items.setdefault(m, []).append((a, b, down, up))
        rec = {**file_record(path), "scale": scale, "rank": rank}
        if meta.get("urae_init"):
            rec.update(init=meta["urae_init"], trained_rank=int(meta.get("urae_rank", 0)))
        records.append(rec)
    return items, records


def _merged(ck: Checkpoint, key: str, deltas: dict, dtype) -> tuple[torch.Tensor, bool]:
    """The written tensor, and whether it differs from the input's (a change below the output's rounding,
    or a scale of 0, leaves a targeted weight bit-identical, which the summary must not count)."""
    t = ck.tensor(key)
    items = deltas.get(ck.strip(key)[: -len(".weight")]) if key.endswith(".weight") else None
    w = t
    if items:
        w = t.to(torch.float32, copy=True)  # t stays the input's values to compare against
        for a, b, down, up in items:
            w[a:b] += up @ down
    out = w.to(dtype) if dtype is not None and w.is_floating_point() else w.to(ST_NAMES[ck.info[key][0]])
    return out, bool(items) and not torch.equal(out, t.to(out.dtype))


def _entries(ck: Checkpoint, f: Path, dtype) -> list:
    out = []
    for k in ck.keys(f):
        st, shape = ck.info[k]
        d = ST_NAMES[st]
        out.append((k, dtype if dtype is not None and d.is_floating_point else d, shape))
    return out


def merge_into_checkpoint(model, out, loras: list[tuple[str, float]], save_dtype=None, progress: bool = True,
                          overwrite: bool = False, metadata: bool = True) -> dict:
    """Write `model` + Σ scale·ΔW to `out` in the input's layout; returns a small summary.

    A single-file model gives a file (inside OUT when OUT is a folder or ends in a slash), a diffusers
    folder a folder. An existing output is replaced only with `overwrite`. With `metadata`, each written
    file records the merged LoRAs by name, hash, scale and rank (`urae_merged_loras`).
    """
    with Checkpoint(model) as ck:
        if ck.root is None:
            out = output_path(out, overwrite=overwrite, name_in_folder=ck.path.name, inputs=[ck.path])
        else:
            out = output_folder(out, overwrite=overwrite, inputs=[ck.path])
        deltas, records = _deltas(ck, loras)
        skip = set(ck.files) | set(ck.other_weights)
        copied = sum(p.stat().st_size for p in ck.root.rglob("*") if p.is_file() and p not in skip) if ck.root else 0
        need = ck.output_bytes(save_dtype) + copied
        check_free_space(out, need, "the merged model")
        total = sum(len(ck.keys(f)) for f in ck.files)
        bar = progress_bar(desc="merging tensors", enabled=progress, total=total)
        changed = []

        def produce(k):
            bar.update(1)
            t, differs = _merged(ck, k, deltas, save_dtype)
            changed.extend([k] if differs else [])
            return t

        def file_meta(f):
            meta = dict(ck.metadata[f])
            if metadata:
                meta["urae_merged_loras"] = json.dumps(records)
            return meta

        try:
            _write(ck, out, produce, file_meta, save_dtype, skip)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise UserError(f"{out}: the disk filled up while writing (the merged model needs about "
                            f"{human_size(need)} beside the output); the partial output was removed") from e
        bar.close()
        return {"layout": ck.layout, "changed_weights": len(changed), "targeted_weights": len(deltas),
                "tensors": total, "output": out}


def _write(ck: Checkpoint, out: Path, produce, file_meta, save_dtype, skip: set) -> None:
    """The merged checkpoint at `out`: one streamed file, or a folder built beside it and renamed into place."""
    if ck.root is None:
        write_safetensors_streaming(out, _entries(ck, ck.files[0], save_dtype), produce, file_meta(ck.files[0]))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rel = ck.weights_dir.relative_to(ck.root)
        if ck.other_weights:  # copying them unmerged would let a variant load the old weights
            print(f"note: not copied (other copies of the transformer weights): "
                  f"{', '.join(f.name for f in ck.other_weights)}", file=sys.stderr)
        _copy_tree(ck.root, tmp, skip=skip)
        for f in ck.files:
            write_safetensors_streaming(tmp / rel / f.name, _entries(ck, f, save_dtype), produce, file_meta(f))
        _fix_index(tmp / rel, save_dtype)
        set_default_mode(tmp)
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _copy_tree(src: Path, dst: Path, skip: set) -> None:
    """Copy a diffusers folder except the weight files being rewritten.

    Real copies, not hard links: a later save_pretrained into the output would write through a link
    into the input model.
    """
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif p not in skip:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)


def _fix_index(wdir: Path, dtype) -> None:
    """A sharded model's index records the total byte size, which a dtype change alters."""
    for idx in wdir.glob("*.safetensors.index.json"):
        data = json.loads(idx.read_text())
        total = 0
        for f in set(data.get("weight_map", {}).values()):
            with open(wdir / f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
            total += (wdir / f).stat().st_size - 8 - n
        data.setdefault("metadata", {})["total_size"] = total
        idx.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Combining LoRA files
# --------------------------------------------------------------------------------------------


def combine_loras(loras: list[tuple[str, float]], form: str | None = None, dtype=None) -> tuple[dict, dict]:
    """One standard LoRA with ΔW = Σ scale·ΔW_i, by rank concatenation per module (scales folded into up)."""
    files = []
    for path, scale in loras:
        sd, meta = read_lora(path)
        if detect_form(sd, meta) == "urae-official":
            raise UserError(f"{path} is an official URAE adapter; convert it first (networks.convert_lora)")
        files.append((path, scale, sd, meta))
    if form is None:
        form = lora_modules(files[0][2], files[0][0])[0]["form"]
    conv = to_kohya if form == "kohya" else to_peft
    groups: dict[str, list] = {}
    out_dtype = dtype
    for path, scale, sd, meta in files:
        try:
            sd, _ = conv(sd, meta, os.fspath(path))
        except NotBlockDiagonalError as e:
            raise UserError(f"{e} To combine, use --to kohya.") from e
        for r in lora_modules(sd, os.fspath(path)):
            groups.setdefault(r["key"], []).append((r["down"].float(), r["up"].float() * (r["scale"] * scale)))
            out_dtype = out_dtype or r["down"].dtype
    out = {}
    a, b = (".lora_down.weight", ".lora_up.weight") if form == "kohya" else (".lora_A.weight", ".lora_B.weight")
    for key, items in groups.items():
        if len({u.shape[0] for _, u in items}) != 1 or len({d.shape[1] for d, _ in items}) != 1:
            raise UserError(f"{key}: the files disagree on its shape; they are LoRAs for different models")
        down, up = torch.cat([d for d, _ in items]), torch.cat([u for _, u in items], 1)
        out[key + a], out[key + b] = down.to(out_dtype), up.to(out_dtype)
        out[key + ".alpha"] = torch.tensor(float(down.shape[0]))
    ranks = {v.shape[0] for k, v in out.items() if k.endswith(a)}
    first = files[0][3]
    meta = {k: v for k, v in first.items() if k.startswith("ss_base") or k == "urae_runtime"}
    meta.update({"ss_network_dim": str(max(ranks)), "ss_network_alpha": "scale 1 (alpha = rank per module)",
                 "urae_merged_from": json.dumps([{**file_record(p), "scale": s} for p, s in loras])})
    return out, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m networks.merge_lora", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="MODEL OUT to merge into a checkpoint; OUT alone with --lora-only")
    ap.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]", help="repeatable")
    ap.add_argument("--lora-only", action="store_true", help="combine the LoRA files into one LoRA file")
    ap.add_argument("--to", choices=("peft", "kohya"), help="--lora-only: output form (default: the first file's)")
    ap.add_argument("--save_dtype", "--save-dtype", choices=list(DTYPES),
                    help="dtype of the written tensors (default: each tensor's own)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file or folder")
    ap.add_argument("--no_metadata", "--no-metadata", action="store_true",
                    help="record nothing about the merged files; --lora-only: write only what loaders read")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    return run_cli(lambda: _run(a))


def _run(a) -> int:
    loras = [parse_lora_arg(s) for s in a.lora]
    dtype = DTYPES.get(a.save_dtype)
    for p, _ in loras:
        if not os.path.isfile(p):
            raise UserError(f"{p}: no such LoRA file")
    if a.lora_only:
        if len(a.paths) != 1:
            raise UserError("--lora-only takes one positional argument: OUT")
        out = output_path(a.paths[0], overwrite=a.overwrite, inputs=[p for p, _ in loras])
        print(f"combining {len(loras)} LoRA files ({', '.join(f'{p} x{s:g}' for p, s in loras)}) -> {out}")
        tensors, meta = combine_loras(loras, a.to, dtype)
        save_safetensors_atomic(tensors, out, output_metadata(meta, a.no_metadata))
        ranks = [v.shape[0] for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))]
        print(f"wrote {out}: {len(ranks)} modules, ranks {min(ranks)}-{max(ranks)}")
        return 0
    if len(a.paths) != 2:
        raise UserError("give MODEL and OUT (or --lora-only OUT)")
    model, out = a.paths
    print(f"merging {len(loras)} LoRA file(s) ({', '.join(f'{p} x{s:g}' for p, s in loras)}) into {model} "
          f"-> {out}" + (f" as {a.save_dtype}" if a.save_dtype else ""))
    info = merge_into_checkpoint(model, out, loras, dtype, progress=not a.no_progress, overwrite=a.overwrite,
                                 metadata=not a.no_metadata)
    same = info["targeted_weights"] - info["changed_weights"]
    print(f"wrote {info['output']}: {info['changed_weights']} weights changed of {info['tensors']} tensors "
          f"({info['layout']} layout)" + (f"; {same} weight(s) the LoRAs target came out bit-identical "
                                          f"(scale 0, or a change below the output dtype's rounding)" if same else ""))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
