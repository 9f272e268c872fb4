"""Does fp8 storage drown the minor components URAE trains? Per URAE target layer: the fp8 rounding error
E = W - fp8(W) next to the minor component (the r smallest singular triplets of W).

Columns, all in the weight's own units:
  sigma_max        largest singular value of W (its spectral norm)
  sigma_minor      the largest of the r smallest singular values (the scale of the minor component)
  |W_minor|_F      Frobenius norm of the minor component (sqrt of the sum of the r smallest sigma^2)
  |E|_2, |E|_F     spectral and Frobenius norm of the rounding error of a plain cast to float8_e4m3fn,
                   the storage urae.memory uses (and sd-scripts' --fp8_base, ComfyUI's fp8 FLUX files)
  |E|_2 / sigma_minor   > 1: the base moved by more than the whole minor component's scale. By Weyl's
                   inequality the r smallest singular values of fp8(W) can then differ from W's by more than
                   their size, so the minor subspace of the stored weight is not W's.
  |E_row|_2        the same error for a cast with one scale per output row (what a scaled fp8 would give)

The adapter takes its minor components from the full-precision W (urae.memory is set up after the SVD),
so training tunes W's minor subspace either way; the question is whether the fp8 noise added to the base
is small next to that subspace. Under fp8 storage the trained model is fp8(W) + dW, and the exact
export dW then applies to W (bf16) in other tools: the difference E is what fp8 training leaves
uncompensated.

Without weights: random real-shape 3072 x 3072 matrices with i.i.d. N(0, 0.02²) entries (the init scale
of transformer Linears). That is NOT FLUX: a random matrix's smallest singular values go to ~0
(Marchenko-Pastur), so the ratio comes out large (~8 at 3072 x 3072, r = 16) by construction; trained
weights have a different spectrum. It shows the method and the error's size; run it on the real file for the answer:

    python benchmarks/bench_fp8_minor.py                                   # random real-shape weights
    python benchmarks/bench_fp8_minor.py --transformer flux1-dev.safetensors --layers 190   # ~15 min CPU
    python benchmarks/bench_fp8_minor.py --quick                           # 256 x 256, seconds

The file is read tensor by tensor with safetensors (BFL single file or a diffusers transformer file:
fused qkv / linear1 rows are split into the URAE targets as networks/minor_lora.py does).
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FP8 = torch.float8_e4m3fn
DIFFUSERS_TARGET = re.compile(r"^(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
                              r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))\.weight$")
BFL_TARGET = re.compile(r"^(double_blocks\.\d+\.img_attn\.(qkv|proj)|single_blocks\.\d+\.linear1)\.weight$")


def spectral_norm(m: torch.Tensor, iters: int = 40) -> float:
    """Largest singular value by power iteration (enough digits for a ratio; an SVD per error is too slow)."""
    v = torch.randn(m.shape[1], dtype=m.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        v = m.T @ (m @ v)
        v = v / v.norm()
    return float((m @ v).norm())


def row_scaled_fp8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(FP8).max
    return (w / scale).to(FP8).to(w.dtype) * scale


def report_layer(name: str, w: torch.Tensor, rank: int) -> dict:
    w = w.double()
    s = torch.linalg.svdvals(w.float()).double()  # descending
    minor = s[-rank:]
    e = w - w.to(torch.bfloat16).to(FP8).double()  # stored from the bf16 checkpoint
    e_row = w - row_scaled_fp8(w.float()).double()
    return {"name": name, "sigma_max": float(s[0]), "sigma_minor": float(minor[0]),
            "minor_fro": float(minor.square().sum().sqrt()), "e_2": spectral_norm(e), "e_fro": float(e.norm()),
            "e_row_2": spectral_norm(e_row)}


def split_bfl(key: str, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    from networks.minor_lora import bfl_equivalents, bfl_row_sizes

    module = key[: -len(".weight")]
    names = bfl_equivalents(module)
    sizes = bfl_row_sizes(module, w.shape[0], w.shape[1])
    out, pos = [], 0
    for name, size in zip(names, sizes):
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            out.append((name, w[pos: pos + size]))
        pos += size
    return out


def file_layers(path: str, limit: int):
    from safetensors import safe_open

    done = 0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            bare = key.removeprefix("model.diffusion_model.").removeprefix("transformer.")
            if DIFFUSERS_TARGET.match(bare):
                parts = [(bare[: -len(".weight")], f.get_tensor(key).float())]
            elif BFL_TARGET.match(bare):
                parts = split_bfl(bare, f.get_tensor(key).float())
            else:
                continue
            for name, w in parts:
                yield name, w
                done += 1
                if done >= limit:
                    return


def random_layers(n: int, size: int, std: float = 0.02):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        yield f"random {size}x{size} #{i}", torch.randn(size, size, generator=g) * std


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transformer", help="FLUX.1 transformer .safetensors (BFL single file or diffusers)")
    ap.add_argument("--layers", type=int, help="how many target layers (default: 3 random, 190 from a file)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="two random 256 x 256 layers")
    a = ap.parse_args(argv)
    print("command: " + shlex.join(["python", "benchmarks/bench_fp8_minor.py", *(sys.argv[1:] if argv is None else argv)]))
    if a.transformer:
        if not Path(a.transformer).is_file():
            print(f"error: {a.transformer} is not a file")
            return 2
        layers = file_layers(a.transformer, a.layers or 190)
        print(f"weights: {a.transformer}")
    else:
        size, n = (256, 2) if a.quick else (3072, a.layers or 3)
        layers = random_layers(n, size)
        print("weights: RANDOM N(0, 0.02^2) matrices of the real shape, not FLUX (see the docstring)")
    print(f"rank r = {a.rank}; norms in weight units; E = W - fp8_e4m3fn(W) (plain cast); E_row: per-row scaled cast")
    print(f"{'layer':<42} {'sigma_max':>9} {'sigma_minor':>11} {'|W_minor|_F':>11} {'|E|_2':>9} {'|E|_F':>9} "
          f"{'|E|_2/sigma_minor':>17} {'|E_row|_2':>9}")
    ratios = []
    for name, w in layers:
        r = report_layer(name, w, a.rank)
        ratios.append(r["e_2"] / r["sigma_minor"])
        print(f"{name:<42} {r['sigma_max']:9.4f} {r['sigma_minor']:11.3e} {r['minor_fro']:11.3e} {r['e_2']:9.3e} "
              f"{r['e_fro']:9.3e} {ratios[-1]:17.2f} {r['e_row_2']:9.3e}")
    if ratios:
        print(f"median |E|_2 / sigma_minor over {len(ratios)} layer(s): {statistics.median(ratios):.2f} "
              f"(> 1: the fp8 error is larger than the minor component's scale)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
