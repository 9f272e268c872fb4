"""Merge LoRA files into a FLUX transformer checkpoint, or combine LoRA files into one LoRA.

    python -m networks.merge_lora MODEL OUT --lora a.safetensors[:SCALE] [--lora b.safetensors:0.5 ...]
        [--save_dtype bf16]
    python -m networks.merge_lora --lora-only OUT --lora a.safetensors --lora b.safetensors:0.5 [--to peft]

MODEL is a diffusers FLUX.1 folder (the pipeline, or its `transformer/` folder; the output is the
same kind of folder, other components copied) or a single-file transformer (BFL layout as
flux1-dev.safetensors, or diffusers names); the output keeps that layout, sharding and the stored
dtype of each tensor unless --save_dtype is given. Tensors are streamed one at a time (a FLUX.1-dev
transformer is ~24 GB): each changed weight is computed in fp32 as W + Σ scale·ΔW and rounded once.
Outputs are written to a temporary name and renamed only when complete.

--lora-only concatenates ranks (down = [d1; d2; ...], up = [s1·u1 | s2·u2 | ...] with each file's
alpha/rank and scale folded into up, alpha = total rank), so its ΔW is exactly Σ scale·ΔW.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

from networks.inspect_lora import FINAL_BFL, FINAL_DIFFUSERS
from networks.minor_lora import TargetMap, bfl_equivalents, bfl_row_sizes, detect_layout
from urae.flux_keys import BFL_PREFIXES, linear_pairs
from urae.io import atomic_path, set_default_mode

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DEFAULT_WEIGHTS = re.compile(r"^diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors$")
_OTHER_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt)$|\.index\..+\.json$")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def progress_bar(items=None, desc: str = "", enabled: bool = True, total: int | None = None):
    """tqdm over `items` (or a manual bar of `total` steps); a no-op stand-in without tqdm or when disabled."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(items, desc=desc, total=total, leave=False)
        except ImportError:
            pass
    if items is not None:
        return items

    class _Null:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Null()


# --------------------------------------------------------------------------------------------
# Reading a checkpoint tensor by tensor
# --------------------------------------------------------------------------------------------


