"""flux_urae_train.py end to end on the tiny model: demo, multi-process, resume, Ctrl-C, NaN, config rules."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from urae.config import ConfigError, read_toml
from urae.demo import write_demo_dataset
from urae.trainer import main, parse

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n=8)


def args(model, data, out, *extra):
    return ["--config", str(ROOT / "presets/demo.toml"), "--no-demo", "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--sample_every_n_steps", "0",
            "--save_every_n_steps", "0", *extra]


def log_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run's entries replace the killed run's


def test_demo_preset_end_to_end(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(args(tiny_flux_dir, data_dir, out, "--sample_every_n_steps", "40"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "training 40 step(s)" in text and "saved" in text
    lora = load_file(out / "urae_demo.safetensors")
    assert any(k.endswith("lora_A.weight") for k in lora)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000040_00.png", "0000040_01.png"]
    assert len(log_losses(out)) == 40
    assert (out / "train_config.toml").is_file()


def test_loss_decreases_on_a_fixed_batch():
    """Overfit check: the adapter alone can fit one fixed batch (timesteps and noise held fixed)."""
    from networks import minor_lora
    from urae.flow import flow_loss
    from urae.tiny import build_transformer

    tr = build_transformer().requires_grad_(False)
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], tr, init="minor", targets="urae", verbose="False")
    net.apply_to([], tr, False, True)
    net.prepare_grad_etc(None, tr)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t5, pooled, t = torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g), torch.tensor([0.3, 0.7])
    losses = []
    for _ in range(20):
        loss = flow_loss(tr, x0, t5, pooled, t, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_two_processes_train_the_same_adapter(tiny_flux_dir, data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "flux_urae_train.py"), *args(tiny_flux_dir, data_dir, out, "--max_train_steps", "4")]
    r = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on 2 process(es)" in r.stdout and "adapter identical on all 2 processes" in r.stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["urae_demo.safetensors"]
    assert len(log_losses(out)) == 4


def _popen(a):
    return subprocess.Popen([sys.executable, str(ROOT / "flux_urae_train.py"), *a], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_resume_after_sigkill_matches_uninterrupted(tiny_flux_dir, data_dir, tmp_path):
    common = ("--max_train_steps", "8", "--save_every_n_steps", "2", "--optimizer_type", "prodigy",
              "--learning_rate", "1.0", "--network_args", "init=minor", "targets=urae", "dropout=0.1")
    full = tmp_path / "full"
    assert main(args(tiny_flux_dir, data_dir, full, *common)) == 0

    cut = tmp_path / "cut"
    proc = _popen(args(tiny_flux_dir, data_dir, cut, *common))
    _wait_for(lambda: (cut / "state-0000004" / "train_state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "urae_demo.safetensors").exists()
    assert main(args(tiny_flux_dir, data_dir, cut, *common, "--resume", "auto")) == 0

    a, b = load_file(full / "urae_demo.safetensors"), load_file(cut / "urae_demo.safetensors")
    mid = load_file(full / "state-0000004" / "adapter.safetensors")
    assert a.keys() == b.keys() == mid.keys()
    # float32 GEMMs may round differently between processes (buffer alignment), so "the same adapter"
    # means: the resumed run lands on the uninterrupted one far closer than the last 4 steps moved it
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - mid[k]).abs().max().item() for k in a)
    assert moved > 0 and diff <= 1e-3 * moved, (diff, moved)
    la, lb = log_losses(full), log_losses(cut)
    assert la.keys() == lb.keys() == set(range(1, 9))
    assert all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in range(5, 9)), (la, lb)


def test_ctrl_c_saves_a_checkpoint_and_exits_0(tiny_flux_dir, data_dir, tmp_path):
    out = tmp_path / "int"
    proc = _popen(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "100000"))
    _wait_for(lambda: (out / "train_log.jsonl").is_file() and len((out / "train_log.jsonl").read_text()) > 0, proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text[-2000:]
    assert "--resume auto" in text
    states = sorted(out.glob("state-*"))
    assert len(states) == 1 and (states[0] / "train_state.json").is_file()
    step = json.loads((states[0] / "train_state.json").read_text())["step"]
    assert step == len(log_losses(out)) >= 1


def test_nan_loss_stops_with_the_step_and_saves_nothing(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "20", "--learning_rate", "1e30",
                   "--max_grad_norm", "0"))
    assert rc == 1
    text = capsys.readouterr().out
    assert "loss is nan at step" in text.lower() or "loss is inf at step" in text.lower()
    assert not (out / "urae_demo.safetensors").exists()


def test_guidance_other_than_1_is_refused_unless_overridden(tiny_flux_dir, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="guidance-distilled"):
        parse(args(tiny_flux_dir, data_dir, tmp_path, "--guidance_scale", "3.5"))
    cfg = parse(args(tiny_flux_dir, data_dir, tmp_path, "--guidance_scale", "3.5", "--allow_training_guidance"))
    assert cfg["guidance_scale"] == 3.5


def test_unknown_keys_suggest_the_closest(tiny_flux_dir, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(args(tiny_flux_dir, data_dir, tmp_path, "--learning_rat", "1"))
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('train_data_dir = "x"\nnetwork_dimm = 8\n')
    with pytest.raises(ConfigError, match="did you mean 'network_dim'"):
        parse(["--config", str(bad)])


def test_output_dir_of_another_run_is_refused(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "train_config.toml").write_text("")
    assert main(args(tiny_flux_dir, data_dir, out, "--overwrite", "false")) == 1
    assert "--resume auto" in capsys.readouterr().out


def test_cache_only_builds_caches_and_stops(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    cache = tmp_path / "c"
    assert main(args(tiny_flux_dir, data_dir, out, "--cache_only", "--cache_dir", str(cache))) == 0
    assert "caches ready: 8 image(s)" in capsys.readouterr().out
    assert any(cache.rglob("*.safetensors"))
    assert not (out / "urae_demo.safetensors").exists()


def test_presets_hold_the_recipes():
    p2, p4, demo = (read_toml(ROOT / f"presets/{n}.toml") for n in ("2k", "4k", "demo"))
    for p in (p2, p4):
        cfg = parse(["--config", str(ROOT / f"presets/{'2k' if p is p2 else '4k'}.toml")])
        assert cfg["pretrained_model_name_or_path"] == "black-forest-labs/FLUX.1-dev"
        assert (cfg["network_dim"], cfg["network_alpha"]) == (16, 16.0)
        assert cfg["guidance_scale"] == 1.0 and cfg["timestep_sampling"] == "uniform"
        assert (cfg["optimizer_type"], cfg["learning_rate"], cfg["lr_scheduler"]) == ("prodigy", 1.0, "constant")
        assert cfg["max_grad_norm"] == 1.0 and "weight_decay=1e-4" in cfg["optimizer_args"]
        assert cfg["train_batch_size"] == 1 and cfg["gradient_checkpointing"] and cfg["mixed_precision"] == "bf16"
        assert cfg["t5_max_length"] == 512 and cfg["bucket_mode"] == "urae"
        assert "targets=urae" in cfg["network_args"]
    assert p2["resolution"] == "2048" and {"init=plain", "plain_init=gaussian"} <= set(p2["network_args"])
    assert (p2["ntk_factor"], p2["proportional_attention"], p2["real_prompt_ratio"]) == (1.0, False, 0.2)
    assert p2["max_train_steps"] == 2000
    assert p4["resolution"] == "4096" and "init=minor" in p4["network_args"]
    assert (p4["ntk_factor"], p4["proportional_attention"], p4["real_prompt_ratio"]) == (10.0, True, 0.2)
    assert p4["max_train_steps"] == 10000 and p4["base_lora"].endswith("urae_2k.safetensors")
    assert demo["demo"] is True and "init=minor" in demo["network_args"]


def test_cache_only_then_training_and_resume_auto_without_states(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "seq"
    assert main(args(tiny_flux_dir, data_dir, out, "--cache_only")) == 0
    assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "2")) == 0  # caching left no marker
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "train_config.toml").write_text("")  # a run that died before its first save
    assert main(args(tiny_flux_dir, data_dir, crashed, "--max_train_steps", "2", "--resume", "auto")) == 0
    assert "no saved state" in capsys.readouterr().out


def test_overwrite_removes_the_old_runs_states(tiny_flux_dir, data_dir, tmp_path):
    out = tmp_path / "ow"
    assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "4", "--save_every_n_steps", "2")) == 0
    assert [p.name for p in sorted(out.glob("state-*"))] == ["state-0000002", "state-0000004"]
    assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "1", "--save_every_n_steps", "1",
                     "--overwrite")) == 0
    assert [p.name for p in sorted(out.glob("state-*"))] == ["state-0000001"]
    assert len(log_losses(out)) == 1


def test_settings_that_would_be_ignored_or_fail_late_are_refused(tiny_flux_dir, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        parse(args(tiny_flux_dir, data_dir, tmp_path, "--lr_warmup_steps", "10"))
    with pytest.raises(ConfigError, match="sample_prompts.*does not exist"):
        parse(args(tiny_flux_dir, data_dir, tmp_path, "--sample_every_n_steps", "5",
                   "--sample_prompts", str(tmp_path / "nope.txt")))
    bad = tmp_path / "p.txt"
    bad.write_text("a cat --w 1000\n")
    with pytest.raises(ConfigError, match="multiple of 16"):
        parse(args(tiny_flux_dir, data_dir, tmp_path, "--sample_every_n_steps", "5", "--sample_prompts", str(bad)))
    with pytest.raises(ConfigError, match="choose one of auto, no, bf16"):
        parse(args(tiny_flux_dir, data_dir, tmp_path, "--mixed_precision", "fp16"))


def test_files_record_the_settings_to_generate_with():
    """A stock-RoPE run (the 2K recipe) is generated with URAE's 2K+ settings; a changed runtime is kept."""
    from urae.runtime import HighResSettings
    from urae.trainer import inference_settings

    stock = HighResSettings()
    assert inference_settings({"resolution": "2048"}, stock) == HighResSettings(10.0, True)
    assert inference_settings({"resolution": "1024"}, stock) == stock
    four_k = HighResSettings(10.0, True)
    assert inference_settings({"resolution": "4096"}, four_k) is four_k
