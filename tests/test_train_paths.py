"""The training paths users take, end to end on the tiny model: exact resume on a changing learning rate,
TensorBoard and first samples, gradient accumulation, bf16 autocast with the 2K and 4K presets (sizes
overridden) and memory = "auto" for a pretended GPU, Adafactor and 8-bit AdamW."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_argv
from safetensors.torch import load_file

from urae.trainer import main


def _log(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}


def _opt(state: Path) -> dict:
    return torch.load(state / "optimizer.pt", map_location="cpu", weights_only=True)


def test_resume_is_bit_exact_on_a_cosine_schedule_with_both_adam_moments(finished_run, tmp_path):
    """What a run killed after its step-2 state leaves (that state, its config, a log that ran further) resumes
    to the same bits as the uninterrupted run: adapter, both AdamW moments, the schedule's position, losses."""
    full, argv, _ = finished_run
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("train_config.toml", "train_log.jsonl"):
        shutil.copy(full / name, cut / name)
    shutil.copytree(full / "state-0000002", cut / "state-0000002")
    resumed = [*argv[: argv.index("--output_dir") + 1], str(cut), *argv[argv.index("--output_dir") + 2:]]
    assert main([*resumed, "--resume", "auto"]) == 0

    a, b = load_file(full / "urae_demo.safetensors"), load_file(cut / "urae_demo.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = _opt(full / "state-0000004"), _opt(cut / "state-0000004")
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][i][moment], ob["state"][i][moment]), (i, moment)
    sa, sb = (torch.load(d / "state-0000004" / "scheduler.pt", weights_only=True) for d in (full, cut))
    assert sa == sb
    la, lb = _log(full), _log(cut)
    assert la.keys() == lb.keys() == {1, 2, 3, 4}
    assert all(la[s]["loss"] == lb[s]["loss"] and la[s]["lr"] == lb[s]["lr"] for s in (3, 4))
    lrs = [la[s]["lr"] for s in (1, 2, 3, 4)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # the schedule did move


def test_first_samples_and_tensorboard_events(finished_run):
    out, _, printed = finished_run
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000000_00.png", "0000000_01.png"]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed; logging to JSONL only" in printed
        pytest.skip("tensorboard is not installed: the run said so and logged to JSONL only")
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


class _Micro:
    """Two fixed one-image micro-batches, as BatchStream.get(m) returns them."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.batches = [{"latents": torch.randn(1, 16, 8, 8, generator=g), "t5_embeds": torch.randn(1, 7, 32, generator=g),
                         "clip_pooled": torch.randn(1, 32, generator=g)} for _ in range(2)]

    def get(self, m):
        return self.batches[m]


def test_two_accumulated_micro_batches_equal_one_batch_of_two(tiny_flux_dir, demo_data_dir, tmp_path):
    """gradient_accumulation_steps = 2 at batch 1 gives the gradient (so the SGD step) and loss of one batch of
    both images with the same timesteps and noise: each micro-batch's loss is halved, none is lost."""
    from accelerate import Accelerator

    from networks import minor_lora
    from urae.flow import flow_loss, sample_timesteps
    from urae.runtime import HighResSettings
    from urae.tiny import build_transformer
    from urae.train_sync import seed_for
    from urae.trainer import Model, parse, train_step

    cfg = parse(train_argv(tiny_flux_dir, demo_data_dir, tmp_path, "--gradient_accumulation_steps", "2",
                           "--train_batch_size", "1"))
    tr = build_transformer().requires_grad_(False)
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], tr, init="minor", targets="urae", verbose="False")
    net.apply_to([], tr, False, True)
    net.prepare_grad_etc(None, tr)
    trainable = [p for p in net.parameters() if p.requires_grad]
    with torch.no_grad():  # away from the initial point, so every factor has a gradient
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    stream = _Micro()
    loss = train_step(cfg, Model(tr, net, trainable, HighResSettings()), stream, 0, Accelerator(cpu=True))
    accumulated = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None

    ts, noises = [], []
    for m in (0, 1):
        gen = torch.Generator().manual_seed(seed_for(cfg["seed"], m, 0, 1))
        ts.append(sample_timesteps(1, cfg["timestep_sampling"], gen, sigmoid_scale=cfg["sigmoid_scale"],
                                   shift=cfg["discrete_flow_shift"]))
        noises.append(torch.randn(1, 16, 8, 8, generator=gen))
    both = {k: torch.cat([b[k] for b in stream.batches]) for k in stream.batches[0]}
    ref = flow_loss(tr, both["latents"], both["t5_embeds"], both["clip_pooled"], torch.cat(ts), torch.cat(noises))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for g_acc, p in zip(accumulated, trainable):
        torch.testing.assert_close(g_acc, p.grad, rtol=1e-4, atol=1e-7)


