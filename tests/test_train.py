"""flux_urae_train.py end to end on the tiny model: demo, multi-process, resume, Ctrl-C, NaN, config rules."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from urae.config import ConfigError, read_toml
from urae.trainer import main, parse

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data_dir(demo_data_dir):
    return demo_data_dir


def args(model, data, out, *extra):
    return ["--config", str(ROOT / "presets/demo.toml"), "--no-demo", "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--sample_every_n_steps", "0",
            "--save_every_n_steps", "0", *extra]


def log_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run's entries replace the killed run's


@pytest.mark.slow
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
    # the resolved config is in train_config.toml, and one line on the terminal says so
    assert "training config:" not in text and f"every resolved key is written to {out / 'train_config.toml'}" in text
    assert "learning_rate = 0.001" in (out / "train_config.toml").read_text()


def test_config_line_says_where_the_settings_came_from_and_went(tmp_path):
    from urae.config import resolve
    from urae.train_options import OPTIONS
    from urae.trainer import config_line

    cfg = resolve(OPTIONS, ["--config", str(ROOT / "presets/demo.toml"), "--max_train_steps", "3"], "t", "")
    line = config_line(cfg, tmp_path)
    n_toml = len(read_toml(ROOT / "presets/demo.toml"))
    assert line == (f"config: {ROOT / 'presets/demo.toml'} + command line ({n_toml} of {len(OPTIONS)} keys set); "
                    f"every resolved key is written to {tmp_path / 'train_config.toml'} when training starts")


def test_one_sgd_step_moves_the_loss_by_the_gradient_and_trains_every_factor():
    """The adapter's gradient is the loss's: an SGD step of size lr lowers the loss by lr * |g|^2 to first order
    (float64, so the second-order rest is all that differs), and every trainable factor gets a gradient."""
    from networks import minor_lora
    from urae.flow import flow_loss
    from urae.tiny import build_transformer

    tr = build_transformer().double().requires_grad_(False)
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], tr, init="minor", targets="urae", verbose="False")
    net.apply_to([], tr, False, True)
    net.prepare_grad_etc(None, tr)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t5, pooled, t = torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g), torch.tensor([0.3, 0.7])
    x0, noise, t5, pooled, t = (v.double() for v in (x0, noise, t5, pooled, t))
    loss = flow_loss(tr, x0, t5, pooled, t, noise)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    sq = sum((p.grad ** 2).sum() for p in params).item()
    drops = []
    for lr in (1e-3 / sq, 2e-3 / sq):  # moves the loss by ~1e-3 of itself
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
            drops.append((loss - flow_loss(tr, x0, t5, pooled, t, noise)).item() / (lr * sq))
            for p in params:
                p += lr * p.grad
    # each ratio is 1 plus a curvature term linear in lr (~2 % here), so extrapolating the two to lr = 0 leaves
    # only the third-order rest and the loss's float32 rounding
    assert abs(2 * drops[0] - drops[1] - 1) < 2e-3, drops


def _launch(distributed: list[str], out: Path, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *distributed, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "0", str(ROOT / "flux_urae_train.py"), *extra]
    r = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _reference_sgd_step(argv, world: int, lr: float):
    """One SGD step over the global batch of `world` ranks, computed in this single process from the trainer's
    own stages (plan, caches, model) but with an independent loop: rank r's batch is r of the epoch's shuffled
    batches and its noise is drawn from seed_for(seed, 0, r, world); the gradient is the mean over ranks.
    Returns the file tensors before and after the step, each rank's loss, and each rank's images."""
    import urae.trainer as T
    from urae.data import make_dataloader
    from urae.flow import flow_loss, sample_timesteps
    from urae.runtime import apply_highres
    from urae.train_sync import BatchStream, seed_for

    cfg = parse(argv)
    acc = T._make_accelerator(cfg, Path(cfg["output_dir"]), False)
    plan = T.plan_stage(cfg, acc)
    caches, _ = T.cache_stage(cfg, plan, acc, torch.float32)
    transformer, _, _ = T.load_for_training(cfg, plan, torch.float32, sampling=False)
    model = T.model_stage(cfg, plan, transformer, acc)
    before = {k: v.detach().clone() for k, v in model.network.export_state_dict()[0].items()}
    loader = make_dataloader(caches, batch_size=cfg["train_batch_size"], seed=cfg["seed"])
    losses, images = [], []
    model.network.train()
    with apply_highres(model.transformer, model.settings):
        for r in range(world):
            batch = BatchStream(loader, r, world).get(0)
            images.append(batch["image"])
            gen = torch.Generator().manual_seed(seed_for(cfg["seed"], 0, r, world))
            t = sample_timesteps(batch["latents"].shape[0], cfg["timestep_sampling"], gen,
                                 sigmoid_scale=cfg["sigmoid_scale"], shift=cfg["discrete_flow_shift"])
            noise = torch.randn(batch["latents"].shape, generator=gen)
            loss = flow_loss(model.transformer, batch["latents"].float(), batch["t5_embeds"], batch["clip_pooled"], t,
                             noise, guidance=cfg["guidance_scale"])
            loss.backward()  # gradients add up over the ranks' batches
            losses.append(loss.item())
    with torch.no_grad():
        for p in model.trainable:
            p -= lr * p.grad / world
    after = {k: v.detach().clone() for k, v in model.network.export_state_dict()[0].items()}
    return before, after, losses, images


def _per_rank_bytes(stdout: str) -> float:
    import re

    m = re.search(r"split over 2 processes, ([\d.]+) (B|KiB|MiB|GiB) of weights each", stdout)
    assert m, stdout[-2000:]
    return float(m[1]) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m[2]]


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_equal_one_process_over_the_same_global_batch(tiny_flux_dir, data_dir, tmp_path):
    """Two ranks, each on its own batch and noise (DDP-style replicated base, and FSDP with the base sharded,
    gloo, with activation offload as eight 24 GB GPUs at 4K need), take the step that one process takes over
    both batches with the gradient averaged. SGD, so a summed gradient or a rank on the wrong batch moves the
    adapter by a visibly different amount; the tolerance is relative to how far the step moved it."""
    lr = 0.5
    sgd = ("--max_train_steps", "1", "--optimizer_type", "sgd", "--learning_rate", str(lr), "--max_grad_norm", "0",
           "--train_batch_size", "1", "--gradient_checkpointing", "true")
    before, after, ranks_losses, images = _reference_sgd_step(args(tiny_flux_dir, data_dir, tmp_path / "ref", *sgd),
                                                              2, lr)
    assert images[0] != images[1]  # the ranks see different data
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 1e-4, moved
    from diffusers import FluxTransformer2DModel

    full = sum(p.numel() * p.element_size() for p in
               FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").parameters())
    for name, flags, memory in (("ddp", ["--multi_gpu"], []),
                                ("fsdp", ["--use_fsdp", "--fsdp_version", "2"], ["--offload_activations"])):
        out = tmp_path / name
        r = _launch(flags, out, *args(tiny_flux_dir, data_dir, out, *sgd, "--sample_every_n_steps", "1", *memory))
        assert "on 2 process(es)" in r.stdout and "adapter identical on all 2 processes" in r.stdout
        both = r.stdout + r.stderr  # per-process lines come from rank 0 only
        assert both.count("minor_lora: init=minor") == 1 and both.count("transformer: ") == 1, both[-3000:]
        if name == "fsdp":  # each rank holds half of the base (its local shards), not all of it
            assert abs(_per_rank_bytes(r.stdout) - full / 2) <= 0.03 * full, (r.stdout[-2000:], full)
        else:
            assert "FSDP" not in r.stdout
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["urae_demo.safetensors"]
        assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000001_00.png", "0000001_01.png"]
        assert log_losses(out)[1] == pytest.approx(sum(ranks_losses) / 2, rel=1e-5)
        got = load_file(out / "urae_demo.safetensors")
        assert got.keys() == after.keys()
        diff = max((got[k] - after[k]).abs().max().item() for k in got)
        assert diff <= 1e-3 * moved, (name, diff, moved)


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


# Runs the real trainer in a child that SIGKILLs itself the moment the state of a given step is on disk:
# the kill always lands at that step, however fast or slow the machine (no race with a timer).
_KILL_AFTER_STATE = """
import os, signal, sys
import urae.trainer as t
step, argv = int(sys.argv[1]), sys.argv[2:]
real = t.save_state
def save_then_die(out_dir, s, *a, **k):
    path = real(out_dir, s, *a, **k)
    if s == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
