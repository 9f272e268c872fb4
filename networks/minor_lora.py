"""Minor-component LoRA for FLUX.1 (URAE), as a kohya sd-scripts network module.

    accelerate launch flux_train_network.py ... --network_module networks.minor_lora \
        --network_dim 16 --network_alpha 16 --network_args "init=minor" "targets=urae"

Self-contained (torch, safetensors and the standard library only) so this file can be copied alone
into an sd-scripts checkout.

Maths (torch convention: W is [out, in], y = x W^T + b; scale s = alpha / r):
  * init=minor: the r smallest singular triplets of W; init=major: the r largest; init=plain:
    zero up and a random down, Kaiming-uniform as kohya (plain_init=kaiming) or N(0, 1/r^2) as
    PEFT's init_lora_weights="gaussian" (plain_init=gaussian, the public URAE 2K run).
    For minor/major the frozen copies up0/down0 satisfy s*up0*down0 = W_r.
  * The base weight is never modified. Forward adds
        s * ((x down^T) up^T - (x down0^T) up0^T),
    evaluated as s * ((x (down - down0)^T) up^T + (x down0^T) (up - up0)^T): the same value and the
    same gradients, but exactly zero at step 0 whatever the GEMM kernel does with rounding.
  * The trained change is a standard rank-2r LoRA, exactly: s * [up | -up0] [down ; down0].
    Files are written in that form (file alpha = s * 2r), so every LoRA loader applies them;
    `urae_*` metadata lets this module split them back and resume training exactly. A network
    trained at rank r (ss_network_dim, urae_rank) is therefore stored at rank 2r (urae_export_rank):
    r trained plus r frozen components; a plain network is stored at rank r.

Layouts: diffusers `FluxTransformer2DModel` names (files in diffusers/PEFT form) and the original
BFL names that sd-scripts uses (files in kohya form). In the BFL layout fused weights (`qkv`,
`linear1`) are adapted per row slice, each slice with its own SVD, so both layouts produce the
same adapters. A fused target is stored fused: down = stacked slice downs, up = block diagonal,
with zero rows for rows that are not adapted (the MLP rows of `linear1`).

network_args (all strings, as sd-scripts passes them):
  init=minor|major|plain     targets=urae|attn|all|<regex>      svd_device=cpu|cuda[:N]
  plain_init=kaiming|gaussian (init=plain only; recorded in files, resume checks it)
  rank_pattern="regex:16;regex2:0"   alpha_pattern="regex:8"   (first match wins, rank 0 skips)
  dropout / rank_dropout / module_dropout (as sd-scripts; they act on the change only)
  init_cache=path            base_lora=path (a LoRA the SVD sees on top of W, applied frozen; see below)
  svd_weights=path           full-precision transformer (file or folder of shards) the SVD reads W from,
                             for a base stored in fp8
  train_t5xxl=True           runtime='{"ntk_factor": 10, ...}' (stored in saved files)
  loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio

A custom target regex is searched in the diffusers name of each slice (`transformer_blocks.3.attn.to_q`)
and in its native label (`double_blocks.3.img_attn.qkv:q`; fused slices are q, k, v, mlp).

base_lora: its delta is added to W (fp64) only to take the SVD; W itself stays untouched and the
delta is applied in forward as a frozen extra term (scaled by the multiplier, never dropped).
Saved files contain base delta + trained change, so the result of a 2K (r16) + 4K (r16 minor)
run is one standard LoRA of rank 16 + 32 = 48.

Memory options of a trainer: the adapter keeps no reference to the base weight's storage, device or
dtype, so the base Linear may store its weight in float8 and upcast it in a forward hook, or move it
between host and GPU (block swap). The minor/major SVD needs the full-precision W: run it before the
weights are quantised, or give it the weights (`svd_weights=`, `set_svd_weights`).

Parts of this file, each readable alone: names and parsers; layouts; targets (which rows get which
adapter); reading LoRA files; SVD initialisation (SVDInit); the adapter of one Linear; optimizer
groups; file export/import; merging; the network (which delegates to those parts); entry points.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Names, tables and parsers
# --------------------------------------------------------------------------------------------

NETWORK_MODULE = "networks.minor_lora"
PREFIX_UNET = "lora_unet"
PREFIX_TE = ("lora_te1", "lora_te3")  # CLIP-L, T5-XXL: sd-scripts' lora_flux and ComfyUI names
LEGACY_PREFIX_T5 = "lora_te2"  # T5 in older sd-scripts FLUX LoRAs, still read
PEFT_UNET = "transformer"
PEFT_TE = ("text_encoder", "text_encoder_2")
INITS = ("minor", "major", "plain")
PLAIN_INITS = ("kaiming", "gaussian")

# This file must work copied alone into sd-scripts, so it keeps its own dtype-name table, boolean parser and
# count formatter (urae.common.human_count) instead of importing the project's: the one accepted duplicate
# of each.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def as_bool(v, name: str = "value") -> bool:
    """sd-scripts passes network_args as strings ("True"); anything but a clear yes/no is an error."""
    if isinstance(v, str):
        low = v.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(f"{name}={v!r}: expected true or false")
    return bool(v)


def as_dtype(v) -> torch.dtype | None:
    """None, a torch dtype, or a name from DTYPES ("bf16", "float16", ...)."""
    if v is None or isinstance(v, torch.dtype):
        return v
    if str(v).lower() in DTYPES:
        return DTYPES[str(v).lower()]
    raise ValueError(f"dtype {v!r}: expected one of {sorted(DTYPES)}")


def _as_float(v):
    return None if v is None or v == "None" else float(v)


def format_count(n: int) -> str:
    """A parameter count as people read it (3 significant digits): 512, 7.17 K, 18.7 M, 1.2 B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return str(int(n))


def _parse_patterns(spec) -> list[tuple[re.Pattern, float]]:
    """'regex:16;regex2:8' (or a dict) -> [(compiled, value)]; '=' is avoided because sd-scripts splits on it."""
    if not spec:
        return []
    items = spec.items() if isinstance(spec, dict) else (p.rsplit(":", 1) for p in str(spec).split(";") if p.strip())
    out = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"bad pattern entry {item!r}: expected 'regex:value'")
        pat, val = item
        out.append((re.compile(pat.strip()), float(val)))
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc)
        except ImportError:  # the progress bar is optional
            pass
    return iterable


def _dist():
    """torch.distributed when a process group is up, else None."""
    ok = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed if ok else None


# --------------------------------------------------------------------------------------------
# Layouts: diffusers and BFL module names
# --------------------------------------------------------------------------------------------

# Target presets, matched against the diffusers name of each (slice of a) Linear.
TARGET_PRESETS = {
    "urae": r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"
    r"|^single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$",
    "attn": r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
    r"|^single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$",
    "all": r"^(single_)?transformer_blocks\.\d+\.",
}

# BFL module (within a block) -> diffusers modules whose rows it concatenates, in order.
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_SINGLE = {
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
}
_SLICE_LABELS = ("q", "k", "v", "mlp")
_BFL_RE = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)$")


def bfl_equivalents(name: str) -> list[str] | None:
    """Diffusers names whose rows a BFL block Linear concatenates (None outside the table)."""
    m = _BFL_RE.match(name)
    if not m:
        return None
    kind, idx, rest = m.groups()
    table, prefix = (_DOUBLE, "transformer_blocks") if kind == "double" else (_SINGLE, "single_transformer_blocks")
    if rest not in table:
        return None
    return [f"{prefix}.{idx}.{d}" for d in table[rest]]


def bfl_row_sizes(name: str, out_features: int, in_features: int) -> list[int]:
    """Row sizes of a fused BFL Linear: qkv = 3 equal parts; linear1 = q, k, v (hidden each) + MLP."""
    eq = bfl_equivalents(name) or [name]
    if len(eq) == 1:
        return [out_features]
    if len(eq) == 3:
        if out_features % 3:
            raise ValueError(f"{name}: fused qkv with {out_features} rows is not divisible by 3")
        return [out_features // 3] * 3
    return [in_features] * 3 + [out_features - 3 * in_features]


def detect_layout(names) -> str:
    names = list(names)
    if any(n.startswith("double_blocks.") or n.startswith("single_blocks.") for n in names):
        return "bfl"
    if any(n.startswith("transformer_blocks.") or n.startswith("single_transformer_blocks.") for n in names):
        return "diffusers"
    raise ValueError(
        "not a FLUX transformer: no `double_blocks.N` (BFL) or `transformer_blocks.N` (diffusers) modules found"
    )


def _kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _to_bfl_block(diffusers_name: str) -> str | None:
    m = re.match(r"^(single_)?transformer_blocks\.(\d+)\.", diffusers_name)
    if not m:
        return None
    return f"{'single' if m.group(1) else 'double'}_blocks.{m.group(2)}.x"


def _linear_modules(root: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear)}


