"""Extract a LoRA from the difference of two FLUX transformer checkpoints by truncated SVD.

    python -m networks.extract_lora TUNED BASE OUT --rank 32 [--targets urae|attn|all|linear|REGEX]
        [--to peft|kohya] [--report errors.json]

TUNED and BASE are diffusers folders or single-file transformers, in either layout (they may
differ). Per target Linear (diffusers names; `urae` = the 190 attention projections of FLUX.1,
`all` = every Linear in the blocks, `linear` = every Linear) the difference D = W_tuned − W_base
is taken in fp64 and its R largest singular triplets (randomized by default, or minor_lora's fp64
SVD code with --method exact) become down = sqrt(S) Vh, up = U sqrt(S), alpha = R. Layers with D = 0
are skipped. Weights are read one layer at a time.

The reported error is ||D − up·down||_F / ||D||_F per layer: how much of the stored difference the
rank-R LoRA misses. When TUNED is stored in bf16/fp16 (a merged model usually is), D includes the
rounding of every tuned weight, which no low-rank LoRA can fit; that part alone, the rounding floor
sqrt(Σ ulp(w)²/12) / ||D||, is reported beside it. An error near its floor means the LoRA already
holds the change (the rest is rounding, and a larger rank only fits the rounding); an error well
above it means the change needs a larger rank.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from networks.convert_lora import _put, to_kohya
from networks.lora_files import (
    DTYPES,
    Checkpoint,
    UserError,
    did_you_mean,
    output_metadata,
    output_path,
    progress_bar,
    run_cli,
)
from networks.minor_lora import PEFT_UNET, TARGET_PRESETS, svd_components
from urae.io import atomic_path, save_safetensors_atomic

PRESETS = {**TARGET_PRESETS, "linear": r".*"}


def low_rank(d: torch.Tensor, rank: int, method: str = "lowrank") -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in fp64 with up @ down the rank-`rank` truncated SVD of d.

    "exact": minor_lora's fp64 Gram-eigh SVD code (the R largest triplets). "lowrank": randomized
    range finder with 16 extra columns and 4 power iterations (torch.svd_lowrank, seeded): an n²·R
    cost instead of n³, ~10x faster at 3072², exact when rank(d) <= R and within rounding of the
    optimum for the fast-decaying spectra of fine-tuning differences (the reported error is measured).
    """
    k = min(rank, *d.shape)
    q = k + 16
    if method == "lowrank" and q < min(d.shape):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(d, q=q, niter=4)
        root = s[:k].sqrt()
        return u[:, :k] * root, root[:, None] * v[:, :k].T
    if k < min(d.shape):
        up, down, _ = svd_components(d, k, "major")
        return up, down
    u, s, vh = torch.linalg.svd(d, full_matrices=False)  # rank covers the whole matrix: exact
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


# (integer view, exponent shift, exponent mask, exponent bias, mantissa bits) of the float formats a checkpoint stores.
_FLOAT_BITS = {torch.bfloat16: (torch.int16, 7, 0xFF, 127, 7), torch.float16: (torch.int16, 10, 0x1F, 15, 10),
               torch.float32: (torch.int32, 23, 0xFF, 127, 23)}


def rounding_floor(stored: torch.Tensor) -> float:
    """Expected ||round(x) − x||_F of the values `stored` holds after rounding to its dtype: each element's
    error is uniform within half a unit in the last place (ulp), so its mean square is ulp² / 12.

    Counted from a histogram of the exponent bits (about 0.2–0.4 s for 3072² on 2 CPU cores, a fifth of its SVD);
    zeros and subnormals, whose rounding is negligible, are left out."""
    if stored.dtype not in _FLOAT_BITS:
        return 0.0
    view, shift, mask, bias, mantissa = _FLOAT_BITS[stored.dtype]
    exponent = (stored.contiguous().view(view).int() >> shift) & mask
    counts = torch.bincount(exponent.flatten(), minlength=mask + 1).double()
    e = torch.arange(mask + 1, dtype=torch.float64)
    ulp_sq = torch.exp2(2 * (e - bias - mantissa))
    ulp_sq[0] = ulp_sq[mask] = 0  # zero/subnormal, inf/nan
    return float(((counts * ulp_sq).sum() / 12).sqrt())


def merged_rank_hint(ck: Checkpoint, rank: int) -> str | None:
    """A hint when a checkpoint written by merge_lora holds a minor/major adapter of rank r and `rank` < 2r."""
    text = next((m["urae_merged_loras"] for m in ck.metadata.values() if "urae_merged_loras" in m), None)
    if not text:
        return None
    try:
        records = json.loads(text)
    except ValueError:
        return None
    total = sum(int(r.get("rank", 0)) for r in records)
    if rank >= total:
        return None
    parts = []
    for r in records:
        if r.get("init") in ("minor", "major") and r.get("trained_rank"):
            t = int(r["trained_rank"])
            parts.append(f"{r['file']} was trained at rank {t} with init={r['init']}: its change is rank {2 * t} "
                         f"({t} trained + {t} frozen {r['init']} components)")
        else:
            parts.append(f"{r['file']} has rank {r.get('rank')}")
    return (f"hint: {ck.path.name} holds merged LoRAs of total rank {total}: " + "; ".join(parts)
            + f". --rank {rank} cannot hold that exactly; --rank {total} can.")


