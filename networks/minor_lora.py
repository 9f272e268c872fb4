"""Minor-component LoRA for FLUX.1 (URAE), as a kohya sd-scripts network module.

    accelerate launch flux_train_network.py ... --network_module networks.minor_lora \
        --network_dim 16 --network_alpha 16 --network_args "init=minor" "targets=urae"

Self-contained (torch, safetensors and the standard library only) so this file can be copied alone
into an sd-scripts checkout.

Maths (torch convention: W is [out, in], y = x W^T + b; scale s = alpha / r):
  * init=minor: the r smallest singular triplets of W; init=major: the r largest; init=plain:
    Kaiming down, zero up. For minor/major the frozen copies up0/down0 satisfy s*up0*down0 = W_r.
  * The base weight is never modified. Forward adds
        s * ((x down^T) up^T - (x down0^T) up0^T),
    evaluated as s * ((x (down - down0)^T) up^T + (x down0^T) (up - up0)^T): the same value and the
    same gradients, but exactly zero at step 0 whatever the GEMM kernel does with rounding.
  * The trained change is a standard rank-2r LoRA, exactly: s * [up | -up0] [down ; down0].
    Files are written in that form (file alpha = s * 2r), so every LoRA loader applies them;
    `urae_*` metadata lets this module split them back and resume training exactly.

Layouts: diffusers `FluxTransformer2DModel` names (files in diffusers/PEFT form) and the original
BFL names that sd-scripts uses (files in kohya form). In the BFL layout fused weights (`qkv`,
`linear1`) are adapted per row slice, each slice with its own SVD, so both layouts produce the
same adapters. A fused target is stored fused: down = stacked slice downs, up = block diagonal,
with zero rows for rows that are not adapted (the MLP rows of `linear1`).

network_args (all strings, as sd-scripts passes them):
  init=minor|major|plain     targets=urae|attn|all|<regex>      svd_device=cpu|cuda[:N]
  rank_pattern="regex:16;regex2:0"   alpha_pattern="regex:8"   (first match wins, rank 0 skips)
  dropout / rank_dropout / module_dropout (as sd-scripts; they act on the change only)
  init_cache=path            base_lora=path (a LoRA fused into W before the SVD, see below)
  train_t5xxl=True           runtime='{"ntk_factor": 10, ...}' (stored in saved files)
  loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio

A custom target regex is searched in the diffusers name of each slice (`transformer_blocks.3.attn.to_q`)
and in its native label (`double_blocks.3.img_attn.qkv:q`; fused slices are q, k, v, mlp).

base_lora: its delta is added to W (fp64) only to take the SVD; W itself stays untouched and the
delta is applied in forward as a frozen extra term (scaled by the multiplier, never dropped).
Saved files contain base delta + trained change, so the result of a 2K (r16) + 4K (r16 minor)
run is one standard LoRA of rank 16 + 32 = 48.
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

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.minor_lora"
PREFIX_UNET = "lora_unet"
PREFIX_TE = ("lora_te1", "lora_te3")  # CLIP-L, T5-XXL: sd-scripts' lora_flux and ComfyUI names
LEGACY_PREFIX_T5 = "lora_te2"  # T5 in older sd-scripts FLUX LoRAs, still read
PEFT_UNET = "transformer"
PEFT_TE = ("text_encoder", "text_encoder_2")
INITS = ("minor", "major", "plain")

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


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _as_float(v):
    return None if v is None or v == "None" else float(v)


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


class _Slice:
    """Rows [start, stop) of a Linear adapted with their own rank, alpha and init."""

    def __init__(self, label: str, equiv: str, start: int, stop: int, rank: int, alpha: float, init: str):
        self.label, self.equiv, self.start, self.stop = label, equiv, start, stop
        self.rank, self.alpha, self.init = int(rank), float(alpha), init
        self.scale = self.alpha / self.rank if self.rank else 0.0

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def frozen(self) -> bool:
        return self.init in ("minor", "major")

    def to_json(self) -> dict:
        return {"label": self.label, "equiv": self.equiv, "rows": [self.start, self.stop], "rank": self.rank,
                "alpha": self.alpha, "init": self.init}


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


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc)
        except ImportError:  # the progress bar is optional
            pass
    return iterable


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


class _TargetMap:
    """Which rows of which model Linear each LoRA file key (kohya or PEFT, either layout) adapts."""

    def __init__(self, shapes: dict[str, tuple[int, int]], te_shapes: list[dict] | None = None):
        self.shapes = shapes
        self.te_shapes = te_shapes or []
        self.layout = detect_layout(shapes)
        self.map: dict[str, list[tuple[str, int, int, int, int]]] = {}  # key -> [(module, a, b, file_a, file_b)]
        for name, (out, _) in shapes.items():
            self._add(name, [(name, 0, out, 0, out)], PREFIX_UNET, PEFT_UNET)
        if self.layout == "bfl":
            for name, (out, inn) in shapes.items():
                eq = bfl_equivalents(name)
                if not eq:
                    continue
                offset = 0
                for d, size in zip(eq, bfl_row_sizes(name, out, inn)):
                    self._add(d, [(name, offset, offset + size, 0, size)], PREFIX_UNET, PEFT_UNET)
                    offset += size
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
                        parts.append((d, 0, size, offset, offset + size))
                        offset += size
                    self._add(bfl, parts, PREFIX_UNET, PEFT_UNET)
        for i, te in enumerate(te_shapes or []):
            for name, (out, _) in te.items():
                self._add(f"te{i}:{name}", [(f"te{i}:{name}", 0, out, 0, out)], PREFIX_TE[i], PEFT_TE[i], path=name)
                if i == 1:
                    self.map.setdefault(_kohya_name(LEGACY_PREFIX_T5, name), [(f"te{i}:{name}", 0, out, 0, out)])

    def _add(self, name, parts, kohya_prefix, peft_prefix, path=None):
        path = path or name
        for key in (_kohya_name(kohya_prefix, path), f"{peft_prefix}.{path}"):
            self.map.setdefault(key, parts)
        if kohya_prefix == PREFIX_UNET:
            self.map.setdefault(path, parts)  # PEFT keys saved without the `transformer.` prefix

    def resolve(self, lora_sd: dict, multiplier: float = 1.0, strict: bool = True, source: str = "LoRA file"):
        """[(module, a, b, down fp32, up fp32 with scale*multiplier folded in)] for every module of the file."""
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
            file_rows = parts[-1][4]
            module, _, _, _, _ = parts[0]
            inn = self._in_features(module)
            if down.shape[1] != inn or up.shape[0] != file_rows:
                target = ", ".join(f"{m} rows {a}:{b} of {self._shape(m)}" for m, a, b, _, _ in parts)
                raise ValueError(
                    f"{source}: shape mismatch for {key}: down {tuple(down.shape)}, up {tuple(up.shape)}; "
                    f"the model's {target} needs down [r, {inn}] and up [{file_rows}, r]"
                )
            coef = alpha / rank * multiplier
            for m, a, b, fa, fb in parts:
                if len(parts) > 1 and not up[fa:fb].any():
                    continue  # an unadapted part of a fused weight (e.g. the MLP rows of linear1)
                out.append((m, a, b, down, up[fa:fb] * coef))
        if unmatched and strict:
            if len(unmatched) == len(groups) or not out:
                raise ValueError(
                    f"{source}: LoRA for another architecture: none of its {len(groups)} modules exist in this "
                    f"FLUX model ({self.layout} layout), e.g. {sorted(unmatched)[:3]}"
                )
            raise ValueError(f"{source}: modules not in this FLUX model: {sorted(unmatched)[:8]}")
        return out

    def _in_features(self, name):
        return self._shape(name)[1]

    def _shape(self, name):
        if name.startswith("te"):
            i, n = name[2:].split(":", 1)
            return self.te_shapes[int(i)][n]
        return self.shapes[name]


def _to_bfl_block(diffusers_name: str) -> str | None:
    m = re.match(r"^(single_)?transformer_blocks\.(\d+)\.", diffusers_name)
    if not m:
        return None
    return f"{'single' if m.group(1) else 'double'}_blocks.{m.group(2)}.x"


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
    tmap = _TargetMap(shapes)
    out = dict(state_dict)
    deltas: dict[str, list] = {}
    for m, a, b, down, up in tmap.resolve(lora_sd, multiplier, strict):
        deltas.setdefault(m, []).append((a, b, down, up))
    for m, items in deltas.items():
        key = f"{prefix}{m}.weight"
        w = state_dict[key].float().clone()
        for a, b, down, up in items:
            w[a:b] += up @ down
        out[key] = w.to(state_dict[key].dtype)
    return out


def lora_delta_weights(lora_sd: dict, shapes: dict[str, tuple[int, int]], multiplier: float = 1.0) -> dict:
    """{module: dense fp32 delta W} of a LoRA on a model whose Linear shapes are given (either layout)."""
    out: dict[str, torch.Tensor] = {}
    for m, a, b, down, up in _TargetMap(shapes).resolve(lora_sd, multiplier):
        d = out.setdefault(m, torch.zeros(shapes[m], dtype=torch.float32))
        d[a:b] += up @ down
    return out


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
# The adapter of one Linear
# --------------------------------------------------------------------------------------------


class MinorLoRAModule(nn.Module):
    """Adapts row slices of one Linear by swapping its forward; the base module and weight stay as they are."""

    def __init__(self, lora_name: str, org_module: nn.Module, slices: list[_Slice], multiplier: float = 1.0,
                 dropout=None, rank_dropout=None, module_dropout=None):
        super().__init__()
        self.lora_name = lora_name
        self.slices = slices
        self.in_features, self.out_features = org_module.in_features, org_module.out_features
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.enabled = True
        self.initialized = all(not s.frozen for s in slices)
        self.org_module_ref = [org_module]  # a list, so the base weights are not the network's parameters
        self.lora_down = nn.ParameterList()
        self.lora_up = nn.ParameterList()
        for i, s in enumerate(slices):
            down = torch.empty(s.rank, self.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.lora_down.append(nn.Parameter(down))
            self.lora_up.append(nn.Parameter(torch.zeros(s.rows, s.rank)))
            if s.frozen:
                self.register_buffer(f"down0_{i}", torch.zeros(s.rank, self.in_features))
                self.register_buffer(f"up0_{i}", torch.zeros(s.rows, s.rank))
            # Frozen delta of a LoRA fused in before the SVD (scale folded into the up factor).
            self.register_buffer(f"base_down_{i}", torch.zeros(0, self.in_features))
            self.register_buffer(f"base_up_{i}", torch.zeros(s.rows, 0))
        self._tiles = self._tiling()

    def _tiling(self) -> list[tuple[int, int, int | None]]:
        """(start, stop, slice index or None) covering all output rows in order."""
        tiles, pos = [], 0
        for i, s in sorted(enumerate(self.slices), key=lambda t: t[1].start):
            if s.start < pos:
                raise ValueError(f"{self.lora_name}: overlapping row slices")
            if s.start > pos:
                tiles.append((pos, s.start, None))
            tiles.append((s.start, s.stop, i))
            pos = s.stop
        if pos < self.out_features:
            tiles.append((pos, self.out_features, None))
        return tiles

    def frozen(self, i):
        return getattr(self, f"down0_{i}", None), getattr(self, f"up0_{i}", None)

    def base(self, i):
        return getattr(self, f"base_down_{i}"), getattr(self, f"base_up_{i}")

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
        downs, ups, segs = [], [], []
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
                    segs.append((i, s.rank, 2))
                else:
                    downs.append(d)
                    ups.append(u * coef)
                    segs.append((i, s.rank, 1))
            if bd.shape[0]:
                downs.append(bd)
                ups.append(bu * self.multiplier)
                segs.append((i, bd.shape[0], 0))
        if not downs:
            return y
        h = F.linear(xin, torch.cat(downs) if len(downs) > 1 else downs[0])
        if self.training and (self.dropout or rank_drop):
            h = self._drop(h, segs)
        # A slice's segments are adjacent columns of h, so each slice needs one view and one up matrix.
        cols: dict[int, list] = {}
        up_blocks: dict[int, list] = {}
        col = ucol = 0
        for i, r, n in segs:
            width, k = r * max(n, 1), max(n, 1)
            cols.setdefault(i, [col, col])[1] = col + width
            up_blocks.setdefault(i, []).extend(ups[ucol: ucol + k])
            col, ucol = col + width, ucol + k
        deltas: dict[int, torch.Tensor] = {}
        for i, (c0, c1) in cols.items():
            ui = up_blocks[i][0] if len(up_blocks[i]) == 1 else torch.cat(up_blocks[i], 1)
            deltas[i] = F.linear(h[..., c0:c1], ui).to(y.dtype)
        if len(self._tiles) == 1:
            return y + deltas[0]
        # Fused weights (qkv, linear1): add each slice's change in place. Rebuilding the output by concatenation
        # would hold a second copy of it (linear1 at 4096²: 66K x 21504 values). A Linear's backward does not
        # use its output, so autograd allows this; a base forward that did would raise, not go wrong.
        for a, b, i in self._tiles:
            if i is not None and i in deltas:
                y[..., a:b] += deltas[i]
        return y

    def _drop(self, h, segs):
        """Neuron/rank dropout on the trained ranks, one mask shared by the trainable and frozen halves."""
        parts, col = [], 0
        for _, r, n in segs:
            width = r * max(n, 1)
            seg = h[..., col: col + width]
            col += width
            if n == 0:
                parts.append(seg)
                continue
            mask = torch.ones_like(seg[..., :r])
            if self.dropout:
                mask = F.dropout(mask, p=self.dropout)
            if self.rank_dropout:
                rmask = (torch.rand(h.shape[0], r, device=h.device) > self.rank_dropout).to(h.dtype)
                mask = mask * rmask.view(h.shape[0], *([1] * (h.dim() - 2)), r)
            parts.append(seg * (mask if n == 1 else torch.cat([mask, mask], -1)))
        return torch.cat(parts, -1)

    # ---- the change as a standard LoRA ----

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """Dense fp32 change of the full weight (base LoRA part + trained change)."""
        down, up, alpha = self.export_factors()
        return (alpha / down.shape[0]) * multiplier * (up.double() @ down.double()).float()

    def export_factors(self):
        """(down [R, in], up [out, R], alpha) with ΔW = alpha / R * up @ down exactly; plus the column layout."""
        ref = next((s.scale for s in self.slices if s.rank), 1.0)
        downs, ups, self._segments = [], [], []
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
                self._segments.append([i, kind, d.shape[0], scale])
        dev = self.lora_down[0].device
        down = torch.cat(downs) if downs else torch.zeros(0, self.in_features, device=dev)
        up = torch.cat(ups, 1) if ups else torch.zeros(self.out_features, 0, device=dev)
        return down, up, ref * down.shape[0]

    def load_factors(self, down: torch.Tensor, up: torch.Tensor, alpha: float, segments: list, source: str):
        """Inverse of export_factors for a file written by this module with the same structure."""
        ref = float(alpha) / down.shape[0]
        col = 0
        with torch.no_grad():
            for i, kind, r, scale in segments:
                s = self.slices[i]
                d = down[col: col + r]
                u = up[s.start: s.stop, col: col + r]
                if scale != ref:
                    u = u * (ref / scale)
                col += r
                if kind == "train":
                    self._set(self.lora_down[i], d, source)
                    self._set(self.lora_up[i], u, source)
                elif kind == "init":
                    d0, u0 = self.frozen(i)
                    self._set(d0, d, source)
                    self._set(u0, -u, source)
                else:
                    like = self.lora_down[i]
                    setattr(self, f"base_down_{i}", d.to(like.device, like.dtype).clone())
                    setattr(self, f"base_up_{i}", u.to(like.device, like.dtype).clone())
        self.initialized = True

    def _set(self, dst: torch.Tensor, src: torch.Tensor, source: str):
        if dst.shape != src.shape:
            raise ValueError(f"{source}: {self.lora_name}: stored factor {tuple(src.shape)} != expected {tuple(dst.shape)}")
        dst.copy_(src)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _linear_modules(root: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear)}


def _te_linears(te: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers inside the encoder layers of CLIP (`.layers.`) or T5 (`.block.`)."""
    return {n: m for n, m in _linear_modules(te).items() if ".layers." in n or ".block." in n}