def _te_linears(te: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers inside the encoder layers of CLIP (`.layers.`) or T5 (`.block.`)."""
    return {n: m for n, m in _linear_modules(te).items() if ".layers." in n or ".block." in n}


def _as_list(text_encoders) -> list:
    tes = list(text_encoders or []) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    return [t for t in tes if t is not None]


def _shapes(modules: dict[str, nn.Linear]) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in modules.items()}


# --------------------------------------------------------------------------------------------
# Targets: which rows of which Linear get an adapter, with which rank, alpha and init
# --------------------------------------------------------------------------------------------


@dataclass
class SliceSpec:
    """Rows [start, stop) of a Linear adapted with their own rank, alpha and init."""

    label: str  # native name: the module, or `module:q` for a slice of a fused BFL weight
    equiv: str  # the diffusers name of the same rows
    start: int
    stop: int
    rank: int
    alpha: float
    init: str

    def __post_init__(self):
        self.start, self.stop, self.rank, self.alpha = int(self.start), int(self.stop), int(self.rank), float(self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def frozen(self) -> bool:
        """Minor/major slices keep frozen copies of their initial factors."""
        return self.init in ("minor", "major")

    def to_json(self) -> dict:
        return {"label": self.label, "equiv": self.equiv, "rows": [self.start, self.stop], "rank": self.rank,
                "alpha": self.alpha, "init": self.init}

    @classmethod
    def from_json(cls, d: dict) -> SliceSpec:
        return cls(d["label"], d["equiv"], d["rows"][0], d["rows"][1], d["rank"], d["alpha"], d["init"])


class SlicePlace(NamedTuple):
    """Where a slice sits before rank and init are chosen."""

    label: str
    equiv: str
    start: int
    stop: int


class Target(NamedTuple):
    """One adapted Linear: its adapter's name, the module, and the row slices it adapts."""

    lora_name: str
    path: str  # the module's name inside the transformer or its text encoder
    module: nn.Linear
    slices: list[SliceSpec]
    te: int | None = None  # text encoder index, None for the transformer


def slice_places(name: str, out: int, inn: int, layout: str) -> list[SlicePlace]:
    """The row slices of one transformer Linear: the whole weight, or q/k/v(/mlp) of a fused BFL weight."""
    if layout == "diffusers":
        return [SlicePlace(name, name, 0, out)]
    eq = bfl_equivalents(name)
    if not eq:
        return [SlicePlace(name, name, 0, out)]
    if len(eq) == 1:
        return [SlicePlace(name, eq[0], 0, out)]
    res, pos = [], 0
    for j, (d, size) in enumerate(zip(eq, bfl_row_sizes(name, out, inn))):
        res.append(SlicePlace(f"{name}:{_SLICE_LABELS[j]}", d, pos, pos + size))
        pos += size
    return res


class _PatternTable:
    """rank_pattern / alpha_pattern: first match wins; an entry that never matches is an error."""

    def __init__(self, spec, what: str):
        self.entries, self.what, self.used = _parse_patterns(spec), what, set()

    def pick(self, place: SlicePlace, default):
        for j, (p, v) in enumerate(self.entries):
            if p.search(place.equiv) or p.search(place.label):
                self.used.add(j)
                return v
        return default

    def check_used(self):
        for j, (p, _) in enumerate(self.entries):
            if j not in self.used:
                raise ValueError(f"{self.what} entry {p.pattern!r} matches no targeted module")


def find_targets(linears: dict[str, nn.Linear], layout: str, targets: str, rank: int, alpha: float, init: str,
                 rank_pattern=None, alpha_pattern=None) -> list[Target]:
    """The transformer's adapted Linears for a target preset or regex, with per-slice ranks and alphas."""
    preset = TARGET_PRESETS.get(targets)
    target_re = re.compile(preset if preset else targets)
    ranks, alphas = _PatternTable(rank_pattern, "rank_pattern"), _PatternTable(alpha_pattern, "alpha_pattern")
    found = []
    for name, mod in linears.items():
        slices = []
        for place in slice_places(name, mod.out_features, mod.in_features, layout):
            # a preset names diffusers modules; a custom regex may also name the native label
            hit = target_re.search(place.equiv) or (preset is None and target_re.search(place.label))
            if not hit:
                continue
            r = int(ranks.pick(place, rank))
            a = alphas.pick(place, alpha)
            if r == 0:
                continue
            limit = min(place.stop - place.start, mod.in_features)
            if r >= limit:
                raise ValueError(
                    f"rank {r} >= min(out, in) = {limit} for target {place.label} (rows {place.start}:{place.stop} "
                    f"of weight {tuple(mod.weight.shape)}); use a smaller network_dim or a rank_pattern"
                )
            slices.append(SliceSpec(place.label, place.equiv, place.start, place.stop, r, a, init))
        if slices:
            found.append(Target(_kohya_name(PREFIX_UNET, name), name, mod, slices))
    if not found:
        raise ValueError(
            f"targets={targets!r} matched no Linear of the transformer ({layout} layout, "
            f"{len(linears)} Linear modules, e.g. {sorted(linears)[:3]})"
        )
    ranks.check_used()
    alphas.check_used()
    return found


def find_text_encoder_targets(text_encoders: list, rank: int, alpha: float, init: str, train_t5xxl: bool):
    """Every encoder-layer Linear of CLIP, and of T5 when asked (rank capped below the layer's size)."""
    found = []
    for i, te in enumerate(text_encoders[:2]):
        if i == 1 and not train_t5xxl:
            continue
        for name, mod in _te_linears(te).items():
            r = min(rank, min(mod.in_features, mod.out_features) - 1)
            s = SliceSpec(name, name, 0, mod.out_features, r, alpha, init)
            found.append(Target(_kohya_name(PREFIX_TE[i], name), name, mod, [s], te=i))
    return found


def targets_from_plan(plan: dict, linears: dict[str, nn.Linear], text_encoders: list) -> list[Target]:
    """The targets a file describes (see plan_from_file), looked up in this model."""
    te_lins = [_te_linears(te) for te in text_encoders]
    found = []
    for lora_name, entry in plan.items():
        path, te = entry["module"], entry.get("te")
        mods = linears if te is None else (te_lins[te] if te < len(te_lins) else {})
        if path not in mods:
            raise ValueError(f"LoRA file module {lora_name} ({path}) does not exist in the model")
        found.append(Target(lora_name, path, mods[path], [SliceSpec.from_json(s) for s in entry["slices"]], te=te))
    return found


# --------------------------------------------------------------------------------------------
# Reading LoRA files of any supported form
# --------------------------------------------------------------------------------------------


def _group_lora_keys(sd: dict) -> dict[str, dict]:
    """{module key: {"down", "up", "alpha", "form"}} for kohya (lora_down/up) and PEFT (lora_A/B) keys."""
    groups: dict[str, dict] = {}
    suffixes = (
        (".lora_down.weight", "down", "kohya"),
        (".lora_up.weight", "up", "kohya"),
        (".lora_A.weight", "down", "peft"),
        (".lora_B.weight", "up", "peft"),
        (".alpha", "alpha", None),
    )
    for key, value in sd.items():
        for suffix, slot, form in suffixes:
            if key.endswith(suffix):
                g = groups.setdefault(key[: -len(suffix)], {})
                g[slot] = value
                if form:
                    g["form"] = form
                break
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            raise ValueError(f"LoRA file: module {name} lacks its {'up' if 'down' in g else 'down'} weight")
        if g["down"].dim() != 2 or g["up"].dim() != 2 or g["up"].shape[1] != g["down"].shape[0]:
            raise ValueError(
                f"LoRA file: module {name} has inconsistent shapes down {tuple(g['down'].shape)}, "
                f"up {tuple(g['up'].shape)}"
            )
    return groups


def check_finite(sd: dict, source: str = "LoRA file") -> None:
    for k, v in sd.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{source}: tensor {k} {tuple(v.shape)} contains NaN or Inf")


class FilePart(NamedTuple):
    """Rows [start, stop) of a model Linear, held by rows [file_start, file_stop) of a file key's up factor."""

    module: str
    start: int
    stop: int
    file_start: int
    file_stop: int


class ResolvedPart(NamedTuple):
    """A file's change to rows [start, stop) of a model Linear: delta = up @ down (scale folded into up)."""

    module: str
    start: int
    stop: int
    down: torch.Tensor
    up: torch.Tensor


class _TargetMap:
    """Which rows of which model Linear each LoRA file key (kohya or PEFT, either layout) adapts."""

    def __init__(self, shapes: dict[str, tuple[int, int]], te_shapes: list[dict] | None = None):
        self.shapes = shapes
        self.te_shapes = te_shapes or []
        self.layout = detect_layout(shapes)
        self.map: dict[str, list[FilePart]] = {}
        for name, (out, _) in shapes.items():
            self._add(name, [FilePart(name, 0, out, 0, out)], PREFIX_UNET, PEFT_UNET)
        if self.layout == "bfl":
            for name, (out, inn) in shapes.items():
                if bfl_equivalents(name):
                    for sl in slice_places(name, out, inn, "bfl"):
                        self._add(sl.equiv, [FilePart(name, sl.start, sl.stop, 0, sl.stop - sl.start)], PREFIX_UNET,
                                  PEFT_UNET)
        else:
            blocks = {(m.group(1), m.group(2)) for n in shapes if (m := _BFL_RE.match(_to_bfl_block(n) or ""))}
            for kind, idx in sorted(blocks):
                table = _DOUBLE if kind == "double" else _SINGLE
                for rest in table:
                    bfl = f"{kind}_blocks.{idx}.{rest}"
                    eq = bfl_equivalents(bfl)
                    if not all(d in shapes for d in eq):
                        continue
                    parts, offset = [], 0
                    for d in eq:
                        size = shapes[d][0]
                        parts.append(FilePart(d, 0, size, offset, offset + size))
                        offset += size
                    self._add(bfl, parts, PREFIX_UNET, PEFT_UNET)
        for i, te in enumerate(te_shapes or []):
            for name, (out, _) in te.items():
                whole = [FilePart(f"te{i}:{name}", 0, out, 0, out)]
                self._add(f"te{i}:{name}", whole, PREFIX_TE[i], PEFT_TE[i], path=name)
                if i == 1:
                    self.map.setdefault(_kohya_name(LEGACY_PREFIX_T5, name), whole)

    def _add(self, name, parts, kohya_prefix, peft_prefix, path=None):
        path = path or name
        for key in (_kohya_name(kohya_prefix, path), f"{peft_prefix}.{path}"):
            self.map.setdefault(key, parts)
        if kohya_prefix == PREFIX_UNET:
            self.map.setdefault(path, parts)  # PEFT keys saved without the `transformer.` prefix

    def resolve(self, lora_sd: dict, multiplier: float = 1.0, strict: bool = True,
                source: str = "LoRA file") -> list[ResolvedPart]:
        """Every module part the file changes, with down and up in fp32 and scale*multiplier folded into up."""
        groups = _group_lora_keys(lora_sd)
        if not groups:
            raise ValueError(f"{source}: no LoRA weights (lora_down/lora_up or lora_A/lora_B keys) found")
        out, unmatched = [], []
        for key, g in groups.items():
            parts = self.map.get(key)
            if parts is None:
                if not key.startswith((*PREFIX_TE, LEGACY_PREFIX_T5)) and not key.startswith(PEFT_TE):
                    unmatched.append(key)
                continue
            down, up = g["down"].float(), g["up"].float()
            rank = down.shape[0]
            alpha = float(g["alpha"]) if "alpha" in g else float(rank)
            file_rows = parts[-1].file_stop
            inn = self._shape(parts[0].module)[1]
            if down.shape[1] != inn or up.shape[0] != file_rows:
                target = ", ".join(f"{p.module} rows {p.start}:{p.stop} of {self._shape(p.module)}" for p in parts)
                raise ValueError(
                    f"{source}: shape mismatch for {key}: down {tuple(down.shape)}, up {tuple(up.shape)}; "
                    f"the model's {target} needs down [r, {inn}] and up [{file_rows}, r]"
                )
            coef = alpha / rank * multiplier
            for p in parts:
                if len(parts) > 1 and not up[p.file_start:p.file_stop].any():
                    continue  # an unadapted part of a fused weight (e.g. the MLP rows of linear1)
                out.append(ResolvedPart(p.module, p.start, p.stop, down, up[p.file_start:p.file_stop] * coef))
        if unmatched and strict:
            if len(unmatched) == len(groups) or not out:
                raise ValueError(
                    f"{source}: LoRA for another architecture: none of its {len(groups)} modules exist in this "
                    f"FLUX model ({self.layout} layout), e.g. {sorted(unmatched)[:3]}"
                )
            raise ValueError(f"{source}: modules not in this FLUX model: {sorted(unmatched)[:8]}")
        return out

    def _shape(self, name):
        if name.startswith("te"):
            i, n = name[2:].split(":", 1)
            return self.te_shapes[int(i)][n]
        return self.shapes[name]


def _lora_name_of(module: str) -> tuple[str, int | None, str]:
    """(adapter name, text encoder index or None, module path) for a ResolvedPart's module."""
    if module.startswith("te"):
        i, path = module[2:].split(":", 1)
        return _kohya_name(PREFIX_TE[int(i)], path), int(i), path
    return _kohya_name(PREFIX_UNET, module), None, module


def _read_file(file) -> tuple[dict, dict]:
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such file")
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    sd = torch.load(file, map_location="cpu", weights_only=True)
    return sd, {}


# --------------------------------------------------------------------------------------------
# SVD initialisation
# --------------------------------------------------------------------------------------------


def svd_components(weight: torch.Tensor, rank: int, which: str = "minor", device=None):
    """(U_r sqrt(S_r), sqrt(S_r) Vh_r, S_r) in fp64 for the r smallest ("minor") or largest ("major") triplets.

    Uses eigh of the fp64 Gram matrix of the smaller side: as fast as an fp32 SVD on CPU and it keeps
    the minor subspace accurate when the tail singular values are close (fp32 SVD/eigh do not).
    Singular values are re-measured as norms of the projected rows, which is more accurate than
    sqrt(eigenvalue) for tiny values.
    """
    w = weight.detach().to(device=device or weight.device, dtype=torch.float64)
    rows, cols = w.shape
    if not 0 < rank < min(rows, cols):
        raise ValueError(f"rank {rank} must be in [1, min(out, in)) for a weight of shape {tuple(w.shape)}")
    tiny = torch.finfo(torch.float64).tiny
    if rows <= cols:
        _, vecs = torch.linalg.eigh(w @ w.T)  # ascending eigenvalues
        u = vecs[:, :rank] if which == "minor" else vecs[:, -rank:].flip(-1)
        b = u.T @ w  # diag(S) Vh
        sigma = b.norm(dim=1)
        vh = b / sigma.clamp_min(tiny)[:, None]
    else:
        _, vecs = torch.linalg.eigh(w.T @ w)
        v = vecs[:, :rank] if which == "minor" else vecs[:, -rank:].flip(-1)
        b = w @ v  # U diag(S)
        sigma = b.norm(dim=0)
        u = b / sigma.clamp_min(tiny)[None, :]
        vh = v.T
    root = sigma.sqrt()
    return u * root[None, :], root[:, None] * vh, sigma


def _default_svd_device(w: torch.Tensor):
    """The weight's own device, except a CPU weight on a machine with a GPU: sd-scripts asks for the
    optimizer parameters (and so the SVD) while FLUX is still on the CPU, where 190 layers take minutes."""
    if w.device.type == "cuda":
        return w.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def _is_fp8(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() == 1


class _FileWeights:
    """Transformer weights read one tensor at a time from a safetensors file or a folder of them (a sharded
    diffusers transformer); diffusers or BFL names, with or without the single-file prefix."""

    PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.")

    def __init__(self, path):
        path = os.fspath(path)
        if os.path.isdir(path):
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        else:
            self.files = [path] if os.path.isfile(path) else []
        if not self.files:
            raise FileNotFoundError(f"svd_weights {path}: no such file, nor a folder with .safetensors files")
        self._where: dict[str, str] | None = None

    def __call__(self, module_path: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if self._where is None:  # key -> file, read once from the headers
            self._where = {}
            for file in self.files:
                with safe_open(file, framework="pt", device="cpu") as f:
                    self._where.update(dict.fromkeys(f.keys(), file))
        for prefix in self.PREFIXES:
            key = f"{prefix}{module_path}.weight"
            if key in self._where:
                with safe_open(self._where[key], framework="pt", device="cpu") as f:
                    return f.get_tensor(key)
        return None


def weight_lookup(source) -> Callable[[str], torch.Tensor | None]:
    """module path -> full-precision weight (or None) from a file path, a mapping or a callable."""
    if source is None:
        return lambda path: None
    if isinstance(source, (str, os.PathLike)):
        return _FileWeights(source)
    if isinstance(source, Mapping):
        return lambda path: source[path] if path in source else source.get(f"{path}.weight")
    return source


class SVDJob(NamedTuple):
    """One minor/major slice to initialise: slice `index` of adapter `lora`."""

    lora: MinorLoRAModule
    index: int

    @property
    def slice(self) -> SliceSpec:
        return self.lora.slices[self.index]

    @property
    def key(self) -> str:
        return f"{self.lora.lora_name}.{self.index}"  # also the tensor-name stem in the cache file


class SVDFactors(NamedTuple):
    """U_r sqrt(S_r) [rows, r] and sqrt(S_r) Vh_r [r, in], fp32 on the CPU."""

    us: torch.Tensor
    sv: torch.Tensor


class SVDInit:
    """Minor/major factors by per-slice SVD: each process computes its share and broadcasts it, and an
    optional cache file (keyed by the weights and settings) skips the work next time.

    The SVD reads W from `weights` when given (module path -> full-precision tensor), else from the module:
    a weight stored in float8 is refused, its rounding is larger than the minor components.
    """

    def __init__(self, targets: str, svd_device=None, cache=None, weights=None, verbose: bool = True):
        self.targets, self.svd_device, self.cache, self.verbose = targets, svd_device, cache, verbose
        self.weights = weight_lookup(weights)
        self.computed = 0  # slices decomposed by this process (0 when read from the cache)

    def run(self, jobs: list[SVDJob]) -> dict[str, SVDFactors]:
        key = self.cache_key(jobs) if self.cache else None
        cached = self.load_cache(key) if key else None
        if cached is not None:
            if self.verbose:
                logger.info(f"minor_lora: SVD initialisation read from cache {self.cache}")
            return cached
        results = self.compute(jobs)
        if key:
            self.save_cache(key, results)
        return results

    def weight(self, job: SVDJob) -> torch.Tensor:
        """The rows of W the slice adapts, as stored (before any base LoRA)."""
        lo, s = job.lora, job.slice
        w = self.weights(lo.org_path) if lo.te is None else None
        given = w is not None
        if not given:
            w = lo.org_module_ref[0].weight
        elif tuple(w.shape) != (lo.out_features, lo.in_features):
            raise ValueError(f"svd_weights: {lo.org_path} has shape {tuple(w.shape)}, the model's Linear "
                             f"{(lo.out_features, lo.in_features)}")
        if _is_fp8(w):
            raise ValueError(
                f"{lo.lora_name}: the {'given' if given else 'base'} weight is stored as {w.dtype}; its rounding is "
                f"larger than the minor components, so the SVD needs the full-precision weights: initialise the "
                f"network before the weights are quantised, or pass svd_weights=<the bf16/fp32 model file>"
            )
        return w.detach()[s.start: s.stop]

    def effective_weight(self, job: SVDJob) -> torch.Tensor:
        """W (+ a base LoRA's delta, in fp64) of the slice: what the SVD decomposes."""
        w = self.weight(job)
        bd, bu = job.lora.base(job.index)
        if bd.shape[0]:
            w = w.double() + bu.double().to(w.device) @ bd.double().to(w.device)
        return w

    def compute(self, jobs: list[SVDJob]) -> dict[str, SVDFactors]:
        dist = _dist()
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist else (1, 0)
        mine = [j for k, j in enumerate(jobs) if k % world == rank]
        init = jobs[0].slice.init if jobs else ""
        results = {}
        for job in _progress(mine, len(mine), f"minor_lora SVD ({init})", self.verbose and rank == 0):
            w = self.effective_weight(job)
            dev = self.svd_device or _default_svd_device(w)
            us, sv, _ = svd_components(w, job.slice.rank, job.slice.init, device=dev)
            # contiguous: broadcast sends raw storage, and these come out column-major from the matmuls
            results[job.key] = SVDFactors(us.float().cpu().contiguous(), sv.float().cpu().contiguous())
            self.computed += 1
        if world > 1:
            self._share(jobs, results, dist, world)
        return results

    @staticmethod
    def _share(jobs, results, dist, world):
        """Every process ends with every slice's factors: job k is sent by process k % world."""
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for k, job in enumerate(jobs):
            if job.key in results:
                us, sv = results[job.key].us.to(comm), results[job.key].sv.to(comm)
            else:
                us = torch.empty(job.slice.rows, job.slice.rank, device=comm)
                sv = torch.empty(job.slice.rank, job.lora.in_features, device=comm)
            dist.broadcast(us, src=k % world)
            dist.broadcast(sv, src=k % world)
            results[job.key] = SVDFactors(us.cpu(), sv.cpu())

    def cache_key(self, jobs: list[SVDJob]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"v": 1, "targets": self.targets}).encode())
        for job in jobs:
            s = job.slice
            h.update(json.dumps([job.lora.lora_name, s.label, s.start, s.stop, s.rank, s.init]).encode())
            _tensor_digest(h, self.weight(job))
            for t in job.lora.base(job.index):
                _tensor_digest(h, t)
        return h.hexdigest()

    def load_cache(self, key: str) -> dict[str, SVDFactors] | None:
        path = os.fspath(self.cache)
        if not os.path.isfile(path):
            return None
        sd, meta = _read_file(path)
        if meta.get("urae_init_cache_key") != key:
            if self.verbose:
                logger.info(f"minor_lora: {path} was made for other weights/settings; recomputing")
            return None
        return {k[:-3]: SVDFactors(sd[k], sd[k[:-3] + ".sv"]) for k in sd if k.endswith(".us")}

    def save_cache(self, key: str, results: dict[str, SVDFactors]) -> None:
        dist = _dist()
        if dist and dist.get_rank() != 0:
            return
        tensors = {}
        for k, f in results.items():
            tensors[k + ".us"], tensors[k + ".sv"] = f.us, f.sv
        _save_atomic(tensors, os.fspath(self.cache), {"urae_init_cache_key": key})


# --------------------------------------------------------------------------------------------
# The adapter of one Linear
# --------------------------------------------------------------------------------------------


class _Factors(nn.Module):
    """A frozen factor pair (down [r, in], up [rows, r]) held as buffers, so it follows .to() and state_dict."""

    def __init__(self, rank: int, in_features: int, rows: int):
        super().__init__()
        self.register_buffer("down", torch.zeros(rank, in_features))
        self.register_buffer("up", torch.zeros(rows, rank))

    def replace(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down, self.up = down, up


class _Tile(NamedTuple):
    """Output rows [start, stop) and the slice adapting them (None: rows left as the base computes them)."""

    start: int
    stop: int
    slice: int | None


class _Term(NamedTuple):
    """Adjacent columns of the stacked down projection in forward that belong to one term of one slice."""

    slice: int
    rank: int
    blocks: int  # 2: the trained and the frozen half of a minor/major slice; 1: one block
    trained: bool  # dropout acts on trained terms; a base LoRA's term is never dropped

    @property
    def width(self) -> int:
        return self.rank * self.blocks


class ExportSegment(NamedTuple):
    """Columns of an exported module's factors (written as a list in `urae_structure`)."""

    slice: int
    kind: str  # "train", "init" (the frozen copy, negated) or "base"
    rank: int
    scale: float


class ExportedFactors(NamedTuple):
    """A module's change as one standard LoRA: delta W = alpha / R * up @ down, exactly."""

    down: torch.Tensor  # [R, in]
    up: torch.Tensor  # [out, R]
    alpha: float
    segments: list[ExportSegment]


def init_plain_down(down: torch.Tensor, how: str) -> None:
    """A plain LoRA's random down factor: kohya's Kaiming-uniform, or PEFT's "gaussian" N(0, (1/r)^2)."""
    if how == "gaussian":
        nn.init.normal_(down, std=1.0 / down.shape[0])
    else:
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))


