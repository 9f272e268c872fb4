"""The benchmark scripts in their quickest CPU mode: they must keep running and printing their tables."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_benchmarks_quick_cpu(tmp_path):
    out_json = tmp_path / "infer.json"
    cmds = {
        "train": [sys.executable, "benchmarks/bench_train.py", "--quick"],
        # --cpu: the tiny smoke mode even where a GPU is present, so this stays a seconds-long check
        "infer": [sys.executable, "benchmarks/bench_infer_gpu.py", "--quick", "--cpu", "--budget-seconds", "0",
                  "--json", str(out_json)],
    }
    # Both at once: most of each run is importing diffusers/transformers, which overlaps well.
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in cmds.items()}
    outs = {}
    for k, p in procs.items():
        try:
            outs[k] = p.communicate(timeout=240)[0]
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        assert p.returncode == 0, f"{k} benchmark failed:\n{outs[k][-3000:]}"

    train = outs["train"]
    assert "command: python benchmarks/bench_train.py --quick" in train
    assert re.search(r"adapter\s+data\s+min s\s+median s\s+steps/s", train)
    for init, data in (("minor", "cached"), ("plain", "cached"), ("minor", "uncached"), ("plain", "uncached")):
        assert re.search(rf"^{init}\s+{data}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+", train, re.M), (init, data, train)
    assert re.search(r"minor / plain: cached \d+\.\d+ \(\d+\.\d+\)", train)

    infer = outs["infer"]
    assert "command: python benchmarks/bench_infer_gpu.py --quick --cpu" in infer
    assert "TINY configuration" in infer and "anchor:" in infer and "FLOP per transformer pass" in infer
    assert re.search(r"size\s+prop\.\s+ntk\s+s/image", infer)
    assert re.search(r"^\s+128x128\s+off\s+1\s+\d+\.\d+", infer, re.M) and re.search(r"^\s+128x128\s+on\s", infer, re.M)
    for mode in ("split", "tiled", "untiled"):
        assert re.search(rf"^\s+{mode}\s+\d+\.\d+", infer, re.M), mode
    res = json.loads(out_json.read_text())
    assert res["tiny"] and not res["skipped"]
    assert [(r["size"], r["proportional_attention"], r["status"]) for r in res["images"]] == [
        (128, False, "ok"), (128, True, "ok")]
    assert all(r["tflops"] > 0 and r["seconds"] >= r["denoise_s"] > 0 for r in res["images"])


def test_flop_formula_matches_the_real_config():
    """The per-token multiply-adds the formula assumes are those of FLUX.1-dev's Linear layers (meta device)."""
    import torch
    from diffusers import FluxTransformer2DModel

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_infer_gpu import FLUX_DEV_TRANSFORMER, flops_per_pass, params_estimate_flops

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    d = 3072

    def token_macs(block) -> int:  # AdaLN modulation (norm*.linear) runs once per image
        return sum(m.in_features * m.out_features for n, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.startswith("norm"))

    assert {token_macs(b) for b in model.transformer_blocks} == {24 * d * d}  # two streams, each token in one
    assert {token_macs(b) for b in model.single_transformer_blocks} == {12 * d * d}
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 11.9e9) < 0.01e9
    assert flops_per_pass(FLUX_DEV_TRANSFORMER, 4096, 4096) == pytest.approx(3.91e15, rel=0.01)
    # and torch's own count of a forward pass (shapes only, on the meta device) agrees
    from torch.utils.flop_counter import FlopCounterMode

    n = 64 * 64
    with torch.device("meta"), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(hidden_states=torch.empty(1, n, 64), encoder_hidden_states=torch.empty(1, 512, 4096),
              pooled_projections=torch.empty(1, 768), timestep=torch.empty(1), guidance=torch.empty(1),
              txt_ids=torch.empty(512, 3), img_ids=torch.empty(n, 3), return_dict=False)
    assert fc.get_total_flops() == pytest.approx(flops_per_pass(FLUX_DEV_TRANSFORMER, 1024, 1024), rel=1e-3)
    assert params_estimate_flops(n_params, 4096, 4096, FLUX_DEV_TRANSFORMER) == pytest.approx(4.6e15, rel=0.01)



@pytest.mark.slow
def test_memory_benchmarks_quick_cpu():
    """bench_memory counts a tiny step per configuration under fake tensors; bench_fp8_minor prints its table."""
    cmds = {"memory": [sys.executable, "benchmarks/bench_memory.py", "--quick"],
            "fp8": [sys.executable, "benchmarks/bench_fp8_minor.py", "--quick"]}
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in cmds.items()}
    outs = {k: p.communicate(timeout=300)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, f"{k} benchmark failed:\n{outs[k][-3000:]}"
    mem = outs["memory"]
    assert "command: python benchmarks/bench_memory.py --quick" in mem and "TINY model" in mem
    peaks = {}
    for name in ("resident", "fp8", "offload", "swap3", "fp8+swap3+offload"):
        # configuration, options, peak, est. (nan for the tiny model), host, moved, seconds at 25 GB/s
        m = re.search(rf"^{re.escape(name)}\s.*?\s(\d+\.\d+)\s+nan\s+\d+\.\d+\s+(\d+\.\d+)\s+\d+\.\d+", mem, re.M)
        assert m, (name, mem)
        peaks[name] = float(m.group(1))
        assert (float(m.group(2)) > 0) == (name not in ("resident", "fp8")), (name, m.group(0))
    # the tiny model's weights and block inputs are too small for swap or offload to show; fp8 does
    assert peaks["fp8"] < peaks["resident"] and peaks["fp8+swap3+offload"] < peaks["resident"], peaks
    fp8 = outs["fp8"]
    assert re.search(r"^random 256x256 #0\s+\d+\.\d+\s+\d\.\d+e-\d+", fp8, re.M)
    assert "median |E|_2 / sigma_minor" in fp8