def extract(tuned, base, rank: int, targets: str = "urae", progress: bool = True, method: str = "lowrank"):
    """(PEFT tensors, metadata, [(layer, relative error, rounding floor)]) of the rank-R LoRA of tuned − base."""
    if rank < 1:
        raise UserError(f"--rank must be >= 1, got {rank}")
    pattern = re.compile(PRESETS.get(targets, targets))
    out, errors = {}, []
    with Checkpoint(tuned) as ct, Checkpoint(base) as cb:
        st, sb = ct.diffusers_linear_shapes(), cb.diffusers_linear_shapes()
        if set(st) != set(sb) or any(st[n] != sb[n] for n in st):
            diff = sorted(set(st) ^ set(sb)) or [n for n in st if st[n] != sb[n]]
            raise UserError(f"{tuned} and {base} are transformers of different shapes/architectures "
                            f"(e.g. {diff[:3]}); both must be the same FLUX variant")
        names = sorted(n for n in st if pattern.search(n))
        if not names:
            raise UserError(f"targets={targets!r} matches none of the {len(st)} Linear layers"
                            f"{did_you_mean(targets, PRESETS)}")
        hint = merged_rank_hint(ct, rank)
        if hint:
            print(hint, file=sys.stderr)
        for name in progress_bar(names, f"rank-{rank} SVD", progress):
            w = ct.diffusers_weight(name)
            d = w.double() - cb.diffusers_weight(name).double()
            if not torch.isfinite(d).all():
                raise UserError(f"{name}: the difference contains NaN or Inf (a damaged checkpoint?)")
            norm = d.norm()
            if norm == 0:
                continue
            up, down = low_rank(d, rank, method)
            errors.append((name, float((d - up @ down).norm() / norm), rounding_floor(w) / float(norm)))
            _put(out, f"{PEFT_UNET}.{name}", "peft", down, up, down.shape[0], torch.float32)
    if not out:
        raise UserError(f"{tuned} and {base} have identical weights in every target layer; nothing to extract")
    written = max(v.shape[0] for k, v in out.items() if k.endswith(".lora_A.weight"))  # min(rank, out, in)
    meta = {"ss_network_dim": str(written), "ss_network_alpha": str(written), "ss_base_model_version": "flux1",
            "urae_extracted_rank": str(written), "urae_extracted_targets": targets,
            "urae_extracted_max_rel_error": f"{max(e[1] for e in errors):.3e}",
            "urae_extracted_max_rounding_floor": f"{max(e[2] for e in errors):.3e}"}
    return out, meta, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m networks.extract_lora", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("tuned", help="the fine-tuned (or merged) transformer: diffusers folder or single file")
    ap.add_argument("base", help="the transformer it was tuned from")
    ap.add_argument("output", help="the LoRA file to write")
    ap.add_argument("--rank", type=int, required=True,
                    help="rank of the LoRA (a minor/major adapter trained at rank r changes the model at rank 2r)")
    ap.add_argument("--targets", default="urae", help="urae (default), attn, all (block Linears), linear, or a regex "
                                                      "on diffusers names")
    ap.add_argument("--to", choices=("peft", "kohya"), default="peft", help="form of the LoRA file (default: peft)")
    ap.add_argument("--method", choices=("lowrank", "exact"), default="lowrank",
                    help="randomized truncated SVD (fast, default) or a full fp64 SVD per layer")
    ap.add_argument("--save_dtype", "--save-dtype", choices=list(DTYPES), help="dtype of the factors (default fp32)")
    ap.add_argument("--report", help="also write every layer's relative error and rounding floor to this JSON file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output (and report) file")
    ap.add_argument("--no_metadata", "--no-metadata", action="store_true",
                    help="write no metadata (no extraction record) into the LoRA")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    return run_cli(lambda: _run(a))


def _run(a) -> int:
    output = output_path(a.output, overwrite=a.overwrite, inputs=[a.tuned, a.base])
    report = output_path(a.report, overwrite=a.overwrite, inputs=[a.tuned, a.base, output]) if a.report else None
    print(f"extracting a rank-{a.rank} LoRA ({a.targets} targets) from {a.tuned} - {a.base} -> {output}")
    tensors, meta, errors = extract(a.tuned, a.base, a.rank, a.targets, not a.no_progress, a.method)
    dtype = DTYPES.get(a.save_dtype)
    if a.to == "kohya":
        tensors, meta = to_kohya(tensors, meta, os.fspath(output), dtype)
    elif dtype is not None:
        tensors = {k: v.to(dtype) if v.dim() else v for k, v in tensors.items()}
    save_safetensors_atomic(tensors, output, output_metadata(meta, a.no_metadata))
    errs = sorted(errors, key=lambda t: -t[1])
    mean = sum(e[1] for e in errors) / len(errors)
    floor = sum(e[2] for e in errors) / len(errors)
    rank = int(meta["urae_extracted_rank"])
    if rank < a.rank:
        print(f"note: written at rank {rank}, not {a.rank}: a layer's rank is at most its smaller side "
              f"(min(out, in) = {rank} for these layers), and that rank already holds the change exactly")
    print(f"wrote {output}: {len(errors)} layers; relative error of the rank-{rank} LoRA against tuned - base: "
          f"mean {mean:.3e}, max {errs[0][1]:.3e} (rounding floor of the stored tuned weights: mean {floor:.3e}; "
          f"an error near the floor is that rounding, not a missing rank)")
    for name, e, f in errs[:5]:
        print(f"  {e:.3e}  (floor {f:.3e})  {name}")
    if report:
        with atomic_path(report) as tmp:
            tmp.write_text(json.dumps({n: {"error": e, "rounding_floor": f} for n, e, f in errors}, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