class MinorLoRAModule(nn.Module):
    """Adapts row slices of one Linear by swapping its forward; the base module and weight stay as they are.

    Nothing about the base weight (storage, device, dtype) is kept: it may be stored in fp8 and upcast by a
    forward hook, or moved between host and GPU by block swap, while the adapter is attached.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, slices: list[SliceSpec], multiplier: float = 1.0,
                 dropout=None, rank_dropout=None, module_dropout=None, org_path: str | None = None,
                 te: int | None = None, plain_init: str = "kaiming"):
        super().__init__()
        self.lora_name, self.org_path, self.te = lora_name, org_path, te
        self.slices = slices
        self.in_features, self.out_features = org_module.in_features, org_module.out_features
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.enabled = True
        self.initialized = all(not s.frozen for s in slices)
        self.org_module_ref = [org_module]  # a list, so the base weights are not the network's parameters
        self.lora_down = nn.ParameterList()
        self.lora_up = nn.ParameterList()
        self.init_factors = nn.ModuleList()  # frozen copies of the initial minor/major factors (rank 0 if plain)
        self.base_factors = nn.ModuleList()  # a LoRA fused in before the SVD, scale folded into up (rank 0: none)
        for s in slices:
            down = torch.empty(s.rank, self.in_features)
            init_plain_down(down, plain_init)
            self.lora_down.append(nn.Parameter(down))
            self.lora_up.append(nn.Parameter(torch.zeros(s.rows, s.rank)))
            self.init_factors.append(_Factors(s.rank if s.frozen else 0, self.in_features, s.rows))
            self.base_factors.append(_Factors(0, self.in_features, s.rows))
        self._tiles = self._tiling()

    def _tiling(self) -> list[_Tile]:
        """Tiles covering all output rows in order."""
        tiles, pos = [], 0
        for i, s in sorted(enumerate(self.slices), key=lambda t: t[1].start):
            if s.start < pos:
                raise ValueError(f"{self.lora_name}: overlapping row slices")
            if s.start > pos:
                tiles.append(_Tile(pos, s.start, None))
            tiles.append(_Tile(s.start, s.stop, i))
            pos = s.stop
        if pos < self.out_features:
            tiles.append(_Tile(pos, self.out_features, None))
        return tiles

    def frozen(self, i):
        """(down0, up0) of slice i, or (None, None) for a plain slice."""
        if not self.slices[i].frozen:
            return None, None
        f = self.init_factors[i]
        return f.down, f.up

    def base(self, i):
        """(down, up) of a base LoRA's delta on slice i (rank 0 when there is none)."""
        f = self.base_factors[i]
        return f.down, f.up

    def set_base(self, i: int, down: torch.Tensor, up: torch.Tensor) -> None:
        self.base_factors[i].replace(down.contiguous(), up.contiguous())

    def apply_to(self):
        org = self.org_module_ref[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self):
        if hasattr(self, "org_forward"):
            self.org_module_ref[0].forward = self.org_forward
            del self.org_forward

    def forward(self, x):
        y = self.org_forward(x)
        if not self.enabled:
            return y
        if not self.initialized:
            net = getattr(self, "_network", None)
            if net is None or net() is None:
                raise RuntimeError(f"{self.lora_name}: adapter used before its SVD initialisation")
            net().initialize()
        train_on = not (self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout)
        # under autocast F.linear casts by itself; an explicit fp32 copy would be saved for backward on top
        # of x (1.2 GB per adapted layer at 4096²)
        xin = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_down[0].dtype)
        downs, ups, terms = [], [], []
        rank_drop = self.training and bool(self.rank_dropout)
        for i, s in enumerate(self.slices):
            bd, bu = self.base(i)
            if train_on and s.rank:
                d, u = self.lora_down[i], self.lora_up[i]
                coef = s.scale * self.multiplier / ((1.0 - self.rank_dropout) if rank_drop else 1.0)
                if s.frozen:
                    d0, u0 = self.frozen(i)
                    downs += [d - d0, d0]
                    ups += [u * coef, (u - u0) * coef]
                    terms.append(_Term(i, s.rank, 2, True))
                else:
                    downs.append(d)
                    ups.append(u * coef)
                    terms.append(_Term(i, s.rank, 1, True))
            if bd.shape[0]:
                downs.append(bd)
                ups.append(bu * self.multiplier)
                terms.append(_Term(i, bd.shape[0], 1, False))
        if not downs:
            return y
        h = F.linear(xin, torch.cat(downs) if len(downs) > 1 else downs[0])
        if self.training and (self.dropout or rank_drop):
            h = self._drop(h, terms)
        # A slice's terms are adjacent columns of h, so each slice needs one view and one up matrix.
        cols: dict[int, list] = {}
        up_blocks: dict[int, list] = {}
        col = ucol = 0
        for t in terms:
            cols.setdefault(t.slice, [col, col])[1] = col + t.width
            up_blocks.setdefault(t.slice, []).extend(ups[ucol: ucol + t.blocks])
            col, ucol = col + t.width, ucol + t.blocks
        deltas: dict[int, torch.Tensor] = {}
        for i, (c0, c1) in cols.items():
            ui = up_blocks[i][0] if len(up_blocks[i]) == 1 else torch.cat(up_blocks[i], 1)
            deltas[i] = F.linear(h[..., c0:c1], ui).to(y.dtype)
        if len(self._tiles) == 1:
            return y + deltas[0]
        # Fused weights (qkv, linear1): add each slice's change in place. Rebuilding the output by concatenation
        # would hold a second copy of it (linear1 at 4096²: 66K x 21504 values). A Linear's backward does not
        # use its output, so autograd allows this; a base forward that did would raise, not go wrong.
        for tile in self._tiles:
            if tile.slice is not None and tile.slice in deltas:
                y[..., tile.start:tile.stop] += deltas[tile.slice]
        return y

    def _drop(self, h, terms: list[_Term]):
        """Neuron/rank dropout on the trained ranks, one mask shared by the trainable and frozen halves."""
        parts, col = [], 0
        for t in terms:
            seg = h[..., col: col + t.width]
            col += t.width
            if not t.trained:
                parts.append(seg)
                continue
            mask = torch.ones_like(seg[..., :t.rank])
            if self.dropout:
                mask = F.dropout(mask, p=self.dropout)
            if self.rank_dropout:
                rmask = (torch.rand(h.shape[0], t.rank, device=h.device) > self.rank_dropout).to(h.dtype)
                mask = mask * rmask.view(h.shape[0], *([1] * (h.dim() - 2)), t.rank)
            parts.append(seg * (mask if t.blocks == 1 else torch.cat([mask, mask], -1)))
        return torch.cat(parts, -1)

    # ---- the change as a standard LoRA ----

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """Dense fp32 change of the full weight (base LoRA part + trained change)."""
        f = self.export_factors()
        return (f.alpha / f.down.shape[0]) * multiplier * (f.up.double() @ f.down.double()).float()

    def export_factors(self) -> ExportedFactors:
        """The module's change as one LoRA whose columns are, per slice: trained, -frozen copy, base LoRA."""
        ref = next((s.scale for s in self.slices if s.rank), 1.0)
        downs, ups, segments = [], [], []
        for i, s in enumerate(self.slices):
            cols = []
            if s.rank:
                d, u = self.lora_down[i].detach().float(), self.lora_up[i].detach().float()
                cols.append(("train", d, u, s.scale))
                if s.frozen:
                    d0, u0 = self.frozen(i)
                    cols.append(("init", d0.float(), -u0.float(), s.scale))
            bd, bu = self.base(i)
            if bd.shape[0]:
                cols.append(("base", bd.float(), bu.float(), 1.0))
            for kind, d, u, scale in cols:
                full = torch.zeros(self.out_features, d.shape[0], device=d.device)
                full[s.start: s.stop] = u if scale == ref else u * (scale / ref)
                downs.append(d)
                ups.append(full)
                segments.append(ExportSegment(i, kind, d.shape[0], scale))
        dev = self.lora_down[0].device
        down = torch.cat(downs) if downs else torch.zeros(0, self.in_features, device=dev)
        up = torch.cat(ups, 1) if ups else torch.zeros(self.out_features, 0, device=dev)
        return ExportedFactors(down, up, ref * down.shape[0], segments)

    def load_factors(self, down: torch.Tensor, up: torch.Tensor, alpha: float, segments: list, source: str):
        """Inverse of export_factors for a file written by this module with the same structure."""
        ref = float(alpha) / down.shape[0]
        col = 0
        with torch.no_grad():
            for seg in map(ExportSegment._make, segments):
                s = self.slices[seg.slice]
                d = down[col: col + seg.rank]
                u = up[s.start: s.stop, col: col + seg.rank]
                if seg.scale != ref:
                    u = u * (ref / seg.scale)
                col += seg.rank
                if seg.kind == "train":
                    self._set(self.lora_down[seg.slice], d, source)
                    self._set(self.lora_up[seg.slice], u, source)
                elif seg.kind == "init":
                    d0, u0 = self.frozen(seg.slice)
                    self._set(d0, d, source)
                    self._set(u0, -u, source)
                else:
                    like = self.lora_down[seg.slice]
                    self.set_base(seg.slice, d.to(like.device, like.dtype).clone(), u.to(like.device, like.dtype).clone())
        self.initialized = True

    def _set(self, dst: torch.Tensor, src: torch.Tensor, source: str):
        if dst.shape != src.shape:
            raise ValueError(f"{source}: {self.lora_name}: stored factor {tuple(src.shape)} != expected {tuple(dst.shape)}")
        dst.copy_(src)

    def change(self, i: int, device=None) -> torch.Tensor:
        """The trained change of slice i alone (dense, without the base LoRA): s * (up down - up0 down0)."""
        d, u = self.lora_down[i], self.lora_up[i]
        d0, u0 = self.frozen(i)
        dw = u.to(device) @ d.to(device)
        if d0 is not None:
            dw = dw - u0.to(device) @ d0.to(device)
        return dw * self.slices[i].scale