def _dtypes(x) -> list:
    """The dtypes of every tensor in a (nested) optimizer state, bitsandbytes' wrapped one included."""
    if isinstance(x, torch.Tensor):
        return [x.dtype]
    if isinstance(x, dict):
        return [d for v in x.values() for d in _dtypes(v)]
    return []


@pytest.mark.slow
def test_adafactor_with_accumulation_and_8bit_adamw_train(tiny_flux_dir, demo_data_dir, tmp_path):
    out = tmp_path / "adafactor"
    assert main(train_argv(tiny_flux_dir, demo_data_dir, out, "--max_train_steps", "2", "--optimizer_type",
                           "adafactor", "--gradient_accumulation_steps", "2", "--train_batch_size", "1")) == 0
    assert len(_log(out)) == 2 and all(torch.isfinite(v).all() for v in load_file(out / "urae_demo.safetensors").values())
    pytest.importorskip("bitsandbytes", reason="adamw8bit needs bitsandbytes")
    out = tmp_path / "adamw8bit"
    # min_8bit_size=0: the tiny adapter's tensors are below bitsandbytes' default size for 8-bit states
    assert main(train_argv(tiny_flux_dir, demo_data_dir, out, "--max_train_steps", "2", "--optimizer_type",
                           "adamw8bit", "--optimizer_args", "min_8bit_size=0", "--save_every_n_steps", "1")) == 0
    state = _opt(out / "state-0000002")["state"]
    assert state and all(_dtypes(s).count(torch.uint8) == 2 for s in state.values())  # both moments in 8 bits
    assert all(torch.isfinite(v).all() for v in load_file(out / "urae_demo.safetensors").values())


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state, fixed by the first run: a bf16 run after fp32 ones in the same
    test process needs it reset (and reset again for the fp32 runs after it)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _preset(name, model, data, out, *extra):
    return ["--config", str(ROOT / f"presets/{name}.toml"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--resolution", "256", "--t5_max_length", "128",
            "--max_train_steps", "2", "--save_every_n_steps", "0", "--sample_every_n_steps", "0", *extra]


@pytest.mark.slow
def test_2k_then_4k_presets_in_bf16_with_memory_auto(tiny_flux_dir, demo_data_dir, tmp_path, monkeypatch, capsys,
                                                    fresh_accelerate):
    """The two recipes as shipped (bf16 autocast, Prodigy, checkpointing, memory = auto, the 4K run stacked on
    the 2K file), only the sizes and step counts overridden, with a pretended 80 GiB GPU for memory = auto."""
    import urae.train_memory

    monkeypatch.setattr(urae.train_memory, "device_memory_bytes", lambda device: 80 * 2**30)
    out2k, out4k = tmp_path / "2k", tmp_path / "4k"
    assert main(_preset("2k", tiny_flux_dir, demo_data_dir, out2k)) == 0
    text = capsys.readouterr().out
    assert "memory: all resident (memory = auto for 80 GiB at 256x256" in text, text
    assert "bf16 on cpu" in text
    assert main(_preset("4k", tiny_flux_dir, demo_data_dir, out4k, "--base_lora",
                        str(out2k / "urae_2k.safetensors"))) == 0
    text = capsys.readouterr().out
    assert "proportional attention on" in text and "bf16 on cpu" in text
    for out, name in ((out2k, "urae_2k"), (out4k, "urae_4k")):
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _log(out).values()) and len(_log(out)) == 2
        lora = load_file(out / f"{name}.safetensors")
        assert lora and all(torch.isfinite(v.float()).all() for v in lora.values())
    # the 4K file holds the 2K change and its own: rank 16 (2K, plain) + 2 x 16 (trained and frozen minor)
    a2, a4 = load_file(out2k / "urae_2k.safetensors"), load_file(out4k / "urae_4k.safetensors")
    k = next(k for k in a4 if k.endswith("lora_A.weight"))
    assert a2[k].shape[0] == 16 and a4[k].shape[0] == 48


def test_memory_auto_for_a_small_pretended_gpu_is_refused_before_loading(tiny_flux_dir, demo_data_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """At 24 GiB memory = auto swaps 5 of FLUX.1's blocks; the tiny model has 4, so the plan refuses it in one
    line before any model loads (it is how the choice reaches the checks, not the numbers, that is tested)."""
    from test_train import _fails_fast

    import urae.train_memory

    monkeypatch.setattr(urae.train_memory, "device_memory_bytes", lambda device: 24 * 2**30)
    _fails_fast(train_argv(tiny_flux_dir, demo_data_dir, tmp_path / "o", "--memory", "auto",
                           "--gradient_checkpointing", "true"), capsys, "blocks_to_swap")