t.save_state = save_then_die
sys.exit(t.main(argv))
"""


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tiny_flux_dir, data_dir, tmp_path):
    common = ("--max_train_steps", "8", "--save_every_n_steps", "2", "--optimizer_type", "prodigy",
              "--learning_rate", "1.0", "--network_args", "init=minor", "targets=urae", "dropout=0.1")
    full = tmp_path / "full"
    assert main(args(tiny_flux_dir, data_dir, full, *common)) == 0

    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_STATE, "4", *args(tiny_flux_dir, data_dir, cut, *common)],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in cut.glob("state-*")) == ["state-0000002", "state-0000004"]
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


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_128_plus_the_signal(tiny_flux_dir, data_dir, tmp_path, sig,
                                                                            code):
    out = tmp_path / "int"
    proc = _popen(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "100000"))
    _wait_for(lambda: (out / "train_log.jsonl").is_file() and len((out / "train_log.jsonl").read_text()) > 0, proc)
    proc.send_signal(sig)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, text[-2000:]  # `train && infer` must not go on without a final file
    assert "--resume auto" in text
    states = sorted(out.glob("state-*"))
    assert len(states) == 1 and (states[0] / "train_state.json").is_file()
    step = json.loads((states[0] / "train_state.json").read_text())["step"]
    assert step == len(log_losses(out)) >= 1


def test_nan_loss_stops_with_the_step_and_saves_nothing(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "20", "--learning_rate", "1e30",
                   "--max_grad_norm", "0"))
    assert rc == 2
    text = capsys.readouterr().err
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
    (out / "urae_demo.safetensors").write_text("")  # a finished run's file (a marker alone is a run never saved)
    assert main(args(tiny_flux_dir, data_dir, out, "--overwrite", "false")) == 2
    assert "--resume auto" in capsys.readouterr().err


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
    from urae.adapters import looks_local

    assert looks_local(p4["base_lora"])  # a missing 2K file is a local mistake, never a hub lookup
    assert demo["demo"] is True and "init=minor" in demo["network_args"]


@pytest.mark.slow
def test_cache_only_then_training_and_resume_auto_without_states(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "seq"
    assert main(args(tiny_flux_dir, data_dir, out, "--cache_only")) == 0
    assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "2")) == 0  # caching left no marker
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "train_config.toml").write_text("")  # a run that died before its first save
    assert main(args(tiny_flux_dir, data_dir, crashed, "--max_train_steps", "2", "--resume", "auto")) == 0
    assert "no saved state" in capsys.readouterr().out


@pytest.mark.slow
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
    dype = HighResSettings(rope="dype-yarn")  # another scheme is what the file is for, at any size
    assert inference_settings({"resolution": "2048"}, dype) is dype


def _fails_fast(argv, capsys, match: str):
    """A user's mistake: exit 2, one line on stderr naming it, found before any model or cache work (the
    caches and model stages are replaced by ones that fail the test if reached)."""
    import urae.trainer as trainer

    def reached(*a, **k):
        raise AssertionError("the mistake was not found before the caches / model stage")

    saved = trainer.cache_stage, trainer.load_for_training
    trainer.cache_stage = trainer.load_for_training = reached
    try:
        rc = main(argv)
    finally:
        trainer.cache_stage, trainer.load_for_training = saved
    err = capsys.readouterr()
    assert rc == 2, err
    lines = [x for x in err.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err.err
    assert "Traceback" not in err.err and "text cache" not in err.out and "loading" not in err.out.lower()


def test_user_mistakes_are_found_before_any_model_loads(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    _fails_fast(args(tiny_flux_dir, tmp_path / "nowhere", out), capsys, "is not an existing folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_fast(args(tiny_flux_dir, empty, out), capsys, "no usable images")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--base_lora", str(tmp_path / "2k.safetensors")), capsys,
                "no such file")
    from safetensors.torch import save_file

    wide = tmp_path / "flux_width.safetensors"  # a LoRA of FLUX.1's width (3072) for the tiny model (32)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(wide))
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--base_lora", str(wide)), capsys, "shape mismatch")
    # offline hub id: the data folder is checked first, then the model
    _fails_fast(args("someone/FLUX-typo", tmp_path / "nowhere", out), capsys, "train_data_dir")
    _fails_fast(args("someone/FLUX-typo", data_dir, out), capsys, "HF_HUB_OFFLINE")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--resolution", "1000"), capsys, "multiple")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--optimizer_args", "weight_decayy=0.1"), capsys,
                "do not fit optimizer_type")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--network_args", "init=minr"), capsys, "network_args")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--network_args", "init minor"), capsys, "not key=value")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--network_args", "targets=regex:nothing_matches_this"), capsys,
                "network_args")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--network_args", "train_t5xxl=true"), capsys,
                "train_t5xxl is not supported")
    assert not out.exists()


def test_a_resume_that_cannot_continue_is_refused_before_any_model_loads(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "2", "--save_every_n_steps", "2")) == 0
    capsys.readouterr()
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "1", "--resume", "auto"), capsys,
                "past max_train_steps = 1")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "4", "--resume", "auto", "--network_dim", "8"),
                capsys, "network_dim = 4")


def test_an_internal_bug_keeps_its_traceback(tiny_flux_dir, data_dir, tmp_path, monkeypatch):
    import urae.trainer as trainer

    def broken(*a, **k):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(trainer, "make_plan", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(args(tiny_flux_dir, data_dir, tmp_path / "o"))


def test_demo_never_writes_into_a_users_folder(tiny_flux_dir, tmp_path, capsys):
    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    rc = main(["--config", str(ROOT / "presets/demo.toml"), "--pretrained_model_name_or_path", str(tiny_flux_dir),
               "--train_data_dir", str(mine), "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "no usable images" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]


def test_a_full_disk_at_save_stops_cleanly_and_keeps_the_last_state(tiny_flux_dir, data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    import urae.checkpoints as checkpoints

    real = checkpoints.torch.save
    calls = {"n": 0}

    def save_until_full(obj, f, *a, **k):  # the second state's optimizer file hits a full disk
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_full)
    out = tmp_path / "full"
    rc = main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "6", "--save_every_n_steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "saving the state of step 4 failed: no space left" in err and "state-0000002 is intact" in err
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir() if p.name.startswith(("state", ".state"))] == ["state-0000002"]


def test_too_little_free_space_is_refused_before_the_run(tmp_path):
    from urae.train_plan import check_free_space

    check_free_space(tmp_path / "new" / "out", 1024)
    with pytest.raises(ConfigError, match="free on the disk"):
        check_free_space(tmp_path, 2**62)


@pytest.mark.slow
def test_a_mistake_under_accelerate_launch_is_one_line(tiny_flux_dir, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "flux_urae_train.py"),
           *args(tiny_flux_dir, tmp_path / "nowhere", tmp_path / "o")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == [f"error: train_data_dir: {tmp_path / 'nowhere'} is not an existing folder"], r.stderr


def test_impossible_memory_settings_are_refused_in_the_plan(tiny_flux_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--gradient_checkpointing", "true", "--blocks_to_swap", "4"),
                capsys, "at most 3")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--gradient_checkpointing", "false", "--offload_activations"),
                capsys, "needs gradient_checkpointing")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--offload_activations", "disk", "--checkpoint_segments", "2"),
                capsys, "choose one")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--offload_activations", "dsk"), capsys, "is not a valid bool")


@pytest.mark.slow
def test_resume_with_other_memory_options_continues_the_same_run(tiny_flux_dir, data_dir, tmp_path, capsys):
    """States hold the adapter and optimizer only: a run saved with block swap + activation offload resumes
    all-resident (and the other way round) and lands where an uninterrupted run does."""
    common = ("--max_train_steps", "4", "--save_every_n_steps", "2", "--gradient_checkpointing", "true")
    full = tmp_path / "full"
    assert main(args(tiny_flux_dir, data_dir, full, *common)) == 0
    cut = tmp_path / "cut"
    assert main(args(tiny_flux_dir, data_dir, cut, *common, "--max_train_steps", "2", "--blocks_to_swap", "2",
                     "--offload_activations", "disk", "--activation_dir", str(tmp_path / "act"))) == 0
    assert "memory: blocks_to_swap = 2, offload_activations = disk" in capsys.readouterr().out
    assert list((tmp_path / "act").iterdir()) == []  # the activation file is gone
    rows = [json.loads(x) for x in (cut / "train_log.jsonl").read_text().splitlines()]
    assert all(r["memory"]["weight_loads"] == 2 * 2 - 1 and r["memory"]["disk_bytes"] > 0 for r in rows)
    assert main(args(tiny_flux_dir, data_dir, cut, *common, "--resume", "auto", "--checkpoint_segments", "2")) == 0
    a, b = load_file(full / "urae_demo.safetensors"), load_file(cut / "urae_demo.safetensors")
    mid = load_file(full / "state-0000002" / "adapter.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - mid[k]).abs().max().item() for k in a)
    assert moved > 0 and diff <= 1e-3 * moved, (diff, moved)
    la, lb = log_losses(full), log_losses(cut)
    assert all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in range(1, 5)), (la, lb)


def test_complete_caches_load_no_encoder_and_no_vae(tiny_flux_dir, data_dir, tmp_path, capsys, caplog):
    """Host RAM: the second run finds every cache complete and loads only the transformer (no T5, CLIP or
    VAE: no sampling here), and never the whole pipeline."""
    import logging

    caplog.set_level(logging.INFO, logger="urae")
    cache = tmp_path / "cache"
    assert main(args(tiny_flux_dir, data_dir, tmp_path / "a", "--max_train_steps", "1", "--cache_dir", str(cache))) == 0
    first = [r.getMessage().split(":")[0] for r in caplog.records]
    assert {"text_encoder", "text_encoder_2", "vae", "transformer"} <= set(first)
    caplog.clear()
    capsys.readouterr()
    assert main(args(tiny_flux_dir, data_dir, tmp_path / "b", "--max_train_steps", "1", "--cache_dir", str(cache))) == 0
    loaded = {r.getMessage().split(":")[0] for r in caplog.records}
    assert "latents complete" in capsys.readouterr().out
    assert loaded & {"text_encoder", "text_encoder_2", "vae", "transformer"} == {"transformer"}


def test_shared_files_carry_no_local_paths_and_no_metadata_keeps_only_what_loaders_need(tiny_flux_dir, data_dir,
                                                                                        tmp_path):
    from safetensors import safe_open

    from networks import minor_lora
    from urae.tiny import build_transformer

    base = tmp_path / "private" / "folder" / "my_2k.safetensors"
    base.parent.mkdir(parents=True)
    tr = build_transformer()
    net = minor_lora.create_network(1.0, 2, 2.0, None, [], tr, init="plain", targets="urae", verbose="False")
    net.apply_to([], tr, False, True)
    net.save_weights(str(base), None, {})
    for extra, out in (([], tmp_path / "full"), (["--no_metadata"], tmp_path / "bare")):
        assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "1", "--base_lora", str(base),
                         *extra)) == 0
        with safe_open(str(out / "urae_demo.safetensors"), "pt") as f:
            meta = f.metadata()
        assert str(tmp_path) not in json.dumps(meta)
        assert "urae_runtime" in meta and "urae_structure" in meta
        if extra:
            assert "urae_recipe" not in meta and "ss_learning_rate" not in meta
        else:
            recipe = json.loads(meta["urae_recipe"])
            assert recipe["base_lora"]["name"] == "my_2k.safetensors" and recipe["base_lora"]["fingerprint"]


def test_training_samples_follow_sd_scripts_flags_and_record_the_shift(tiny_flux_dir, data_dir, tmp_path, capsys):
    from urae.outputs import read_png_info

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --l 2.5 --n blurry\na blue square --w 64 --h 64 --s 2\n")
    out = tmp_path / "s"
    assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "1", "--sample_prompts", str(prompts),
                     "--sample_every_n_steps", "1")) == 0
    assert f"samples of step 1: 2 image(s) in {out / 'samples'}" in capsys.readouterr().out
    infos = [read_png_info(out / "samples" / f"0000001_0{i}.png") for i in (0, 1)]
    assert [float(i["cfg_scale"]) for i in infos] == [2.5, 1.0]
    assert all(json.loads(i["runtime"])["shift"] == 3.0 for i in infos)


def test_many_images_without_a_caption_stop_in_the_plan_unless_intended(tiny_flux_dir, data_dir, tmp_path, capsys):
    import shutil

    from urae.train_plan import make_plan

    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns(".urae_cache"))
    for side in sorted(data.glob("*.txt"))[:2]:  # 2 of 8 images lose their caption, one keeps an empty one
        side.unlink()
    (data / "002.txt").write_text("\n")
    out = tmp_path / "o"
    _fails_fast(args(tiny_flux_dir, data, out), capsys, "3 of 8 images have no usable caption")
    _fails_fast(args(tiny_flux_dir, data, out, "--caption_extension", ".json"), capsys,
                "8 of 8 images have no usable caption (looked for .json side files")
    plan = make_plan(parse(args(tiny_flux_dir, data, out, "--allow_missing_captions")))
    assert sum(it.captions == {"prompt": ""} for it in plan.scan.items) == 3


@pytest.mark.parametrize(("flags", "want"), [
    (["--learning_rate", "-1"], "learning_rate must be > 0, got -1.0"),
    (["--learning_rate", "nan"], "learning_rate must be > 0, got nan"),
    (["--max_train_steps", "0"], "max_train_steps must be >= 1, got 0"),
    (["--discrete_flow_shift", "0"], "discrete_flow_shift must be > 0, got 0.0"),
    (["--real_prompt_ratio", "1.5"], "real_prompt_ratio must be in [0, 1], got 1.5"),
    (["--bucket_reso_steps", "0"], "bucket_reso_steps must be >= 16, got 0"),
    (["--max_grad_norm", "-0.5"], "max_grad_norm must be >= 0, got -0.5"),
])
def test_every_number_is_range_checked_before_anything_runs(tiny_flux_dir, data_dir, tmp_path, capsys, flags, want):
    _fails_fast(args(tiny_flux_dir, data_dir, tmp_path / "o", *flags), capsys, want)


def test_a_quoted_number_in_the_toml_is_an_error(tiny_flux_dir, data_dir, tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text((ROOT / "presets/demo.toml").read_text().replace("learning_rate = 1e-3", 'learning_rate = "1e-3"'))
    argv = args(tiny_flux_dir, data_dir, tmp_path / "o")
    argv[1] = str(toml)
    _fails_fast(argv, capsys, "learning_rate = '1e-3' is not a valid float (a number is written without quotes")


def test_ctrl_c_while_caching_is_one_line_exit_130_and_keeps_the_finished_files(tiny_flux_dir, data_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    import urae.data

    real = urae.data.build_caches

    def ctrl_c_at_the_third_encode(data, parts, *a, **k):
        encode, calls = parts["vae"].encode, []

        def encode_until_ctrl_c(*x, **y):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return encode(*x, **y)

        parts["vae"].encode = encode_until_ctrl_c
        return real(data, parts, *a, **k)

    monkeypatch.setattr(urae.data, "build_caches", ctrl_c_at_the_third_encode)
    cache = tmp_path / "cache"
    rc = main(args(tiny_flux_dir, data_dir, tmp_path / "o", "--cache_dir", str(cache)))
    err = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if x.strip() and "%|" not in x]
    assert rc == 130
    assert err == ["interrupted while caching; the cache files finished so far are kept, and the next run reuses "
                   "them"], err
    assert len([f for f in cache.rglob("*.safetensors") if "latent" in str(f)]) == 2


def test_a_run_that_fails_before_saving_anything_does_not_block_the_next(tiny_flux_dir, data_dir, tmp_path, capsys):
    from urae.checkpoints import check_output_dir
    from urae.tiny import build_transformer, write_bfl_checkpoint

    # a transformer file of another depth: found only when it loads, after the run marked its folder
    other = write_bfl_checkpoint(build_transformer(layers=1, single_layers=1), tmp_path / "other.safetensors")
    for out, existed in ((tmp_path / "new", False), (tmp_path / "mine", True)):
        if existed:
            out.mkdir()
        rc = main(args(tiny_flux_dir, data_dir, out, "--transformer", str(other), "--overwrite", "false"))
        err = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if x.startswith("error")]
        assert rc == 2 and len(err) == 1 and "does not fit the transformer config" in err[0], err
        # no marker left to refuse the corrected command; a folder the run created is gone again
        assert (sorted(p.name for p in out.iterdir()) == []) if existed else not out.exists()
    # a marker and a log alone (a run killed before its first save) are reused silently
    out = tmp_path / "killed"
    out.mkdir()
    (out / "train_config.toml").write_text("")
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    check_output_dir(out, resuming=False, overwrite=False, output_name="urae_demo")


def test_training_under_dype_records_the_scheme_and_the_file_drives_it(tiny_flux_dir, data_dir, tmp_path, capsys):
    """rope = dype-yarn (base 128 px: the 256 px demo images are past it, as 4K is past 1024): every sample of a
    batch brings its own noise level to the tables, samples use the scheme, and the file's metadata makes it
    the scheme of flux_urae_infer.py."""
    from urae.inference import main as infer
    from urae.outputs import read_png_info
    from urae.runtime import SchemePosEmbed

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 256 --h 128 --s 2\n")
    out = tmp_path / "d"
    seen = []

    def spy(module, inputs, output):
        if isinstance(module, SchemePosEmbed) and torch.is_grad_enabled():
            seen.append((list(module.sigmas), output[0].shape))

    handle = torch.nn.modules.module.register_module_forward_hook(spy)
    try:
        assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "2", "--sample_prompts", str(prompts),
                         "--sample_every_n_steps", "2", "--rope", "dype-yarn", "--rope_base_resolution", "128")) == 0
    finally:
        handle.remove()
    assert "rope dype-yarn (base 128, lambda 2)" in capsys.readouterr().out
    assert len(seen) == 2 and all(len(s) == 2 and s[0] != s[1] and shape[0] == 2 for s, shape in seen), seen
    assert json.loads(read_png_info(out / "samples" / "0000002_00.png")["runtime"])["rope"] == "dype-yarn"
    from safetensors import safe_open

    with safe_open(str(out / "urae_demo.safetensors"), "pt") as f:
        runtime = json.loads(f.metadata()["urae_runtime"])
    assert runtime["rope"] == "dype-yarn" and runtime["rope_base_resolution"] == 128
    imgs = tmp_path / "imgs"
    assert infer(["--model", str(tiny_flux_dir), "--lora", str(out / "urae_demo.safetensors"), "--prompt", "x",
                  "--width", "256", "--height", "128", "--steps", "1", "--output_dir", str(imgs)]) == 0
    assert "position scheme: dype-yarn (base 128, lambda 2) (from the adapter's metadata)" in capsys.readouterr().out
    assert json.loads((imgs / "images.jsonl").read_text())["runtime"]["rope"] == "dype-yarn"


def test_a_wrong_rope_is_refused_before_anything_loads(tiny_flux_dir, data_dir, tmp_path, capsys):
    _fails_fast(args(tiny_flux_dir, data_dir, tmp_path / "o", "--rope", "yarn", "--ntk_factor", "10"), capsys,
                "ntk_factor 10 is for rope = ntk")


def test_a_hub_model_that_cannot_be_reached_is_named_in_the_plan(data_dir, tmp_path, capsys, monkeypatch):
    """No network (the hub endpoint, as HF_ENDPOINT would set it, refuses connections): one line naming the cause
    from one request, not a minute of download retries ending in "does not appear to have a file named
    model_index.json"."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    _fails_fast(args("black-forest-labs/FLUX.1-dev", data_dir, tmp_path / "o"), capsys,
                "black-forest-labs/FLUX.1-dev is not downloaded yet and cannot be: the hub cannot be reached")
    assert not (tmp_path / "o").exists()


def test_a_missing_local_base_lora_says_to_run_the_2k_stage_first(tiny_flux_dir, data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    from urae.adapters import looks_local

    monkeypatch.chdir(tmp_path)
    assert not looks_local("out/urae_2k/urae_2k.safetensors")  # could be the hub repo out/urae_2k ...
    (tmp_path / "out").mkdir()
    assert looks_local("out/urae_2k/urae_2k.safetensors")  # ... but not beside a folder named out
    assert looks_local("out\\urae_2k.safetensors") and looks_local("./a/b/c.safetensors")
    for spec in ("out/urae_2k/urae_2k.safetensors", "./out/urae_2k/urae_2k.safetensors"):
        _fails_fast(args(tiny_flux_dir, data_dir, tmp_path / "o", "--base_lora", spec), capsys,
                    "no such file. The 4K recipe starts from the 2K stage's LoRA: run the 2K stage first")