# --------------------------------------------------------------------------------------------
# Optimizer groups
# --------------------------------------------------------------------------------------------


class GroupSpec(NamedTuple):
    """Adapters that share a learning rate; LoRA+ puts their up factors in a second group at lr * ratio."""

    description: str
    loras: list[MinorLoRAModule]
    lr: float | None
    loraplus_ratio: float | None


def optimizer_groups(specs: list[GroupSpec]) -> tuple[list[dict], list[str]]:
    """(param groups, descriptions) as sd-scripts expects them; a group with lr 0 is left out."""
    groups, descriptions = [], []
    for spec in specs:
        plain, plus = [], []
        for lo in spec.loras:
            for name, p in lo.named_parameters():
                (plus if spec.loraplus_ratio and name.startswith("lora_up") else plain).append(p)
        for params, is_plus in ((plain, False), (plus, True)):
            if not params:
                continue
            group = {"params": params}
            if spec.lr is not None:
                group["lr"] = spec.lr * spec.loraplus_ratio if is_plus else spec.lr
            if group.get("lr") == 0:
                continue
            groups.append(group)
            descriptions.append(spec.description + (" plus" if is_plus else ""))
    return groups, descriptions


def _text_encoder_lrs(text_encoder_lr, default_lr) -> list:
    """sd-scripts gives one lr, a list (one per encoder), an empty list or None."""
    if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
        return [default_lr]
    if isinstance(text_encoder_lr, (int, float)):
        return [float(text_encoder_lr)]
    return list(text_encoder_lr)


