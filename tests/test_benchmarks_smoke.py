"""The benchmark scripts in their quickest CPU mode: they must keep running and printing their tables."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from urae.runtime import attention_scale

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_benchmarks_quick_cpu(tmp_path):
    env = {**ENV, "OUT": str(tmp_path), "PYTHON": sys.executable}
    cmds = {
        "train": [sys.executable, "benchmarks/bench_train.py", "--quick"],
        # through the GPU script, as a dry run: --cpu keeps the tiny smoke mode even where a GPU is present
        "infer": ["bash", "benchmarks/run_on_gpu.sh", "600", "--quick", "--cpu"],
    }
    # Both at once: most of each run is importing diffusers/transformers, which overlaps well.
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in cmds.items()}
    outs = {}
    for k, p in procs.items():
        try:
            outs[k] = p.communicate(timeout=600)[0]
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

    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^infer: exit 0 after \d+ s$", summary, re.M), summary
    infer = (tmp_path / "infer.log").read_text()
    assert infer in outs["infer"]
    assert re.search(r"command: python benchmarks/bench_infer_gpu.py --budget-seconds \d+ --json \S+infer.json "
                     r"--quick --cpu", infer)
    assert "TINY configuration" in infer and "anchor:" in infer and "FLOP per transformer pass" in infer
    assert re.search(r"matmul ceiling of this device: \d", infer)
    assert re.search(r"size\s+prop\.\s+ntk\s+s/step\s+TFLOP/s\s+% ceil\s+28-step s\s+decode s\s+image s", infer)
    for attn in ("on", "off"):
        assert re.search(rf"^\s+128x128\s+{attn}\s+1\s+(\d+\.\d+\s+){{2}}\d+%\s+(\d+\.\d+\s+){{3}}n/a/n/a\s+n/a/n/a\s+"
                         r"flash \(CPU\) x4$", infer, re.M), attn
    for mode in ("split", "tiled", "untiled"):
        assert re.search(rf"^\s+{mode}\s+\d+\.\d+", infer, re.M), mode
    assert re.search(r"^\s+flash: \d+\.\d+ ms$", infer, re.M) and re.search(r"^\s+math: \d+\.\d+ ms$", infer, re.M)
    assert re.search(r"^\s+cuDNN: unavailable", infer, re.M)

    res = json.loads((tmp_path / "infer.json").read_text())
    assert res["tiny"] and not res["skipped"] and res["matmul_ceiling"]["tflops"] > 0
    assert [(r["size"], r["proportional_attention"], r["status"]) for r in res["rows"]] == [
        (128, True, "ok"), (128, False, "ok")]
    for r in res["rows"]:  # steady state: warm-up steps are not timed; the image time is derived from s/step
        assert (r["warmup_steps"], r["timed_steps"], len(r["step_seconds"])) == (2, 2, 2)
        assert r["s_per_step"] == pytest.approx(statistics.median(r["step_seconds"]))
        assert r["tflops"] == pytest.approx(r["flop_per_step"] / r["s_per_step"] / 1e12)
        assert r["image_s"] == pytest.approx(28 * r["s_per_step"] + r["decode_s"]) and r["decode_s"] > 0
        assert r["decode_path"] == "whole" and "reserved_gib" in r and "reserved_denoise_gib" in r
        call = r["attention"]["sdpa_call"]  # the permuted views diffusers passes, and the scale that reached SDPA
        assert call["shapes"][0] == [1, 2, 512 + 64, 16] and call["contiguous"] == [False] * 3
    on, off = (r["attention"]["sdpa_call"]["kwargs"]["scale"] for r in res["rows"])
    assert on == pytest.approx(attention_scale(576, 16)) and off is None
    (layout,) = res["sdpa_layouts"]  # both rows pass the same layout: probed once
    assert layout["backends"]["flash"]["status"] == layout["backends"]["math"]["status"] == "ok"
    assert layout["backends"]["cuDNN"]["status"] == "unavailable"
    assert [v["mode"] for v in res["vae"]] == ["split", "tiled", "untiled"] and res["vae"][0]["status"] == "ok"


def test_one_tiny_training_row_times_exactly_the_steps_it_trains(capsys):
    """bench_train's one-configuration mode, in-process: the timed steps are the rounds x steps after the warm-up,
    each one a real optimizer step, and the printed row is those timings."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_train import main

    ran = main(["--quick", "--sizes", "64", "--rounds", "1", "--steps", "2", "--only", "plain:cached"])
    out = capsys.readouterr().out
    (r,) = ran["results"][64].values()
    assert (ran["warmup"], ran["rounds"], ran["steps"]) == (1, 1, 2)
    assert r["n"] == 2 and ran["optimizer_steps"] == {"plain": 1 + 2}  # warm-up trained, not timed
    assert r["min"] <= r["median"] and 0 < r["data"] < r["min"]  # the cache read is inside the timed step
    m = re.search(r"^plain\s+cached\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+\d+\.\d+\s+1\.000\s+1\.000$", out, re.M)
    assert m, out
    assert float(m.group(1)) == pytest.approx(r["min"], abs=1e-4) and float(m.group(3)) == pytest.approx(1 / r["min"],
                                                                                                         abs=0.01)
    assert "minor / plain" not in out  # no ratios from one configuration


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