class MinorLoRANetwork(nn.Module):
    def __init__(self, text_encoders, unet, multiplier: float = 1.0, lora_dim: int = 16, alpha: float = 16.0,
                 init: str = "minor", targets: str = "urae", dropout=None, rank_dropout=None, module_dropout=None,
                 rank_pattern=None, alpha_pattern=None, train_t5xxl: bool = False, svd_device=None,
                 init_cache=None, base_lora=None, runtime_settings: dict | None = None, plan: dict | None = None,
                 verbose: bool = True):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: expected one of {INITS}")
        self.multiplier = multiplier
        self.lora_dim, self.alpha, self.init = int(lora_dim), float(alpha), init
        self.targets = targets
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.train_t5xxl = bool(train_t5xxl)
        self.svd_device = svd_device
        self.init_cache = init_cache
        self.base_lora = base_lora
        self.runtime_settings = dict(runtime_settings or {})
        self.verbose = verbose
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        self.svd_layers_computed = 0

        linears = _linear_modules(unet)
        self.layout = detect_layout(linears)
        self.unet_shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
        text_encoders = list(text_encoders or []) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        text_encoders = [t for t in text_encoders if t is not None]
        self.te_shapes = []
        for te in text_encoders:
            self.te_shapes.append({n: (m.out_features, m.in_features) for n, m in _te_linears(te).items()})

        self.unet_loras: list[MinorLoRAModule] = []
        self.text_encoder_loras: list[MinorLoRAModule] = []
        if plan is not None:
            self._build_from_plan(plan, linears, text_encoders)
        else:
            self._build(linears, text_encoders, rank_pattern, alpha_pattern)
        for lora in self.unet_loras + self.text_encoder_loras:
            lora._network = weakref.ref(self)
        self._ensure_paths()
        names = [lo.lora_name for lo in self.unet_loras + self.text_encoder_loras]
        if len(set(names)) != len(names):
            raise ValueError("duplicated LoRA module names")
        if verbose:
            n = sum(s.rank * (s.rows + lo.in_features) for lo in self.unet_loras for s in lo.slices)
            logger.info(f"minor_lora: init={init}, targets={targets}, {len(self.unet_loras)} transformer modules "
                        f"({self.layout} layout), {n / 1e6:.2f} M trainable parameters")

    # ---- building ----

    def _slice_plan(self, name: str, out: int, inn: int) -> list[tuple[str, str, int, int]]:
        """(label, diffusers name, start, stop) for each row slice of one transformer Linear."""
        if self.layout == "diffusers":
            return [(name, name, 0, out)]
        eq = bfl_equivalents(name)
        if not eq:
            return [(name, name, 0, out)]
        if len(eq) == 1:
            return [(name, eq[0], 0, out)]
        res, pos = [], 0
        for j, (d, size) in enumerate(zip(eq, bfl_row_sizes(name, out, inn))):
            res.append((f"{name}:{_SLICE_LABELS[j]}", d, pos, pos + size))
            pos += size
        return res

    def _build(self, linears, text_encoders, rank_pattern, alpha_pattern):
        preset = TARGET_PRESETS.get(self.targets)
        target_re = re.compile(preset if preset else self.targets)
        custom = preset is None
        ranks, alphas = _parse_patterns(rank_pattern), _parse_patterns(alpha_pattern)
        used = set()

        def pick(patterns, label, equiv, default):
            for j, (p, v) in enumerate(patterns):
                if p.search(equiv) or p.search(label):
                    used.add((id(patterns), j))
                    return v
            return default

        for name, mod in linears.items():
            slices = []
            for label, equiv, a, b in self._slice_plan(name, mod.out_features, mod.in_features):
                hit = target_re.search(equiv) if not custom else (target_re.search(equiv) or target_re.search(label))
                if not hit:
                    continue
                rank = int(pick(ranks, label, equiv, self.lora_dim))
                alpha = pick(alphas, label, equiv, self.alpha)
                if rank == 0:
                    continue
                limit = min(b - a, mod.in_features)
                if rank >= limit:
                    raise ValueError(
                        f"rank {rank} >= min(out, in) = {limit} for target {label} (rows {a}:{b} of weight "
                        f"{tuple(mod.weight.shape)}); use a smaller network_dim or a rank_pattern"
                    )
                slices.append(_Slice(label, equiv, a, b, rank, alpha, self.init))
            if slices:
                self.unet_loras.append(self._make(_kohya_name(PREFIX_UNET, name), mod, slices))
        if not self.unet_loras:
            raise ValueError(
                f"targets={self.targets!r} matched no Linear of the transformer ({self.layout} layout, "
                f"{len(linears)} Linear modules, e.g. {sorted(linears)[:3]})"
            )
        for patterns, what in ((ranks, "rank_pattern"), (alphas, "alpha_pattern")):
            for j, (p, _) in enumerate(patterns):
                if (id(patterns), j) not in used:
                    raise ValueError(f"{what} entry {p.pattern!r} matches no targeted module")
        for i, te in enumerate(text_encoders[:2]):
            if i == 1 and not self.train_t5xxl:
                continue
            for name, mod in _te_linears(te).items():
                rank = min(self.lora_dim, min(mod.in_features, mod.out_features) - 1)
                s = _Slice(name, name, 0, mod.out_features, rank, self.alpha, self.init)
                self.text_encoder_loras.append(self._make(_kohya_name(PREFIX_TE[i], name), mod, [s]))
        if self.base_lora is not None:
            self._attach_base_lora(self.base_lora)

    def _make(self, lora_name, mod, slices):
        return MinorLoRAModule(lora_name, mod, slices, self.multiplier, self.dropout, self.rank_dropout,
                               self.module_dropout)

    def _build_from_plan(self, plan, linears, text_encoders):
        te_lins = [_te_linears(te) for te in text_encoders]
        for lora_name, entry in plan.items():
            path, te = entry["module"], entry.get("te")
            mods = linears if te is None else (te_lins[te] if te < len(te_lins) else {})
            if path not in mods:
                raise ValueError(f"LoRA file module {lora_name} ({path}) does not exist in the model")
            mod = mods[path]
            slices = [_Slice(s["label"], s["equiv"], s["rows"][0], s["rows"][1], s["rank"], s["alpha"], s["init"])
                      for s in entry["slices"]]
            lora = self._make(lora_name, mod, slices)
            (self.unet_loras if te is None else self.text_encoder_loras).append(lora)

    def _lora_by_module(self):
        return {lo.org_module_ref[0]: lo for lo in self.unet_loras}

    def fuse_base_lora(self, lora):
        """API form of base_lora=...: a LoRA (path or state dict) whose delta the SVD sees and forward applies."""
        if any(lo.initialized and any(s.frozen for s in lo.slices) for lo in self.unet_loras):
            raise RuntimeError("fuse_base_lora must be called before the SVD initialisation")
        self.base_lora = lora
        self._attach_base_lora(lora)

    def set_runtime_settings(self, settings: dict):
        """High-res runtime settings (NTK factor, proportional attention, ...) to record in saved files."""
        self.runtime_settings = dict(settings)

    def _attach_base_lora(self, base):
        """Store a LoRA's delta per targeted slice as frozen factors (the SVD then sees W + delta)."""
        sd, _ = (base, {}) if isinstance(base, dict) else _read_file(base)
        check_finite(sd, f"base_lora {base if not isinstance(base, dict) else ''}")
        te_keys = [k for k in sd if k.startswith((*PREFIX_TE, LEGACY_PREFIX_T5, *PEFT_TE))]
        if te_keys:
            logger.warning(f"minor_lora: base_lora has {len(te_keys)} text-encoder tensors; only its transformer "
                           f"part is stacked, so saved files will not contain them")
        by_name = {lo.lora_name: lo for lo in self.unet_loras}
        tmap = _TargetMap(self.unet_shapes)
        per_slice: dict[tuple[str, int], list] = {}
        for m, a, b, down, up in tmap.resolve(sd, 1.0, source="base_lora"):
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
            lora = by_name[name]
            setattr(lora, f"base_down_{i}", torch.cat([d for d, _ in items]).contiguous())
            setattr(lora, f"base_up_{i}", torch.cat([u for _, u in items], 1).contiguous())

    # ---- SVD initialisation ----

    def initialize(self, force: bool = False):
        """Fill minor/major factors by per-slice SVD (cached, shared across processes). Idempotent."""
        todo = [lo for lo in self.unet_loras + self.text_encoder_loras if force or not lo.initialized]
        jobs = [(lo, i) for lo in todo for i, s in enumerate(lo.slices) if s.frozen]
        if not jobs:
            for lo in todo:
                lo.initialized = True
            return
        key = self._cache_key(jobs) if self.init_cache else None
        cached = self._load_cache(key) if key else None
        results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if cached is not None:
            results = cached
            if self.verbose:
                logger.info(f"minor_lora: SVD initialisation read from cache {self.init_cache}")
        else:
            results = self._compute_svd(jobs)
            if key:
                self._save_cache(key, results)
        with torch.no_grad():
            for lo, i in jobs:
                s = lo.slices[i]
                us, sv = results[f"{lo.lora_name}.{i}"]
                root = math.sqrt(s.scale)
                up0, down0 = (us.double() / root).float(), (sv.double() / root).float()
                d0, u0 = lo.frozen(i)
                d0.copy_(down0)
                u0.copy_(up0)
                lo.lora_down[i].copy_(down0)
                lo.lora_up[i].copy_(up0)
        for lo in todo:
            lo.initialized = True

    def _effective_weight(self, lo: MinorLoRAModule, i: int) -> torch.Tensor:
        s = lo.slices[i]
        w = lo.org_module_ref[0].weight.detach()[s.start: s.stop]
        bd, bu = lo.base(i)
        if bd.shape[0]:
            w = w.double() + bu.double() @ bd.double()
        return w

    def _compute_svd(self, jobs):
        dist = torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist else (1, 0)
        results = {}
        mine = [j for k, j in enumerate(jobs) if k % world == rank]
        bar = _progress(mine, len(mine), f"minor_lora SVD ({self.init})", self.verbose and rank == 0)
        for lo, i in bar:
            s = lo.slices[i]
            w = self._effective_weight(lo, i)
            dev = self.svd_device or _default_svd_device(w)
            us, sv, _ = svd_components(w, s.rank, s.init, device=dev)
            # contiguous: broadcast sends raw storage, and these come out column-major from the matmuls
            results[f"{lo.lora_name}.{i}"] = (us.float().cpu().contiguous(), sv.float().cpu().contiguous())
            self.svd_layers_computed += 1
        if world > 1:
            comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            for k, (lo, i) in enumerate(jobs):
                s = lo.slices[i]
                key = f"{lo.lora_name}.{i}"
                if key in results:
                    us, sv = results[key][0].to(comm), results[key][1].to(comm)
                else:
                    us = torch.empty(s.rows, s.rank, device=comm)
                    sv = torch.empty(s.rank, lo.in_features, device=comm)
                dist.broadcast(us, src=k % world)
                dist.broadcast(sv, src=k % world)
                results[key] = (us.cpu(), sv.cpu())
        return results

    def _cache_key(self, jobs) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"v": 1, "targets": self.targets}).encode())
        for lo, i in jobs:
            s = lo.slices[i]
            h.update(json.dumps([lo.lora_name, s.label, s.start, s.stop, s.rank, s.init]).encode())
            _tensor_digest(h, lo.org_module_ref[0].weight[s.start: s.stop])
            for t in lo.base(i):
                _tensor_digest(h, t)
        return h.hexdigest()

    def _load_cache(self, key):
        path = os.fspath(self.init_cache)
        if not os.path.isfile(path):
            return None
        sd, meta = _read_file(path)
        if meta.get("urae_init_cache_key") != key:
            if self.verbose:
                logger.info(f"minor_lora: {path} was made for other weights/settings; recomputing")
            return None
        out = {}
        for k in sd:
            if k.endswith(".us"):
                out[k[:-3]] = (sd[k], sd[k[:-3] + ".sv"])
        return out

    def _save_cache(self, key, results):
        dist = torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None
        if dist and dist.get_rank() != 0:
            return
        tensors = {}
        for k, (us, sv) in results.items():
            tensors[k + ".us"], tensors[k + ".sv"] = us, sv
        _save_atomic(tensors, os.fspath(self.init_cache), {"urae_init_cache_key": key})

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
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
            te_lrs = [default_lr]
        elif isinstance(text_encoder_lr, (int, float)):
            te_lrs = [float(text_encoder_lr)]
        else:
            te_lrs = list(text_encoder_lr)
        self.initialize()
        self.requires_grad_(True)
        all_params, descriptions = [], []

        def assemble(loras, lr, ratio, desc):
            groups = {"lora": [], "plus": []}
            for lo in loras:
                for name, p in lo.named_parameters():
                    groups["plus" if ratio and name.startswith("lora_up") else "lora"].append(p)
            for key, params in groups.items():
                if not params:
                    continue
                group = {"params": params}
                if lr is not None:
                    group["lr"] = lr * ratio if key == "plus" else lr
                if group.get("lr") == 0:
                    continue
                all_params.append(group)
                descriptions.append(desc + (" plus" if key == "plus" else ""))

        for i, prefix in enumerate(PREFIX_TE):
            loras = [lo for lo in self.text_encoder_loras if lo.lora_name.startswith(prefix + "_")]
            if loras:
                lr = te_lrs[i] if i < len(te_lrs) else te_lrs[0]
                assemble(loras, lr if lr is not None else default_lr,
                         self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio, f"textencoder {i + 1}")
        if self.unet_loras:
            assemble(self.unet_loras, unet_lr if unet_lr is not None else default_lr,
                     self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet")
        return all_params, descriptions

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    # ---- files ----

    def _file_key(self, lora: MinorLoRAModule) -> str:
        if self.layout == "bfl":
            return lora.lora_name
        for i, prefix in enumerate(PREFIX_TE):
            if lora.lora_name.startswith(prefix + "_"):
                return f"{PEFT_TE[i]}.{lora.org_path}"
        return f"{PEFT_UNET}.{lora.org_path}"

    def export_state_dict(self) -> tuple[dict, dict]:
        """(tensors, structure) of the standard-LoRA file: every module as one exact rank-R LoRA."""
        self.initialize()
        self._ensure_paths()
        tensors, structure = {}, {}
        peft = self.layout == "diffusers"
        for lo in self.text_encoder_loras + self.unet_loras:
            down, up, alpha = lo.export_factors()
            if down.shape[0] == 0:
                continue
            key = self._file_key(lo)
            if peft:
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
            else:
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            te = next((i for i, p in enumerate(PREFIX_TE) if lo.lora_name.startswith(p + "_")), None)
            structure[key] = {"lora_name": lo.lora_name, "module": lo.org_path, "te": te,
                              "slices": [s.to_json() for s in lo.slices], "segments": lo._segments}
        return tensors, structure

    def _ensure_paths(self):
        lookup = {}
        for n in self.unet_shapes:
            lookup[_kohya_name(PREFIX_UNET, n)] = n
        for i, shapes in enumerate(self.te_shapes):
            for n in shapes:
                lookup[_kohya_name(PREFIX_TE[i], n)] = n
        for lo in self.text_encoder_loras + self.unet_loras:
            lo.org_path = lookup[lo.lora_name]

    def file_metadata(self, structure: dict, metadata: dict | None = None) -> dict:
        """sd-scripts' ss_* keys (the caller's win) plus ours, which let load_weights split the file back."""
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        ranks = {s["rank"] for e in structure.values() for s in e["slices"]}
        file_ranks = {sum(seg[2] for seg in e["segments"]) for e in structure.values()}
        args = {"init": self.init, "targets": self.targets}
        meta.setdefault("ss_network_module", NETWORK_MODULE)
        meta.setdefault("ss_network_dim", str(max(file_ranks) if file_ranks else 0))
        meta.setdefault("ss_network_alpha", str(self._file_alpha(structure)))
        meta.setdefault("ss_network_args", json.dumps(args))
        meta.setdefault("ss_base_model_version", "flux1")
        meta.update({
            "urae_format": "1",
            "urae_init": self.init,
            "urae_rank": str(self.lora_dim if len(ranks) != 1 else ranks.pop()),
            "urae_alpha": str(self.alpha),
            "urae_targets": self.targets,
            "urae_layout": self.layout,
            "urae_structure": json.dumps(structure, separators=(",", ":")),
        })
        if self.runtime_settings:
            meta["urae_runtime"] = json.dumps(self.runtime_settings, sort_keys=True)
        return meta

    @staticmethod
    def _file_alpha(structure):
        alphas = set()
        for e in structure.values():
            s = e["slices"][0]
            alphas.add(s["alpha"] / s["rank"] * sum(seg[2] for seg in e["segments"]) if s["rank"] else 0)
        return alphas.pop() if len(alphas) == 1 else "mixed"

    def save_weights(self, file, dtype=None, metadata=None):
        tensors, structure = self.export_state_dict()
        meta = self.file_metadata(structure, metadata)
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
        self._ensure_paths()
        structure = json.loads(meta["urae_structure"]) if "urae_structure" in meta else None
        by_name = {lo.lora_name: lo for lo in self.text_encoder_loras + self.unet_loras}
        groups = _group_lora_keys(sd)
        if structure is not None and meta.get("urae_layout") == self.layout:
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
                self._check_shape(lo, g, source)
                lo.load_factors(g["down"].float(), g["up"].float(), float(g.get("alpha", g["down"].shape[0])),
                                e["segments"], source)
            return
        # A plain LoRA file (kohya or PEFT, either layout): only a plain network can take it as is.
        if self.init != "plain":
            raise ValueError(
                f"{source} is a plain LoRA without minor_lora metadata; an init={self.init} network cannot resume "
                f"from it. Pass it as base_lora=... to fuse it into W first, or use init=plain."
            )
        tmap = _TargetMap(self.unet_shapes, self.te_shapes)
        for m, a, b, down, up in tmap.resolve(sd, 1.0, source=source):
            if m.startswith("te"):
                i, path = m[2:].split(":", 1)
                name = _kohya_name(PREFIX_TE[int(i)], path)
            else:
                name = _kohya_name(PREFIX_UNET, m)
            lo = by_name.get(name)
            s_idx = next((i for i, s in enumerate(lo.slices) if (s.start, s.stop) == (a, b)), None) if lo else None
            if s_idx is None:
                raise ValueError(f"{source}: adapts rows {a}:{b} of {m}, which this network does not adapt")
            s = lo.slices[s_idx]
            if down.shape[0] != s.rank:
                raise ValueError(f"{source}: {m} rows {a}:{b} has rank {down.shape[0]}, this network {s.rank}")
            with torch.no_grad():
                lo.lora_down[s_idx].copy_(down)
                lo.lora_up[s_idx].copy_(up / s.scale)  # `up` arrives with the file's scale folded in
            lo.initialized = True

    @staticmethod
    def _check_shape(lo, g, source):
        r = g["down"].shape[0]
        if g["down"].shape != (r, lo.in_features) or g["up"].shape != (lo.out_features, r):
            raise ValueError(
                f"{source}: shape mismatch for {lo.lora_name}: file down {tuple(g['down'].shape)}, "
                f"up {tuple(g['up'].shape)}; module weight is ({lo.out_features}, {lo.in_features})"
            )

    def merge_to(self, text_encoders, flux, weights_sd, dtype=None, device=None):
        """Add the file's delta into the model weights (sd-scripts' --base_weights path), in fp32 maths."""
        check_finite(weights_sd)
        modules = _linear_modules(flux)
        tes = list(text_encoders or []) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
        te_mods = [_te_linears(te) for te in tes if te is not None]
        tmap = _TargetMap(self.unet_shapes, [{n: (m.out_features, m.in_features) for n, m in t.items()}
                                             for t in te_mods])
        with torch.no_grad():
            for m, a, b, down, up in tmap.resolve(weights_sd, self.multiplier):
                if m.startswith("te"):
                    i, n = m[2:].split(":", 1)
                    mod = te_mods[int(i)][n]
                else:
                    mod = modules[m]
                w = mod.weight
                dev = device or w.device
                new = w.detach().to(dev, torch.float32)
                new[a:b] += (up.to(dev) @ down.to(dev))
                w.data = new.to(dtype or w.dtype).to(w.device)

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
                    norm = _change(d, u, d0, u0, s.scale, device).norm().clamp(min=max_norm_value / 2)
                    ratio = (torch.clamp(norm, max=max_norm_value) / norm).item()
                    if ratio != 1:
                        keys_scaled += 1
                        if d0 is None:
                            d.mul_(ratio**0.5)
                            u.mul_(ratio**0.5)
                        else:
                            d.copy_(d0 + (d - d0) * ratio)
                            u.copy_(u0 + (u - u0) * ratio)
                    norms.append(_change(d, u, d0, u0, s.scale, device).norm().item())
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """{transformer module path: dense fp32 change} of the network as it would be saved."""
        self.initialize()
        self._ensure_paths()
        return {lo.org_path: lo.delta_weight(self.multiplier) for lo in self.unet_loras}

    def restore(self):
        """Put the original forwards back (the base weights were never changed)."""
        for lo in self.text_encoder_loras + self.unet_loras:
            lo.restore()


def _change(d, u, d0, u0, scale, device):
    dw = u.to(device) @ d.to(device)
    if d0 is not None:
        dw = dw - u0.to(device) @ d0.to(device)
    return dw * scale


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


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


def _plan_from_file(sd: dict, meta: dict, layout: str, unet_shapes: dict, te_shapes: list) -> tuple[dict, str]:
    """Network structure for a file: ours (same layout) exactly; any other LoRA as plain slices."""
    if "urae_structure" in meta and meta.get("urae_layout") == layout:
        plan = {}
        for e in json.loads(meta["urae_structure"]).values():
            plan[e["lora_name"]] = {"module": e["module"], "te": e["te"], "slices": e["slices"]}
        return plan, meta.get("urae_init", "minor")
    tmap = _TargetMap(unet_shapes, te_shapes)
    plan: dict[str, dict] = {}
    for m, a, b, down, _up in tmap.resolve(sd, 1.0):
        if m.startswith("te"):
            i, path = m[2:].split(":", 1)
            name, te = _kohya_name(PREFIX_TE[int(i)], path), int(i)
        else:
            name, te, path = _kohya_name(PREFIX_UNET, m), None, m
        e = plan.setdefault(name, {"module": path, "te": te, "slices": []})
        if any(not (b <= s["rows"][0] or a >= s["rows"][1]) for s in e["slices"]):
            raise ValueError(f"LoRA file adapts overlapping rows of {m} through several keys")
        # alpha = rank: the file's scale arrives folded into `up` when the factors are loaded.
        e["slices"].append({"label": f"{m}[{a}:{b}]", "equiv": m, "rows": [a, b], "rank": down.shape[0],
                            "alpha": float(down.shape[0]), "init": "plain"})
    for e in plan.values():
        e["slices"].sort(key=lambda s: s["rows"][0])
    return plan, "plain"


# --------------------------------------------------------------------------------------------
# sd-scripts entry points
# --------------------------------------------------------------------------------------------


KNOWN_ARGS = {"init", "targets", "dropout", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern",
              "train_t5xxl", "svd_device", "init_cache", "base_lora", "runtime", "verbose", "loraplus_lr_ratio",
              "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}


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
        alpha_pattern=kwargs.get("alpha_pattern"), train_t5xxl=_as_bool(kwargs.get("train_t5xxl", False)),
        svd_device=kwargs.get("svd_device"), init_cache=kwargs.get("init_cache"),
        base_lora=kwargs.get("base_lora"), runtime_settings=runtime,
        verbose=_as_bool(kwargs.get("verbose", True)),
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
    layout = detect_layout(_linear_modules(flux))
    tes = list(text_encoders or []) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    te_shapes = [{n: (m.out_features, m.in_features) for n, m in _te_linears(t).items()} for t in tes if t is not None]
    unet_shapes = {n: (m.out_features, m.in_features) for n, m in _linear_modules(flux).items()}
    plan, init = _plan_from_file(weights_sd, meta, layout, unet_shapes, te_shapes)
    runtime = json.loads(meta["urae_runtime"]) if "urae_runtime" in meta else None
    network = MinorLoRANetwork(
        text_encoders, flux, multiplier=float(multiplier), init=init,
        lora_dim=int(meta.get("urae_rank", 0) or 0) or 16, alpha=float(meta.get("urae_alpha", 16)),
        targets=meta.get("urae_targets", "file"), train_t5xxl=any(e.get("te") == 1 for e in plan.values()),
        runtime_settings=runtime, plan=plan, verbose=False,
        dropout=None if for_inference else _as_float(kwargs.get("dropout")),
    )
    network._load_state(weights_sd, meta if "urae_structure" in meta and meta.get("urae_layout") == layout else {},
                        str(file))
    return network, weights_sd


# Public names for the LoRA file tools in networks/ (same objects, no behaviour of their own).
TargetMap = _TargetMap
group_lora_keys = _group_lora_keys
read_lora_file = _read_file
kohya_name = _kohya_name
addnet_hashes = _addnet_hashes