# --------------------------------------------------------------------------------------------
# Files: export to a standard LoRA, import back
# --------------------------------------------------------------------------------------------


def file_key(lora: MinorLoRAModule, layout: str) -> str:
    """kohya names for the BFL layout (sd-scripts' files), PEFT names for the diffusers layout."""
    if layout == "bfl":
        return lora.lora_name
    if lora.te is not None:
        return f"{PEFT_TE[lora.te]}.{lora.org_path}"
    return f"{PEFT_UNET}.{lora.org_path}"


def export_loras(loras: list[MinorLoRAModule], layout: str) -> tuple[dict, dict]:
    """(tensors, structure) of the standard-LoRA file: every module as one exact rank-R LoRA."""
    tensors, structure = {}, {}
    names = ("lora_A", "lora_B") if layout == "diffusers" else ("lora_down", "lora_up")
    for lo in loras:
        f = lo.export_factors()
        if f.down.shape[0] == 0:
            continue
        key = file_key(lo, layout)
        tensors[f"{key}.{names[0]}.weight"], tensors[f"{key}.{names[1]}.weight"] = f.down, f.up
        tensors[f"{key}.alpha"] = torch.tensor(float(f.alpha))
        structure[key] = {"lora_name": lo.lora_name, "module": lo.org_path, "te": lo.te,
                          "slices": [s.to_json() for s in lo.slices], "segments": f.segments}
    return tensors, structure