def _tiny_pipeline():
    from benchmarks.bench_infer_gpu import Device, build_transformer, build_vae, make_pipeline
    from urae.tiny import transformer_config

    dev = Device(cpu=True)
    cfg = dict(transformer_config())
    pipe = make_pipeline(build_transformer(cfg, dev), build_vae(True, dev))
    g = torch.Generator().manual_seed(0)  # a short text sequence keeps these steps in the milliseconds
    embeds = (torch.randn(1, 32, cfg["joint_attention_dim"], generator=g), torch.randn(1, cfg["pooled_projection_dim"],
                                                                                        generator=g))
    return dev, cfg, pipe, embeds


def test_a_row_stops_inside_when_the_budget_runs_out():
    from benchmarks.bench_infer_gpu import run_row

    dev, cfg, pipe, embeds = _tiny_pipeline()
    asked = []

    def left():  # asked once after every step: room for three steps, then none
        asked.append(1)
        return 1e9 if len(asked) < 3 else -1.0

    row, call = run_row(pipe, cfg, 64, True, embeds, dev, warmup=1, timed=3, image_steps=28, left=left, decode_est=0.0)
    assert row["status"].startswith("stopped for the budget after 3 of 4 steps"), row["status"]
    assert len(row["step_seconds"]) == 2 and row["s_per_step"] > 0 and row["tflops"] > 0  # what it measured stays
    assert "decode_s" not in row and "image_s" not in row
    assert row["attention"]["backends"] == {"flash (CPU)": 4}  # 2 double + 2 single blocks, profiled in step 1
    assert call.call["kwargs"]["scale"] == pytest.approx(attention_scale(32 + 16, 16))
    assert pipe.transformer.pos_embed.theta == 10000  # the runtime was undone although the row stopped

    full, _ = run_row(pipe, cfg, 64, False, embeds, dev, warmup=1, timed=2, image_steps=28, left=lambda: 1e9,
                      decode_est=0.0)
    assert full["status"] == "ok" and len(full["step_seconds"]) == 2 and full["decode_s"] > 0


@pytest.mark.parametrize("backend,label", [("MATH", "math"), ("FLASH_ATTENTION", "flash (CPU)")])
def test_the_recorded_kernel_is_the_one_that_ran(backend, label):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.gpu_probes import Device, KernelProbe

    q, k, v = (torch.randn(1, 40, 2, 8).permute(0, 2, 1, 3) for _ in range(3))  # [B, S, H, D] viewed as [B, H, S, D]
    probe = KernelProbe(Device(cpu=True))
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        probe.start()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
        probe.stop()
    s = probe.summary()
    assert s["backends"] == {label: 1} and s["kernel"] == f"{label} x1"
    assert s["sdpa_call"]["strides"][0] == [640, 8, 16, 1] and s["sdpa_call"]["kwargs"]["scale"] == 0.5


