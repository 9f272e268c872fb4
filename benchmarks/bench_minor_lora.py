"""Cost of networks.minor_lora at FLUX width (3072), measured side by side in one run.

(a) forward+backward of a FLUX attention block's image-stream projections (to_q, to_k, to_v,
    attention, to_out.0; hidden 3072, 24 heads) with no adapter, a plain LoRA r16 and a minor LoRA
    r16 (frozen-copy formulation). Configurations are interleaved round by round so that drift of the
    machine hits all of them alike (the order rotates each round); the minimum over rounds (robust to other load on a shared
    machine) and the median are reported.
(b) SVD initialisation of one 3072x3072 layer: fp32 `torch.linalg.svd` versus the fp64 Gram-eigh
    method the module uses, with the relative error of the minor component (r smallest triplets)
    against an fp64 SVD, on a Gaussian weight and on a spectrum with a clustered tail; extrapolated
    to the 190 layers of the URAE target set.

    python benchmarks/bench_minor_lora.py            # full (about 4 minutes on 2 CPU cores)
    python benchmarks/bench_minor_lora.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from networks import minor_lora as ml  # noqa: E402

URAE_LAYERS = 190


class Attn(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(hidden, hidden)])

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (m(x).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.to_out[0](o)


def build_block(hidden: int, heads: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    root = nn.Module()
    blocks = nn.ModuleList([nn.Module()])
    blocks[0].attn = Attn(hidden, heads)
    root.transformer_blocks = blocks
    root.requires_grad_(False)
    return root


def attach(root: nn.Module, init: str, rank: int):
    """A network on the block; minor factors are random here (timing does not depend on their values)."""
    net = ml.MinorLoRANetwork([], root, lora_dim=rank, alpha=rank, init=init, targets="urae", verbose=False)
    net.apply_to([], root, False, True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lo in net.unet_loras:
            for i in range(len(lo.slices)):
                d0, u0 = lo.frozen(i)
                if d0 is not None:
                    d0.copy_(torch.randn(d0.shape, generator=g) * 0.01)
                    u0.copy_(torch.randn(u0.shape, generator=g) * 0.01)
                    lo.lora_down[i].copy_(d0 + 1e-3)
                    lo.lora_up[i].copy_(u0 + 1e-3)
            lo.initialized = True
    net.train()
    return net


def step_time(root, x, params) -> float:
    t0 = time.perf_counter()
    y = root.transformer_blocks[0].attn(x)
    y.square().mean().backward()
    for p in params:
        p.grad = None
    x.grad = None
    return time.perf_counter() - t0


def bench_forward_backward(tokens: int, hidden: int, heads: int, rank: int, rounds: int) -> dict:
    configs = {}
    for name, init in (("no adapter", None), (f"plain r{rank}", "plain"), (f"minor r{rank}", "minor")):
        root = build_block(hidden, heads)
        params = attach(root, init, rank).get_trainable_params() if init else []
        configs[name] = (root, params)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    times = {n: [] for n in configs}
    for root, params in configs.values():  # warm-up
        step_time(root, x, params)
    names = list(configs)
    for k in range(rounds):
        for n in names[k % 3:] + names[: k % 3]:  # rotate the order so no configuration always runs first
            root, params = configs[n]
            times[n].append(step_time(root, x, params))
    return {n: (min(v), statistics.median(v)) for n, v in times.items()}


def test_matrices(n: int, rank: int):
    torch.manual_seed(0)
    gauss = torch.randn(n, n) / n**0.5
    q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.linspace(1.0, 0.05, n, dtype=torch.float64)
    s[-2 * rank:] = 1e-3 * (1 + 1e-4 * torch.arange(2 * rank, 0, -1, dtype=torch.float64))
    s[-rank:] *= 0.5
    clustered = ((q1 * s) @ q2.T).float()
    return {"gaussian": gauss, "clustered tail": clustered}


def minor_ref(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double())
    return (u[:, -rank:] * s[-rank:]) @ vh[-rank:]


def bench_svd(n: int, rank: int) -> list[tuple]:
    warm = torch.randn(64, 64)
    torch.linalg.svd(warm)  # first LAPACK calls pay one-off set-up costs
    ml.svd_components(warm, 4)
    rows = []
    for label, w in test_matrices(n, rank).items():
        ref = minor_ref(w, rank)
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(w)
        t_svd = time.perf_counter() - t0
        got = ((u[:, -rank:] * s[-rank:]) @ vh[-rank:]).double()
        e_svd = ((got - ref).norm() / ref.norm()).item()
        t0 = time.perf_counter()
        us, sv, _ = ml.svd_components(w, rank, "minor")
        t_eigh = time.perf_counter() - t0
        e_eigh = (((us @ sv) - ref).norm() / ref.norm()).item()
        rows.append((label, t_svd, e_svd, t_eigh, e_eigh))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--tokens", type=int, help="image tokens in the block benchmark (default 1024, quick 128)")
    ap.add_argument("--rounds", type=int, help="timed rounds per configuration (default 10, quick 2)")
    ap.add_argument("--only", choices=("fwd", "svd"), help="run one part only")
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args(argv)
    hidden, heads = (3072, 24) if not a.quick else (512, 4)
    tokens = a.tokens or (1024 if not a.quick else 128)
    rounds = a.rounds or (10 if not a.quick else 2)
    n_svd = 3072 if not a.quick else 384

    print("command: python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")

    if a.only != "svd":
        print(f"\n(a) forward+backward, attention projections q/k/v/out (hidden {hidden}, {heads} heads), "
              f"{tokens} tokens, fp32, {rounds} interleaved rounds")
        res = bench_forward_backward(tokens, hidden, heads, a.rank, rounds)
        base, plain = res["no adapter"][0], res[f"plain r{a.rank}"][0]
        print(f"{'config':<14}{'min s':>10}{'median s':>10}{'vs none':>10}{'vs plain':>10}  (ratios of minima)")
        for name, (t, med) in res.items():
            print(f"{name:<14}{t:>10.4f}{med:>10.4f}{t / base:>10.3f}{t / plain:>10.3f}")
        print(f"minor / plain = {res[f'minor r{a.rank}'][0] / plain:.3f} (goal <= 1.10)")
    if a.only == "fwd":
        return

    print(f"\n(b) SVD init of one {n_svd}x{n_svd} layer, r={a.rank}; error = relative Frobenius error of the "
          f"minor component vs an fp64 SVD")
    print(f"{'spectrum':<16}{'fp32 svd s':>12}{'error':>11}{'fp64 eigh s':>13}{'error':>11}")
    rows = bench_svd(n_svd, a.rank)
    for label, t_svd, e_svd, t_eigh, e_eigh in rows:
        print(f"{label:<16}{t_svd:>12.2f}{e_svd:>11.2e}{t_eigh:>13.2f}{e_eigh:>11.2e}")
    t_layer = statistics.mean(r[3] for r in rows)
    t_layer_svd = statistics.mean(r[1] for r in rows)
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes slow the timings, not the errors)")
    if n_svd == 3072:
        print(f"URAE set ({URAE_LAYERS} layers of 3072x3072), extrapolated: fp64 eigh "
              f"{URAE_LAYERS * t_layer / 60:.1f} min, fp32 svd {URAE_LAYERS * t_layer_svd / 60:.1f} min")
    else:
        print("URAE-set extrapolation needs the full run (3072x3072 layers)")


if __name__ == "__main__":
    main()