def _file_rank(entry: dict) -> int:
    """Rank of one module's tensors in the file, from its `urae_structure` entry."""
    return sum(ExportSegment._make(seg).rank for seg in entry["segments"])


def _file_alpha(structure: dict):
    alphas = set()
    for e in structure.values():
        s = e["slices"][0]
        alphas.add(s["alpha"] / s["rank"] * _file_rank(e) if s["rank"] else 0)
    return alphas.pop() if len(alphas) == 1 else "mixed"


def load_structured(loras: list[MinorLoRAModule], sd: dict, structure: dict, source: str) -> None:
    """Factors of a file this module wrote (same layout) back into the adapters, exactly."""
    by_name = {lo.lora_name: lo for lo in loras}
    groups = _group_lora_keys(sd)
    missing = [e["lora_name"] for e in structure.values() if e["lora_name"] not in by_name]
    if missing:
        raise ValueError(f"{source}: modules not in this network: {missing[:8]}")
    for key, e in structure.items():
        lo = by_name[e["lora_name"]]
        want = [(s["rows"][0], s["rows"][1], s["rank"], float(s["alpha"]), s["init"]) for s in e["slices"]]
        have = [(s.start, s.stop, s.rank, float(s.alpha), s.init) for s in lo.slices]
        if want != have:
            raise ValueError(
                f"{source}: {lo.lora_name} was saved with slices (rows, rank, alpha, init) {want}, "
                f"this network has {have}; use the file's network_dim/network_alpha/init, or create the "
                f"network from the file (create_network_from_weights)"
            )
        g = groups.get(key)
        if g is None:
            raise ValueError(f"{source}: missing tensors for {key}")
        r = g["down"].shape[0]
        if g["down"].shape != (r, lo.in_features) or g["up"].shape != (lo.out_features, r):
            raise ValueError(
                f"{source}: shape mismatch for {lo.lora_name}: file down {tuple(g['down'].shape)}, "
                f"up {tuple(g['up'].shape)}; module weight is ({lo.out_features}, {lo.in_features})"
            )
        lo.load_factors(g["down"].float(), g["up"].float(), float(g.get("alpha", r)), e["segments"], source)


def load_plain(loras: list[MinorLoRAModule], sd: dict, tmap: _TargetMap, source: str) -> None:
    """Any plain LoRA (kohya or PEFT, either layout) into plain adapters with matching rows and ranks."""
    by_name = {lo.lora_name: lo for lo in loras}
    for part in tmap.resolve(sd, 1.0, source=source):
        lo = by_name.get(_lora_name_of(part.module)[0])
        where = (part.start, part.stop)
        i = next((i for i, s in enumerate(lo.slices) if (s.start, s.stop) == where), None) if lo else None
        if i is None:
            raise ValueError(f"{source}: adapts rows {part.start}:{part.stop} of {part.module}, which this network "
                             f"does not adapt")
        s = lo.slices[i]
        if part.down.shape[0] != s.rank:
            raise ValueError(f"{source}: {part.module} rows {part.start}:{part.stop} has rank {part.down.shape[0]}, "
                             f"this network {s.rank}")
        with torch.no_grad():
            lo.lora_down[i].copy_(part.down)
            lo.lora_up[i].copy_(part.up / s.scale)  # `up` arrives with the file's scale folded in
        lo.initialized = True


def plan_from_file(sd: dict, meta: dict, layout: str, unet_shapes: dict, te_shapes: list) -> tuple[dict, str]:
    """Network structure for a file: ours (same layout) exactly; any other LoRA as plain slices."""
    if "urae_structure" in meta and meta.get("urae_layout") == layout:
        plan = {}
        for e in json.loads(meta["urae_structure"]).values():
            plan[e["lora_name"]] = {"module": e["module"], "te": e["te"], "slices": e["slices"]}
        return plan, meta.get("urae_init", "minor")
    plan: dict[str, dict] = {}
    for m, a, b, down, _up in _TargetMap(unet_shapes, te_shapes).resolve(sd, 1.0):
        name, te, path = _lora_name_of(m)
        e = plan.setdefault(name, {"module": path, "te": te, "slices": []})
        if any(not (b <= s["rows"][0] or a >= s["rows"][1]) for s in e["slices"]):
            raise ValueError(f"LoRA file adapts overlapping rows of {m} through several keys")
        # alpha = rank: the file's scale arrives folded into `up` when the factors are loaded.
        e["slices"].append({"label": f"{m}[{a}:{b}]", "equiv": m, "rows": [a, b], "rank": down.shape[0],
                            "alpha": float(down.shape[0]), "init": "plain"})
    for e in plan.values():
        e["slices"].sort(key=lambda s: s["rows"][0])
    return plan, "plain"