def test_rows_that_cannot_fit_are_skipped(tmp_path):
    from benchmarks.bench_infer_gpu import main

    out = tmp_path / "r.json"
    assert main(["--cpu", "--quick", "--vae-size", "0", "--budget-seconds", "0.001", "--attention", "urae",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == [] and [(s["size"], s["proportional_attention"]) for s in res["skipped"]] == [(128, True)]


def test_decode_estimate():
    from benchmarks.bench_infer_gpu import decode_estimate

    assert decode_estimate({}, 4096) == 0.0
    assert decode_estimate({1024: 1.0, 4096: 9.0}, 4096) == 9.0  # measured at that size: as measured
    assert decode_estimate({1024: 1.0, 2048: 3.0}, 4096) == 24.0  # else the largest, by pixels, doubled


def test_the_gpu_report(capsys):
    """The report's GPU-only parts (memory columns, kernel names, the 4096² verdict) from a GPU-shaped result."""
    from benchmarks.bench_infer_gpu import FLUX_DEV_TRANSFORMER, Device, flops_per_pass, print_report

    f = flops_per_pass(FLUX_DEV_TRANSFORMER, 4096, 4096)
    attention = {"kernel": "flash x57", "gpu_kernels_ms": [["pytorch_flash::flash_fwd_kernel", 2500.0]]}
    row = {"size": 4096, "proportional_attention": True, "ntk_factor": 10.0, "status": "ok", "s_per_step": 5.0,
           "tflops": f / 5.0 / 1e12, "denoise_image_s": 140.0, "decode_s": 10.0, "image_s": 150.0, "flop_per_step": f,
           "peak_denoise_gib": 30.0, "reserved_denoise_gib": 32.5, "peak_gib": 41.0, "reserved_gib": 44.0,
           "attention": attention}
    results = {"matmul_ceiling": {"tflops": 790.0}, "image_steps": 28, "warmup_steps": 2, "timed_steps": 5,
               "rows": [row], "skipped": [{"size": 4096, "proportional_attention": False, "estimated_s": 60.0,
                                           "left_s": 20.0}], "sdpa_layouts": [], "vae": []}
    print_report(results, Device(cpu=True), tiny=False)
    out = capsys.readouterr().out
    assert re.search(r"4096x4096\s+on\s+10\s+5\.0000\s+781\.6\s+99%\s+140\.00\s+10\.00\s+150\.00\s+30\.0/32\.5\s+"
                     r"41\.0/44\.0\s+flash x57", out), out
    assert re.search(r"4096x4096\s+off\s+skipped for the budget: needs ~60 s, 20 s were left", out)
    assert "2500.00  pytorch_flash::flash_fwd_kernel" in out
    # 28 x 5 s + 10 s decode = 150 s; the goal's 180 s leave 170 s for 28 steps of 3.908 PFLOP = 644 TFLOP/s
    assert re.search(r"URAE runtime: 150 s = 2\.50 min .* goal <= 3 min: met .* 99% of this GPU's measured bf16 "
                     r"matmul ceiling \(790 TFLOP/s\); the goal needs 644 TFLOP/s", out), out


def test_gpu_script_refuses_a_bad_budget(tmp_path):
    r = subprocess.run(["bash", "benchmarks/run_on_gpu.sh", "9m"], cwd=ROOT, env={**ENV, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: BUDGET_SECONDS must be a whole number of seconds, "
                                                       "got '9m'\n")
    assert list(tmp_path.iterdir()) == []  # refused before anything was installed or written


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
