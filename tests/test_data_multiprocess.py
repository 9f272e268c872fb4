"""Two-process caching with accelerate's own launcher on CPU (gloo): split work, one complete cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from urae.data.synthetic import write_image

REPO = Path(__file__).resolve().parents[1]


def _launch(model, data, cache, stats):
    # `--multi_gpu` is accelerate's torchrun launcher; on a CPU-only machine the processes use gloo
    # (`--cpu` alone would start a single process unless MPI is configured).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", "-m", "urae.data", "--model", str(model),
           "--train_data_dir", str(data), "--cache_dir", str(cache), "--resolution", "64",
           "--stats_json", str(stats), "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads(Path(f"{stats}.rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, out.stdout


@pytest.mark.slow
def test_two_process_caching_splits_work_and_completes(tmp_path, tiny_flux_dir):
    from diffusers import FluxPipeline

    from urae.data import DataOptions, build_caches

    data = tmp_path / "data"
    for i in range(8):
        write_image(data / f"{i}.png", 64 + 16 * (i % 3), 64, seed=i).with_suffix(".txt").write_text(f"caption {i % 6}")
    bad = write_image(data / "cut.jpg", 256, 256, 9)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # decodes on neither rank
    bad.with_suffix(".txt").write_text("caption 0")
    cache = tmp_path / "cache"

    ranks, stdout = _launch(tiny_flux_dir, data, cache, tmp_path / "s1")
    assert [r["processes"] for r in ranks] == [2, 2]
    encoded = [r["latents_encoded"] for r in ranks]
    assert sum(encoded) == 8 and min(encoded) > 0                     # both ranks worked, no image twice
    assert [r["calls"]["vae_encoder"] for r in ranks] == encoded      # one VAE forward per encoded image
    assert sum(r["texts_encoded"] for r in ranks) == 6                # distinct captions, split too
    assert all(r["entries"] == 8 and r["skipped"] == 1 for r in ranks)  # every rank knows the failed image
    assert stdout.count("bucket (WxH)") == 1                          # summary printed once, by rank 0

    # One complete cache: a second run (single process, same model) encodes nothing.
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, transformer=None)
    calls = []
    for m in (pipe.vae.encoder, pipe.text_encoder, pipe.text_encoder_2):
        m.register_forward_hook(lambda *_: calls.append(1))
    plan = build_caches(DataOptions(train_data_dir=str(data), cache_dir=str(cache), resolution=64), pipe.components,
                        progress=False)
    assert calls == [] and len(plan.entries) == 8 and plan.latents.reused == 8