def _save_atomic(tensors: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; other programs (ComfyUI, …) must read the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _addnet_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """sd-scripts' sshs_model_hash / sshs_legacy_hash (computed over the file with only ss_* metadata)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    b = io.BytesIO(data)
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model_hash, legacy


# --------------------------------------------------------------------------------------------
# Merging a LoRA into weights
# --------------------------------------------------------------------------------------------


def add_lora_to_state_dict(state_dict: dict, lora_sd: dict, multiplier: float = 1.0, strict: bool = True) -> dict:
    """A new state dict with a LoRA's delta added to the matching Linear weights, in fp32 maths.

    Works for diffusers or BFL (optionally `model.diffusion_model.`-prefixed) transformer state dicts
    and kohya or PEFT LoRA files of either layout; the stored dtype of each weight is kept. Only the
    changed weights are new tensors. Text-encoder LoRA keys are ignored.
    """
    check_finite(lora_sd)
    prefix = ""
    for p in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(p) for k in state_dict):
            prefix = p
            break
    shapes = {}
    for k, v in state_dict.items():
        if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 2:
            shapes[k[len(prefix): -len(".weight")]] = tuple(v.shape)
    out = dict(state_dict)
    deltas: dict[str, list[ResolvedPart]] = {}
    for part in _TargetMap(shapes).resolve(lora_sd, multiplier, strict):
        deltas.setdefault(part.module, []).append(part)
    for m, parts in deltas.items():
        key = f"{prefix}{m}.weight"
        w = state_dict[key].float().clone()
        for p in parts:
            w[p.start:p.stop] += p.up @ p.down
        out[key] = w.to(state_dict[key].dtype)
    return out


def lora_delta_weights(lora_sd: dict, shapes: dict[str, tuple[int, int]], multiplier: float = 1.0) -> dict:
    """{module: dense fp32 delta W} of a LoRA on a model whose Linear shapes are given (either layout)."""
    out: dict[str, torch.Tensor] = {}
    for p in _TargetMap(shapes).resolve(lora_sd, multiplier):
        d = out.setdefault(p.module, torch.zeros(shapes[p.module], dtype=torch.float32))
        d[p.start:p.stop] += p.up @ p.down
    return out


def merge_into_modules(parts: list[ResolvedPart], modules: dict[str, nn.Linear], dtype=None, device=None) -> None:
    """Add each part's delta into its module's weight in fp32; the weight keeps its device (and dtype unless
    given)."""
    with torch.no_grad():
        for p in parts:
            w = modules[p.module].weight
            dev = device or w.device
            new = w.detach().to(dev, torch.float32)
            new[p.start:p.stop] += p.up.to(dev) @ p.down.to(dev)
            w.data = new.to(dtype or w.dtype).to(w.device)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class MinorLoRANetwork(nn.Module):
    """The adapters of one FLUX model, with the sd-scripts network interface; each concern is delegated to
    the parts above (targets, SVDInit, optimizer_groups, export_loras/load_*, merge_into_modules)."""

    def __init__(self, text_encoders, unet, multiplier: float = 1.0, lora_dim: int = 16, alpha: float = 16.0,
                 init: str = "minor", targets: str = "urae", dropout=None, rank_dropout=None, module_dropout=None,
                 rank_pattern=None, alpha_pattern=None, train_t5xxl: bool = False, svd_device=None,
                 init_cache=None, base_lora=None, runtime_settings: dict | None = None, plan: dict | None = None,
                 verbose: bool = True, plain_init: str = "kaiming", svd_weights=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: expected one of {INITS}")
        if plain_init not in PLAIN_INITS:
            raise ValueError(f"plain_init={plain_init!r}: expected one of {PLAIN_INITS}")
        if plain_init != "kaiming" and init != "plain":
            logger.warning(f"minor_lora: plain_init={plain_init} has no effect with init={init}")
        self.multiplier = multiplier
        self.lora_dim, self.alpha, self.init, self.plain_init = int(lora_dim), float(alpha), init, plain_init
        self.targets = targets
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.train_t5xxl = bool(train_t5xxl)
        self.base_lora = base_lora
        self.runtime_settings = dict(runtime_settings or {})
        self.verbose = verbose
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.svd = SVDInit(targets, svd_device, init_cache, svd_weights, verbose)

        linears = _linear_modules(unet)
        self.layout = detect_layout(linears)
        self.unet_shapes = _shapes(linears)
        text_encoders = _as_list(text_encoders)
        self.te_shapes = [_shapes(_te_linears(te)) for te in text_encoders]
        if plan is not None:
            found = targets_from_plan(plan, linears, text_encoders)
        else:
            found = find_targets(linears, self.layout, targets, self.lora_dim, self.alpha, init, rank_pattern,
                                 alpha_pattern)
            found += find_text_encoder_targets(text_encoders, self.lora_dim, self.alpha, init, self.train_t5xxl)
        loras = [self._make(t) for t in found]
        self.unet_loras: list[MinorLoRAModule] = [lo for lo in loras if lo.te is None]
        self.text_encoder_loras: list[MinorLoRAModule] = [lo for lo in loras if lo.te is not None]
        for lora in loras:
            lora._network = weakref.ref(self)
        names = [lo.lora_name for lo in loras]
        if len(set(names)) != len(names):
            raise ValueError("duplicated LoRA module names")
        if plan is None and base_lora is not None:
            self._attach_base_lora(base_lora)
        if verbose:
            logger.info(f"minor_lora: init={init}, targets={targets}, {len(self.unet_loras)} transformer modules "
                        f"({self.layout} layout), {self.describe_rank()}, "
                        f"{format_count(self.trainable_parameter_count())} trainable parameters")

    def _make(self, t: Target) -> MinorLoRAModule:
        return MinorLoRAModule(t.lora_name, t.module, t.slices, self.multiplier, self.dropout, self.rank_dropout,
                               self.module_dropout, org_path=t.path, te=t.te, plain_init=self.plain_init)

    @property
    def svd_layers_computed(self) -> int:
        return self.svd.computed

    def trainable_parameter_count(self) -> int:
        return sum(s.rank * (s.rows + lo.in_features) for lo in self.text_encoder_loras + self.unet_loras
                   for s in lo.slices)

    def describe_rank(self) -> str:
        """The rank in words: minor/major files hold r trained + r frozen components, i.e. rank 2r (plus the
        rank of a stacked base LoRA)."""
        r = self.lora_dim
        base = max((f.down.shape[0] for lo in self.unet_loras for f in lo.base_factors), default=0)
        plus = f" + {base} of the base LoRA" if base else ""
        if self.init == "plain":
            return f"rank {r} (saved files: rank {r + base}" + (f": {r} trained{plus})" if base else ")")
        return (f"rank {r} (saved files hold each target's exact change as a standard LoRA of rank {2 * r + base}: "
                f"{r} trained + {r} frozen {self.init} components{plus})")

    # ---- base LoRA (stacking on a fused LoRA) ----

    def fuse_base_lora(self, lora):
        """API form of base_lora=...: a LoRA (path or state dict) whose delta the SVD sees and forward applies."""
        if any(lo.initialized and any(s.frozen for s in lo.slices) for lo in self.unet_loras):
            raise RuntimeError("fuse_base_lora must be called before the SVD initialisation")
        self.base_lora = lora
        self._attach_base_lora(lora)

    def _attach_base_lora(self, base):
        """Store a LoRA's delta per targeted slice as frozen factors (the SVD then sees W + delta)."""
        sd, _ = (base, {}) if isinstance(base, dict) else _read_file(base)
        check_finite(sd, f"base_lora {base if not isinstance(base, dict) else ''}")
        te_keys = [k for k in sd if k.startswith((*PREFIX_TE, LEGACY_PREFIX_T5, *PEFT_TE))]
        if te_keys:
            logger.warning(f"minor_lora: base_lora has {len(te_keys)} text-encoder tensors; only its transformer "
                           f"part is stacked, so saved files will not contain them")
        by_name = {lo.lora_name: lo for lo in self.unet_loras}
        per_slice: dict[tuple[str, int], list] = {}
        for m, a, b, down, up in _TargetMap(self.unet_shapes).resolve(sd, 1.0, source="base_lora"):
            lora = by_name.get(_kohya_name(PREFIX_UNET, m))
            covered = torch.zeros(b - a, dtype=torch.bool)
            for i, s in enumerate(lora.slices if lora else []):
                lo, hi = max(a, s.start), min(b, s.stop)
                if lo >= hi:
                    continue
                covered[lo - a: hi - a] = True
                part = torch.zeros(s.rows, up.shape[1])
                part[lo - s.start: hi - s.start] = up[lo - a: hi - a]
                per_slice.setdefault((lora.lora_name, i), []).append((down, part))
            if (up[~covered] != 0).any():
                raise ValueError(
                    f"base_lora changes rows of {m} {self.unet_shapes[m]} outside the targeted slices "
                    f"(targets={self.targets!r}). A LoRA on more layers than URAE's (MLPs, text stream) cannot be "
                    f"stacked exactly: merge it into the base weights first (sd-scripts --base_weights, or "
                    f"python -m networks.merge_lora) and train on the merged model, or widen targets"
                )
        for (name, i), items in per_slice.items():
            by_name[name].set_base(i, torch.cat([d for d, _ in items]), torch.cat([u for _, u in items], 1))

    # ---- SVD initialisation ----

    def set_svd_weights(self, weights):
        """Where the SVD reads W: a safetensors file, a {module path: tensor} mapping or a callable path ->
        tensor. For a base stored in fp8: give the full-precision weights (or initialise before quantising)."""
        self.svd.weights = weight_lookup(weights)

    def initialize(self, force: bool = False):
        """Fill minor/major factors by per-slice SVD (cached, shared across processes). Idempotent."""
        todo = [lo for lo in self.unet_loras + self.text_encoder_loras if force or not lo.initialized]
        jobs = [SVDJob(lo, i) for lo in todo for i, s in enumerate(lo.slices) if s.frozen]
        if jobs:
            results = self.svd.run(jobs)
            with torch.no_grad():
                for job in jobs:
                    root = math.sqrt(job.slice.scale)
                    f = results[job.key]
                    up0, down0 = (f.us.double() / root).float(), (f.sv.double() / root).float()
                    d0, u0 = job.lora.frozen(job.index)
                    d0.copy_(down0)
                    u0.copy_(up0)
                    job.lora.lora_down[job.index].copy_(down0)
                    job.lora.lora_up[job.index].copy_(up0)
        for lo in todo:
            lo.initialized = True

    # ---- sd-scripts interface ----

    def set_multiplier(self, multiplier):
        self.multiplier = multiplier
        for lo in self.text_encoder_loras + self.unet_loras:
            lo.multiplier = multiplier

    def set_enabled(self, is_enabled):
        for lo in self.text_encoder_loras + self.unet_loras:
            lo.enabled = bool(is_enabled)

    def apply_to(self, text_encoders, flux, apply_text_encoder=True, apply_unet=True):
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lo in self.text_encoder_loras + self.unet_loras:
            lo.apply_to()
            self.add_module(lo.lora_name, lo)

    def is_mergeable(self):
        return True

    def enable_gradient_checkpointing(self):
        pass  # the adapters hold no activations of their own worth recomputing

    def prepare_grad_etc(self, text_encoder, unet):
        self.initialize()
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def on_step_start(self, text_encoder, unet):
        pass

    def get_trainable_params(self):
        self.initialize()
        return [p for p in self.parameters() if p.requires_grad]

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        te_lrs = _text_encoder_lrs(text_encoder_lr, default_lr)
        self.initialize()
        self.requires_grad_(True)
        specs = []
        for i, prefix in enumerate(PREFIX_TE):
            loras = [lo for lo in self.text_encoder_loras if lo.lora_name.startswith(prefix + "_")]
            if loras:
                lr = te_lrs[i] if i < len(te_lrs) else te_lrs[0]
                specs.append(GroupSpec(f"textencoder {i + 1}", loras, lr if lr is not None else default_lr,
                                       self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio))
        if self.unet_loras:
            specs.append(GroupSpec("unet", self.unet_loras, unet_lr if unet_lr is not None else default_lr,
                                   self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio))
        return optimizer_groups(specs)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    def apply_max_norm_regularization(self, max_norm_value, device):
        """Cap the Frobenius norm of each module's change (trained change only; base_lora untouched).

        Plain: up and down are scaled by sqrt(ratio) as sd-scripts does. Minor/major: the deviations
        from the frozen copies are scaled by ratio, which caps the first-order change; the reported norm
        is measured afterwards.
        """
        keys_scaled, norms = 0, []
        with torch.no_grad():
            for lo in self.text_encoder_loras + self.unet_loras:
                for i, s in enumerate(lo.slices):
                    if not s.rank:
                        continue
                    d, u = lo.lora_down[i], lo.lora_up[i]
                    d0, u0 = lo.frozen(i)
                    norm = lo.change(i, device).norm().clamp(min=max_norm_value / 2)
                    ratio = (torch.clamp(norm, max=max_norm_value) / norm).item()
                    if ratio != 1:
                        keys_scaled += 1
                        if d0 is None:
                            d.mul_(ratio**0.5)
                            u.mul_(ratio**0.5)
                        else:
                            d.copy_(d0 + (d - d0) * ratio)
                            u.copy_(u0 + (u - u0) * ratio)
                    norms.append(lo.change(i, device).norm().item())
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    def merge_to(self, text_encoders, flux, weights_sd, dtype=None, device=None):
        """Add the file's delta into the model weights (sd-scripts' --base_weights path), in fp32 maths."""
        check_finite(weights_sd)
        modules = dict(_linear_modules(flux))
        te_mods = [_te_linears(te) for te in _as_list(text_encoders)]
        for i, t in enumerate(te_mods):
            modules.update({f"te{i}:{n}": m for n, m in t.items()})
        tmap = _TargetMap(self.unet_shapes, [_shapes(t) for t in te_mods])
        merge_into_modules(tmap.resolve(weights_sd, self.multiplier), modules, dtype, device)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """{transformer module path: dense fp32 change} of the network as it would be saved."""
        self.initialize()
        return {lo.org_path: lo.delta_weight(self.multiplier) for lo in self.unet_loras}

    def restore(self):
        """Put the original forwards back (the base weights were never changed)."""
        for lo in self.text_encoder_loras + self.unet_loras:
            lo.restore()

    # ---- files ----

    def export_state_dict(self) -> tuple[dict, dict]:
        """(tensors, structure) of the standard-LoRA file: every module as one exact rank-R LoRA."""
        self.initialize()
        return export_loras(self.text_encoder_loras + self.unet_loras, self.layout)

    def file_metadata(self, structure: dict, metadata: dict | None = None) -> dict:
        """sd-scripts' ss_* keys (the caller's win) plus ours, which let load_weights split the file back.

        ss_network_dim / ss_network_alpha are the trained rank and alpha, as sd-scripts writes them for the same
        run (their ratio is the scale either way); urae_export_rank is the rank of the tensors in the file.
        """
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        ranks = {s["rank"] for e in structure.values() for s in e["slices"]}
        file_ranks = {_file_rank(e) for e in structure.values()}
        args = {"init": self.init, "targets": self.targets}
        if self.init == "plain":
            args["plain_init"] = self.plain_init
        meta.setdefault("ss_network_module", NETWORK_MODULE)
        meta.setdefault("ss_network_dim", str(self.lora_dim))
        meta.setdefault("ss_network_alpha", str(self.alpha))
        meta.setdefault("ss_network_args", json.dumps(args))
        meta.setdefault("ss_base_model_version", "flux1")
        meta.update({
            "urae_format": "1",
            "urae_init": self.init,
            "urae_rank": str(self.lora_dim if len(ranks) != 1 else ranks.pop()),
            "urae_export_rank": str(max(file_ranks) if file_ranks else 0),
            "urae_export_alpha": str(_file_alpha(structure)),
            "urae_alpha": str(self.alpha),
            "urae_targets": self.targets,
            "urae_layout": self.layout,
            "urae_structure": json.dumps(structure, separators=(",", ":")),
        })
        if self.init == "plain":
            meta["urae_plain_init"] = self.plain_init
        if self.runtime_settings:
            meta["urae_runtime"] = json.dumps(self.runtime_settings, sort_keys=True)
        return meta

    def save_weights(self, file, dtype=None, metadata=None):
        tensors, structure = self.export_state_dict()
        meta = self.file_metadata(structure, metadata)
        dtype = as_dtype(dtype)
        if dtype is not None:
            tensors = {k: v.detach().to("cpu", dtype) for k, v in tensors.items()}
        file = os.fspath(file)
        if file.endswith(".safetensors"):
            model_hash, legacy_hash = _addnet_hashes(tensors, meta)
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
            _save_atomic(tensors, file, meta)
        else:
            torch.save(tensors, file)

    def load_weights(self, file):
        """Load a file into this network: ours resumes exactly; a plain LoRA loads into a plain network."""
        sd, meta = (file, {}) if isinstance(file, dict) else _read_file(file)
        self._load_state(sd, meta, source=str(file) if not isinstance(file, dict) else "state dict")
        return f"loaded {len(sd)} tensors"

    def _load_state(self, sd, meta, source):
        check_finite(sd, source)
        loras = self.text_encoder_loras + self.unet_loras
        if "urae_structure" in meta and meta.get("urae_layout") == self.layout:
            theirs = meta.get("urae_plain_init", "kaiming")  # files from before plain_init existed used kaiming
            if self.init == "plain" and meta.get("urae_init") == "plain" and theirs != self.plain_init:
                raise ValueError(f"{source} was trained with plain_init={theirs}, this network has "
                                 f"plain_init={self.plain_init}; resume with the file's setting")
            load_structured(loras, sd, json.loads(meta["urae_structure"]), source)
            return
        # A plain LoRA file (kohya or PEFT, either layout): only a plain network can take it as is.
        if self.init != "plain":
            raise ValueError(
                f"{source} is a plain LoRA without minor_lora metadata; an init={self.init} network cannot resume "
                f"from it. Pass it as base_lora=... to train on top of it, or use init=plain."
            )
        load_plain(loras, sd, _TargetMap(self.unet_shapes, self.te_shapes), source)


# --------------------------------------------------------------------------------------------
# sd-scripts entry points
# --------------------------------------------------------------------------------------------


KNOWN_ARGS = {"init", "targets", "dropout", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern",
              "train_t5xxl", "svd_device", "init_cache", "base_lora", "runtime", "verbose", "loraplus_lr_ratio",
              "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "plain_init", "svd_weights"}


def create_network(multiplier, network_dim, network_alpha, ae, text_encoders, flux, neuron_dropout=None, **kwargs):
    """sd-scripts FLUX signature; `--network_args` arrive in kwargs as strings."""
    unknown = sorted(set(kwargs) - KNOWN_ARGS)
    if unknown:
        # lora_flux options such as split_qkv/train_blocks mean nothing here; say so instead of ignoring them quietly.
        logger.warning(f"minor_lora: ignoring network_args {unknown}; known: {sorted(KNOWN_ARGS)}")
    network_dim = 16 if network_dim is None else int(network_dim)
    network_alpha = float(network_dim) if network_alpha is None else float(network_alpha)
    dropout = _as_float(kwargs.get("dropout")) if kwargs.get("dropout") is not None else neuron_dropout
    runtime = kwargs.get("runtime")
    if isinstance(runtime, str):
        runtime = json.loads(runtime)
    network = MinorLoRANetwork(
        text_encoders, flux, multiplier=float(multiplier), lora_dim=network_dim, alpha=network_alpha,
        init=str(kwargs.get("init", "minor")), targets=str(kwargs.get("targets", "urae")),
        dropout=_as_float(dropout), rank_dropout=_as_float(kwargs.get("rank_dropout")),
        module_dropout=_as_float(kwargs.get("module_dropout")), rank_pattern=kwargs.get("rank_pattern"),
        alpha_pattern=kwargs.get("alpha_pattern"),
        train_t5xxl=as_bool(kwargs.get("train_t5xxl", False), "train_t5xxl"),
        svd_device=kwargs.get("svd_device"), init_cache=kwargs.get("init_cache"),
        base_lora=kwargs.get("base_lora"), runtime_settings=runtime,
        verbose=as_bool(kwargs.get("verbose", True), "verbose"),
        plain_init=str(kwargs.get("plain_init", "kaiming")), svd_weights=kwargs.get("svd_weights"),
    )
    ratios = [_as_float(kwargs.get(k)) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                                 "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def create_network_from_weights(multiplier, file, ae, text_encoders, flux, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network shaped by a file (ours: exact structure and factors; others: plain slices). -> (network, sd)."""
    meta = {}
    if weights_sd is None:
        weights_sd, meta = _read_file(file)
    check_finite(weights_sd, str(file))
    linears = _linear_modules(flux)
    layout = detect_layout(linears)
    te_shapes = [_shapes(_te_linears(t)) for t in _as_list(text_encoders)]
    plan, init = plan_from_file(weights_sd, meta, layout, _shapes(linears), te_shapes)
    ours = "urae_structure" in meta and meta.get("urae_layout") == layout
    runtime = json.loads(meta["urae_runtime"]) if "urae_runtime" in meta else None
    network = MinorLoRANetwork(
        text_encoders, flux, multiplier=float(multiplier), init=init,
        lora_dim=int(meta.get("urae_rank", 0) or 0) or 16, alpha=float(meta.get("urae_alpha", 16)),
        targets=meta.get("urae_targets", "file"), train_t5xxl=any(e.get("te") == 1 for e in plan.values()),
        runtime_settings=runtime, plan=plan, verbose=False,
        dropout=None if for_inference else _as_float(kwargs.get("dropout")),
        plain_init=meta.get("urae_plain_init", "kaiming") if ours else "kaiming",
    )
    network._load_state(weights_sd, meta if ours else {}, str(file))
    return network, weights_sd


# Public names for the LoRA file tools in networks/ (same objects, no behaviour of their own).
TargetMap = _TargetMap
group_lora_keys = _group_lora_keys
read_lora_file = _read_file
kohya_name = _kohya_name
addnet_hashes = _addnet_hashes
