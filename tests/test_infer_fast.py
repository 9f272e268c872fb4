"""flux_urae_infer.py's speed options on the tiny pipeline: lossless ones equal the plain run, caches are
labelled approximate, context parallelism over two CPU processes equals one process, bad combinations
are one line and exit 2 before any model loads."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_minor_lora
from diffusers import FluxPipeline
from PIL import Image

from urae import speed
from urae.inference import main
from urae.outputs import read_png_info

ROOT = Path(__file__).resolve().parents[1]
# proportional attention and NTK on, at a non-square size: what the speed options must carry along
HIRES = ["--width", "384", "--height", "256", "--steps", "2", "--proportional_attention", "--ntk_factor", "7",
         "--prompt", "a red circle", "--seed", "3"]


def generate(tmp_path, model, name, *extra):
    out = tmp_path / name
    assert main(["--model", str(model), "--output_dir", str(out), *HIRES, *extra]) == 0
    return out


def pixels(out):
    return np.asarray(Image.open(out / "00000_3_384x256.png"), dtype=np.int16)


def max_diff(a, b):
    return int(np.abs(pixels(a) - pixels(b)).max())


def same(a, b) -> bool:
    """Equal up to rounding: no value off by more than one level, and under 0.1% of them off at all. (Dropping
    proportional attention moves ~5% of the values here, a lossless option ~0.001%.)"""
    d = np.abs(pixels(a) - pixels(b))
    return d.max() <= 1 and (d > 0).mean() < 1e-3


@pytest.fixture(scope="module")
def plain(tiny_flux_dir, tmp_path_factory):
    """The dense run with every speed option off, and the same run without proportional attention (which a
    speed option that dropped the softmax scale would produce)."""
    tmp = tmp_path_factory.mktemp("plain")
    return generate(tmp, tiny_flux_dir, "dense"), generate(tmp, tiny_flux_dir, "no_prop", "--no-proportional_attention")


def test_proportional_attention_is_visible_at_this_size(plain):
    # else the equality tests below could not tell a backend that drops the scale from one that honours it
    assert not same(*plain)


def test_help_lists_every_speed_option_with_its_choices(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--cache {none,fbcache,taylorseer,magcache}", "--cache_threshold", "--cache_interval",
                 "--attention_backend {native,_native_math,", "--compile", "--compile_backend {inductor,aot_eager,eager}",
                 "--context_parallel INT", "--context_parallel_mode {ulysses,ring}"):
        assert flag in text, flag


def test_backend_choices_are_the_installed_diffusers_registry():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert set(speed.ATTENTION_BACKENDS) == {b.value for b in AttentionBackendName}


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_cpu_backends_equal_the_plain_run(tiny_flux_dir, plain, tmp_path, backend):
    out = generate(tmp_path, tiny_flux_dir, backend, "--attention_backend", backend)
    assert same(out, plain[0])
    assert json.loads(read_png_info(out / "00000_3_384x256.png")["speed"]) == {"attention_backend": backend}


def test_compiled_blocks_see_the_same_hooks_at_every_image(tiny_flux_dir):
    """torch.compile guards on the hook functions of the modules it traced and on the dispatch function it
    called: new ones at each image would trace every block again (and past 8 times silently run uncompiled)."""
    from diffusers.models.transformers import transformer_flux as tf

    from urae.runtime import HighResSettings, apply_highres

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    attn = pipe.transformer.single_transformer_blocks[-1].attn
    seen = []
    for _ in range(2):
        with apply_highres(pipe.transformer, HighResSettings(proportional_attention=True)):
            seen.append((tf.dispatch_attention_fn, dict(attn._forward_pre_hooks), dict(attn._forward_hooks)))
    assert seen[0][0] is seen[1][0] and seen[0][0]._urae_patch
    assert seen[0][1] == seen[1][1] and seen[0][2] == seen[1][2] and len(seen[0][1]) == 1
    assert attn._urae_base_seq_len is None  # inert outside the block


@pytest.mark.slow
def test_inductor_compile_equals_the_plain_run(tiny_flux_dir, plain, tmp_path):
    torch._dynamo.reset()
    out = generate(tmp_path, tiny_flux_dir, "inductor", "--compile")
    assert same(out, plain[0])
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def lora(tiny_flux_dir, tmp_path_factory):
    """A minor-init adapter with random updates, saved by the network module."""
    return random_minor_lora(tiny_flux_dir, tmp_path_factory.mktemp("lora") / "tiny.safetensors", 1)


@pytest.mark.slow  # tracing the blocks: 20-60 s on 2 shared cores
def test_lora_and_fp8_compose_with_backend_and_compile(tiny_flux_dir, lora, plain, tmp_path):
    base = ["--lora", str(lora), "--fp8"]
    ref = generate(tmp_path, tiny_flux_dir, "lora_fp8", *base)
    assert max_diff(ref, plain[0]) > 8, "the LoRA must change the image"
    torch._dynamo.reset()  # aot_eager: dynamo's real tracing of blocks, hooks, LoRA and fp8 without inductor's build
    out = generate(tmp_path, tiny_flux_dir, "lora_fp8_fast", *base, "--attention_backend", "_native_math",
                   "--compile", "--compile_backend", "aot_eager")
    torch._dynamo.reset()
    assert same(out, ref)
    assert json.loads(read_png_info(out / "00000_3_384x256.png")["speed"]) == {
        "attention_backend": "_native_math", "compile": "aot_eager"}


def test_caches_are_labelled_approximate_with_the_passes_they_reused(tiny_flux_dir, plain, tmp_path):
    out = tmp_path / "fb"
    assert main(["--model", str(tiny_flux_dir), "--output_dir", str(out), *HIRES, "--steps", "3", "--num_images", "2",
                 "--cache", "fbcache", "--cache_threshold", "10"]) == 0
    recs = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    for rec in recs:  # each image starts from a fresh cache: its first pass computes, the other 2 are reused
        assert rec["approximate"] == "approximate (cache fbcache, threshold 10.0)"
        assert rec["speed"] == {"cache": "fbcache", "cache_threshold": 10.0, "cached_passes": "2 of 3"}
    info = read_png_info(out / recs[0]["file"])
    assert info["approximate"] == recs[0]["approximate"]
    assert json.loads(info["speed"]) == recs[0]["speed"]


@pytest.mark.parametrize("cache, knob, label", [
    ("taylorseer", ["--cache_interval", "2"], "approximate (cache taylorseer, interval 2)"),
    ("magcache", [], "approximate (cache magcache, threshold 0.06)"),
])
def test_other_caches_run_and_are_labelled(tiny_flux_dir, tmp_path, cache, knob, label):
    out = generate(tmp_path, tiny_flux_dir, cache, "--cache", cache, *knob)
    rec = json.loads((out / "images.jsonl").read_text())
    assert rec["approximate"] == label and rec["speed"]["cached_passes"].endswith(" of 2")


def test_a_cache_that_reuses_nothing_is_the_dense_result(tiny_flux_dir, plain, tmp_path):
    out = generate(tmp_path, tiny_flux_dir, "fb0", "--cache", "fbcache", "--cache_threshold", "1e-9")
    assert json.loads((out / "images.jsonl").read_text())["speed"]["cached_passes"] == "0 of 2"
    assert same(out, plain[0])


@pytest.mark.parametrize("extra, env, message", [
    (["--attention_backend", "flash"], {}, "--attention_backend flash: needs a GPU"),
    (["--attention_backend", "_native_xla"], {}, "takes no softmax scale, and proportional attention is one"),
    (["--cache_threshold", "0.1"], {}, "--cache_threshold applies to --cache fbcache or magcache, not none"),
    (["--cache", "taylorseer", "--cache_threshold", "0.1"], {}, "applies to --cache fbcache or magcache"),
    (["--cache", "fbcache", "--init_resolution", "128"], {}, "would share one cache state"),
    (["--compile", "--offload", "sequential"], {}, "--compile cannot trace through --offload sequential"),
    (["--context_parallel", "2"], {}, "--context_parallel 2 needs 2 processes, this run has 1"),
    (["--context_parallel_mode", "ring"], {}, "--context_parallel_mode applies with --context_parallel N > 1"),
    (["--context_parallel", "2", "--cache", "fbcache"], {"WORLD_SIZE": "2"}, "the processes of --context_parallel "
                                                                              "would disagree"),
    (["--context_parallel", "2", "--offload", "model"], {"WORLD_SIZE": "2"}, "each process holds the whole model"),
    (["--context_parallel", "2", "--context_parallel_mode", "ring"], {"WORLD_SIZE": "2"},
     "ring needs a GPU attention backend that returns the log-sum-exp"),
    (["--context_parallel", "2", "--attention_backend", "_native_math"], {"WORLD_SIZE": "2"},
     "--attention_backend _native_math has no context parallel support"),
    (["--context_parallel", "2", "--width", "400", "--height", "272"], {"WORLD_SIZE": "2"},
     "400x272 has 425 image tokens"),
    (["--context_parallel", "3"], {"WORLD_SIZE": "3"}, "--max_sequence_length"),  # 512 text tokens / 3
])
def test_impossible_combinations_are_one_line_before_loading(tiny_flux_dir, tmp_path, capsys, monkeypatch, extra,
                                                             env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)  # as the two-process test; a CPU build says 0
    args = ["--model", str(tiny_flux_dir), "--output_dir", str(tmp_path / "o"), *HIRES, *extra]
    if "--max_sequence_length" in message:
        args += ["--max_sequence_length", "512"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_context_parallel_needs_gpus_on_a_cpu_only_machine(tiny_flux_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
    assert main(["--model", str(tiny_flux_dir), "--output_dir", str(tmp_path), *HIRES, "--context_parallel", "2"]) == 2
    assert "needs one GPU per process; this machine has none" in capsys.readouterr().err


LAUNCH = """
import sys, torch
torch.accelerator.device_count = lambda: 1  # diffusers places rank % device_count; a CPU build reports 0
from urae.inference import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes importing diffusers: ~40 s on 2 cores
def test_context_parallel_on_two_processes_equals_one(tiny_flux_dir, plain, tmp_path):
    """Ulysses over two gloo processes, torchrun's environment: each process holds half of the text and image
    tokens; proportional attention must still use the whole sequence's length."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    out = tmp_path / "cp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), "--model", str(tiny_flux_dir), "--output_dir", str(out), *HIRES,
            "--context_parallel", "2"]
    procs = [subprocess.Popen(args, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "speed: context parallel ulysses over 2 processes (process 0 writes)" in logs[0]
    assert "speed:" not in logs[1]  # process 1 prints no plan
    assert sorted(p.name for p in out.iterdir()) == ["00000_3_384x256.png", "images.jsonl"]
    assert len((out / "images.jsonl").read_text().splitlines()) == 1  # one writer
    assert same(out, plain[0])
    assert json.loads(read_png_info(out / "00000_3_384x256.png")["speed"]) == {"context_parallel": "ulysses 2"}


@pytest.mark.slow
def test_speed_benchmark_rows_cpu_smoke(tmp_path):
    """bench_infer_gpu.py --speed in its tiny CPU mode: a row per option, the cache row's passes and its
    difference to dense, the table and the JSON."""
    js = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_infer_gpu.py", "--speed", "--quick", "--cpu", "--json", str(js),
                        "--speed-options", "dense", "fbcache"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["option"]: row for row in json.loads(js.read_text())["speed_rows"]}
    assert set(rows) == {"dense", "fbcache"} and all(x["status"] == "ok" for x in rows.values())
    assert rows["fbcache"]["passes"] == 3 and rows["fbcache"]["vs_dense"]["psnr_db"] > 0
    assert "s/step" in r.stdout and "vs dense" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload needs CUDA")
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_composes_with_cache_and_backend_on_a_gpu(tiny_flux_dir, tmp_path, offload):
    base = ["--device", "cuda", "--dtype", "bf16", "--offload", offload]
    dense = generate(tmp_path, tiny_flux_dir, "dense", *base)
    fast = generate(tmp_path, tiny_flux_dir, "fast", *base, "--attention_backend", "_native_math",
                    *(["--compile"] if offload == "model" else []))
    assert max_diff(dense, fast) <= 2  # bf16
    cached = generate(tmp_path, tiny_flux_dir, "cached", *base, "--cache", "taylorseer")
    assert json.loads((cached / "images.jsonl").read_text())["approximate"].startswith("approximate (cache taylorseer")