class Checkpoint:
    """A FLUX transformer checkpoint (diffusers folder, sharded or not, or one .safetensors file) read lazily."""

    def __init__(self, path):
        self.path = Path(os.fspath(path)).expanduser()
        self.root = self.weights_dir = None
        self.other_weights: list[Path] = []
        if self.path.is_dir():
            self.root = self.path
            tdir = self.path / "transformer" if (self.path / "model_index.json").is_file() else self.path
            # The default weights only: variants (.fp16.safetensors) and .bin copies hold the same tensors.
            files = sorted(f for f in tdir.glob("*.safetensors") if _DEFAULT_WEIGHTS.match(f.name))
            if not files:
                raise FileNotFoundError(f"{self.path}: no transformer .safetensors files in {tdir}; expected a "
                                        f"diffusers FLUX.1 folder or a single-file checkpoint")
            self.weights_dir = tdir
            self.other_weights = sorted(f for f in tdir.iterdir() if f not in files and _OTHER_WEIGHTS.search(f.name))
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"{self.path}: no such file or folder")
        self.files = files
        self._stack = ExitStack()
        self._handles = {}
        self.key_file: dict[str, Path] = {}
        self.info: dict[str, tuple[str, list[int]]] = {}
        self.metadata: dict[Path, dict] = {}
        from safetensors import safe_open

        for f in files:
            try:
                h = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:
                self._stack.close()
                raise ValueError(f"{f}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
            self._handles[f] = h
            self.metadata[f] = dict(h.metadata() or {})
            for k in h.keys():
                sl = h.get_slice(k)
                self.info[k] = (sl.get_dtype(), list(sl.get_shape()))
                self.key_file[k] = f
        self.prefix = next((p for p in BFL_PREFIXES if any(k.startswith(p) for k in self.info)), "")
        try:
            self.layout = detect_layout(self._strip(k) for k in self.info)
        except ValueError as e:
            self._stack.close()
            raise ValueError(f"{self.path}: {e}") from e
        self._cache = (None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stack.close()

    def _strip(self, key: str) -> str:
        return key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key

    def tensor(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.key_file[key]].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{self.key_file[key]}: could not read {key} (truncated or corrupt file?): {e}") from e

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """{module (checkpoint layout, prefix stripped): (out, in)} of every 2-D `.weight`."""
        return {self._strip(k)[: -len(".weight")]: (s[0], s[1]) for k, (_, s) in self.info.items()
                if k.endswith(".weight") and len(s) == 2}

    def _diffusers_map(self) -> dict[str, tuple[str, int, int]]:
        """diffusers Linear -> (checkpoint module, first row, last row) in this checkpoint's layout."""
        shapes = self.linear_shapes()
        if self.layout == "diffusers":
            return {m: (m, 0, s[0]) for m, s in shapes.items()}
        res = {}
        for bfl, names in linear_pairs(0, 0):
            if bfl in shapes:
                res[names[0]] = (bfl, 0, shapes[bfl][0])
        if FINAL_BFL in shapes:  # read back with its halves swapped, see diffusers_weight
            res[FINAL_DIFFUSERS] = (FINAL_BFL, 0, shapes[FINAL_BFL][0])
        for m, (out, inn) in shapes.items():
            eq = bfl_equivalents(m)
            if not eq:
                continue
            pos = 0
            for d, size in zip(eq, bfl_row_sizes(m, out, inn)):
                res[d] = (m, pos, pos + size)
                pos += size
        return res

    def diffusers_linear_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = self.linear_shapes()
        return {d: (b - a, shapes[m][1]) for d, (m, a, b) in self._diffusers_map().items()}

    def diffusers_weight(self, name: str) -> torch.Tensor:
        """The weight of one diffusers-named Linear (a row slice of a fused BFL weight in that layout)."""
        if not hasattr(self, "_dmap"):
            self._dmap = self._diffusers_map()
        m, a, b = self._dmap[name]
        if self._cache[0] != m:  # q, k, v of a fused weight come one after another: read it once
            self._cache = (m, self.tensor(self.prefix + m + ".weight"))
        w = self._cache[1][a:b]
        if m == FINAL_BFL and self.layout == "bfl":  # BFL (shift, scale) vs diffusers (scale, shift)
            w = torch.cat(w.chunk(2)[::-1])
        return w


# --------------------------------------------------------------------------------------------
# Writing a .safetensors file one tensor at a time
# --------------------------------------------------------------------------------------------


def write_safetensors_streaming(path, entries: list[tuple[str, torch.dtype, list[int]]], produce,
                                metadata: dict | None = None) -> None:
    """Write `entries` (name, dtype, shape) in order, asking `produce(name)` for each tensor only when
    it is written, so memory holds one tensor at a time. Atomic: a temp file renamed at the end."""
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


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


def _deltas(ck: Checkpoint, loras: list[tuple[str, float]]) -> dict[str, list]:
    """{checkpoint module: [(first row, last row, down, up·scale)]} for every LoRA, checked against the model."""
    from networks.convert_lora import NotBlockDiagonalError, to_kohya, to_peft
    from networks.inspect_lora import read_lora

    tmap = TargetMap(ck.linear_shapes())
    items: dict[str, list] = {}
    for path, scale in loras:
        sd, meta = read_lora(path)
        te = {k.rsplit(".", 2)[0] for k in sd if k.startswith(("lora_te", "text_encoder"))}
        if te:
            print(f"note: {path}: {len(te)} text-encoder modules are not merged (transformer only)", file=sys.stderr)
        # In the checkpoint's own naming, global layers (x_embedder/img_in, norm_out/final_layer) map too.
        try:
            if ck.layout == "bfl":
                sd = to_kohya(sd, meta, os.fspath(path))[0]
            else:
                sd = to_peft(sd, meta, os.fspath(path), skip_text_encoder=True)[0]
        except NotBlockDiagonalError:
            pass  # a fused LoRA that is not block-diagonal: TargetMap applies it to the q/k/v rows as it is
        for m, a, b, down, up in tmap.resolve(sd, scale, source=os.fspath(path)):
            items.setdefault(m, []).append((a, b, down, up))
    return items


def _merged(ck: Checkpoint, key: str, deltas: dict, dtype) -> torch.Tensor:
    t = ck.tensor(key)
    items = deltas.get(ck._strip(key)[: -len(".weight")]) if key.endswith(".weight") else None
    if items:
        w = t.float()
        for a, b, down, up in items:
            w[a:b] += up @ down
        t = w
    if dtype is not None and t.is_floating_point():
        return t.to(dtype)
    return t.to(_ST_NAMES[ck.info[key][0]])


def _entries(ck: Checkpoint, f: Path, dtype) -> list:
    out = []
    for k in ck._handles[f].keys():
        st, shape = ck.info[k]
        d = _ST_NAMES[st]
        out.append((k, dtype if dtype is not None and d.is_floating_point else d, shape))
    return out


def merge_into_checkpoint(model, out, loras: list[tuple[str, float]], save_dtype=None, progress: bool = True) -> dict:
    """Write `model` + Σ scale·ΔW to `out` in the input's layout; returns a small summary."""
    out = Path(os.fspath(out))
    with Checkpoint(model) as ck:
        if out.resolve() == ck.path.resolve():
            raise ValueError("output would overwrite the input model; choose another path")
        deltas = _deltas(ck, loras)
        total = sum(len(ck._handles[f].keys()) for f in ck.files)
        bar = progress_bar(desc="merging tensors", enabled=progress, total=total)

        def produce(k):
            bar.update(1)
            return _merged(ck, k, deltas, save_dtype)

        if ck.root is None:
            if out.exists() and out.is_dir():
                raise ValueError(f"{out} is a folder; the input is a single file, so give a file name")
            write_safetensors_streaming(out, _entries(ck, ck.files[0], save_dtype), produce, ck.metadata[ck.files[0]])
        else:
            if out.exists():
                raise FileExistsError(f"{out} already exists; choose a new folder")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            try:
                rel = ck.weights_dir.relative_to(ck.root)
                if ck.other_weights:  # copying them unmerged would let a variant load the old weights
                    print(f"note: not copied (other copies of the transformer weights): "
                          f"{', '.join(f.name for f in ck.other_weights)}", file=sys.stderr)
                _copy_tree(ck.root, tmp, skip=set(ck.files) | set(ck.other_weights))
                for f in ck.files:
                    write_safetensors_streaming(tmp / rel / f.name, _entries(ck, f, save_dtype), produce,
                                                ck.metadata[f])
                _fix_index(tmp / rel, save_dtype)
                set_default_mode(tmp)
                tmp.rename(out)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        bar.close()
        return {"layout": ck.layout, "changed_weights": len(deltas), "tensors": total}


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
    from networks.convert_lora import NotBlockDiagonalError, to_kohya, to_peft
    from networks.inspect_lora import detect_form, lora_modules, read_lora

    files = []
    for path, scale in loras:
        sd, meta = read_lora(path)
        if detect_form(sd, meta) == "urae-official":
            raise ValueError(f"{path} is an official URAE adapter; convert it first (networks.convert_lora)")
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
            raise ValueError(f"{e}\n-> combine in kohya form instead: --to kohya") from e
        for r in lora_modules(sd, os.fspath(path)):
            groups.setdefault(r["key"], []).append((r["down"].float(), r["up"].float() * (r["scale"] * scale)))
            out_dtype = out_dtype or r["down"].dtype
    out = {}
    a, b = (".lora_down.weight", ".lora_up.weight") if form == "kohya" else (".lora_A.weight", ".lora_B.weight")
    for key, items in groups.items():
        if len({u.shape[0] for _, u in items}) != 1 or len({d.shape[1] for d, _ in items}) != 1:
            raise ValueError(f"{key}: the files disagree on its shape; they are LoRAs for different models")
        down, up = torch.cat([d for d, _ in items]), torch.cat([u for _, u in items], 1)
        out[key + a], out[key + b] = down.to(out_dtype), up.to(out_dtype)
        out[key + ".alpha"] = torch.tensor(float(down.shape[0]))
    ranks = {v.shape[0] for k, v in out.items() if k.endswith(a)}
    first = files[0][3]
    meta = {k: v for k, v in first.items() if k.startswith("ss_base") or k == "urae_runtime"}
    meta.update({"ss_network_dim": str(max(ranks)), "ss_network_alpha": "scale 1 (alpha = rank per module)",
                 "urae_merged_from": json.dumps([[os.path.basename(os.fspath(p)), s] for p, s in loras])})
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
    ap.add_argument("--save_dtype", "--save-dtype", choices=sorted(DTYPES), help="dtype of the written tensors")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    loras = [parse_lora_arg(s) for s in a.lora]
    dtype = DTYPES.get(a.save_dtype)
    from urae.io import save_safetensors_atomic

    try:
        if a.lora_only:
            if len(a.paths) != 1:
                raise ValueError("--lora-only takes one positional argument: OUT")
            out = a.paths[0]
            if any(os.path.abspath(out) == os.path.abspath(p) for p, _ in loras):
                raise ValueError("output would overwrite an input; choose another path")
            print(f"combining {len(loras)} LoRA files ({', '.join(f'{p} x{s:g}' for p, s in loras)}) -> {out}")
            tensors, meta = combine_loras(loras, a.to, dtype)
            save_safetensors_atomic(tensors, out, meta)
            ranks = [v.shape[0] for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))]
            print(f"wrote {out}: {len(ranks)} modules, ranks {min(ranks)}-{max(ranks)}")
        else:
            if len(a.paths) != 2:
                raise ValueError("give MODEL and OUT (or --lora-only OUT)")
            model, out = a.paths
            print(f"merging {len(loras)} LoRA file(s) ({', '.join(f'{p} x{s:g}' for p, s in loras)}) into {model} "
                  f"-> {out}" + (f" as {a.save_dtype}" if a.save_dtype else ""))
            info = merge_into_checkpoint(model, out, loras, dtype, progress=not a.no_progress)
            print(f"wrote {out}: {info['changed_weights']} weights changed of {info['tensors']} tensors "
                  f"({info['layout']} layout)")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
