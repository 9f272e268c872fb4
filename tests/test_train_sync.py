"""The initial adapter: drawn from `seed`, rank 0's on every process; the ranks' agreement checked at every save."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out: Path, seed: int, init: str = "plain"):
    from urae.trainer import parse

    return parse(["--config", str(ROOT / "presets/demo.toml"), "--no-demo", "--train_data_dir", str(out),
                  "--output_dir", str(out), "--sample_every_n_steps", "0", "--seed", str(seed),
                  "--network_args", f"init={init}", "targets=urae"])


def _plan(out: Path):
    """The parts of a RunPlan the model stage and the saver read."""
    return SimpleNamespace(resume_path=None, memory=SimpleNamespace(active=False), out_dir=out, state_bytes=1)


def initial_adapter(tmp_path, seed: int, init: str = "plain") -> dict:
    from accelerate import Accelerator

    from urae.tiny import build_transformer
    from urae.trainer import model_stage

    model = model_stage(_cfg(tmp_path, seed, init), _plan(tmp_path), build_transformer(), Accelerator(cpu=True))
    return {k: v.clone() for k, v in model.network.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_drives_the_initial_adapter(tmp_path):
    """The same seed gives the same adapter whatever ran before (build_transformer reseeds the global generator,
    so seeds 1 and 2 used to give one adapter), another seed another; the global generator is left as it was."""
    one = initial_adapter(tmp_path, 1)
    torch.rand(1000)  # whatever ran before must not matter
    state = torch.get_rng_state()
    again = initial_adapter(tmp_path, 1)
    two = initial_adapter(tmp_path, 2)
    assert _same(one, again)
    downs = [k for k in one if ".lora_down." in k]
    assert downs and all(not torch.equal(one[k], two[k]) for k in downs)
    assert all(one[k].abs().max() > 0 for k in downs)
    assert not torch.equal(torch.get_rng_state(), state)  # build_transformer reseeded it; init_rng did not
    from urae.train_sync import init_rng

    state = torch.get_rng_state()
    with init_rng(5):
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_divergence_is_a_bug_not_a_users_mistake():
    from urae.train_sync import RanksDiverged
    from urae.trainer import _user_errors

    assert not issubclass(RanksDiverged, _user_errors())  # main() lets it through with its traceback


_WORKER = r'''
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, sys.argv[2])
from test_train_sync import _cfg, _plan
from urae.tiny import build_transformer
from urae.train_sync import RanksDiverged
from urae.trainer import Saver, _optimizer, model_stage

out = Path(sys.argv[1])
acc = Accelerator()
rank = acc.process_index
assert acc.num_processes == 2
cfg, plan = _cfg(out, seed=rank), _plan(out)  # rank 1 asks for another seed: rank 0's adapter must win
model = model_stage(cfg, plan, build_transformer(), acc)
save_file({k: v.contiguous() for k, v in model.network.state_dict().items()}, out / f"initial{rank}.safetensors")
optimizer, lr_sched = _optimizer(cfg, model.network)
saver = Saver(cfg, plan, model.network, optimizer, lr_sched, acc)
saver.state(1)
acc.wait_for_everyone()
name, p = [(n, p) for n, p in model.network.named_parameters() if ".lora_up." in n][3]
if rank == 1:
    with torch.no_grad():
        p.view(-1)[5] += 1e-6
try:
    saver.state(2)
    result = "saved"
except RanksDiverged as e:
    result = str(e)
(out / f"result{rank}.txt").write_text(name + "\n" + result)
'''


@pytest.mark.slow
def test_two_processes_start_from_rank_0s_adapter_and_stop_at_a_divergent_save(tmp_path):
    """accelerate launch, 2 processes, gloo: rank 1 asked for another seed and still holds rank 0's adapter (the
    one-process seed-0 adapter, bit for bit); one changed value on rank 1 stops the next save on both ranks, names
    the tensor, and leaves the last good state as it was."""
    out = tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(worker), str(out), str(Path(__file__).parent)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    first, second = (load_file(out / f"initial{k}.safetensors") for k in (0, 1))
    assert _same(first, second)
    single = initial_adapter(tmp_path / "single", 0)
    assert _same(first, single)
    assert not _same(second, initial_adapter(tmp_path / "single", 1))

    results = [(out / f"result{k}.txt").read_text().split("\n", 1) for k in (0, 1)]
    assert results[0] == results[1]
    name, message = results[0]
    assert f" {name}" in message and "at step 2" in message
    assert "state-0000001 is left as it was" in message and "This is a bug" in message
    assert sorted(p.name for p in out.iterdir() if "state" in p.name) == ["state-0000001"]
    assert (out / "state-0000001" / "train_state.json").is_file()
