"""urae.checkpoints: atomic states, the newest complete one found, pruning, refusal to mix runs."""

import json

import pytest
import torch

from networks import minor_lora
from urae.checkpoints import (
    RUN_MARKER,
    TMP_PREFIX,
    check_output_dir,
    clear_run,
    list_states,
    load_adapter_state,
    load_optimizer_state,
    prune_states,
    remove_partial_saves,
    resolve_resume,
    save_state,
    truncate_log,
)
from urae.tiny import build_transformer


@pytest.fixture
def trained():
    torch.manual_seed(0)
    tr = build_transformer().requires_grad_(False)
    net = minor_lora.create_network(1.0, 2, 2.0, None, [], tr, init="plain", targets="urae", verbose="False")
    net.apply_to([], tr, False, True)
    net.prepare_grad_etc(None, tr)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    return tr, net, opt, sched


def test_a_state_round_trips_adapter_optimizer_and_step(trained, tmp_path):
    tr, net, opt, sched = trained
    path = save_state(tmp_path, 7, net, opt, sched, {"seed": 3}, {"k": "v"})
    assert path.name == "state-0000007" and list_states(tmp_path) == [(7, path)]
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))

    tr2 = build_transformer().requires_grad_(False)
    net2 = minor_lora.create_network(1.0, 2, 2.0, None, [], tr2, init="plain", targets="urae", verbose="False")
    net2.apply_to([], tr2, False, True)
    load_adapter_state(path, net2)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k
    params2 = [p for p in net2.parameters() if p.requires_grad]
    opt2 = torch.optim.AdamW(params2, lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    state = load_optimizer_state(path, opt2, sched2)
    assert state == {"step": 7, "seed": 3}
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i]), i
    assert sched2.state_dict() == sched.state_dict() and sched2.last_epoch == 1


def test_incomplete_and_partial_states_are_never_resumed(trained, tmp_path):
    tr, net, opt, sched = trained
    save_state(tmp_path, 2, net, opt, sched, {}, {})
    (tmp_path / "state-0000004").mkdir()  # killed before train_state.json
    (tmp_path / f"{TMP_PREFIX}abc").mkdir()  # killed mid-save
    assert resolve_resume(tmp_path, "auto").name == "state-0000002"
    with pytest.raises(FileNotFoundError, match="not a complete training state"):
        resolve_resume(tmp_path, str(tmp_path / "state-0000004"))
    remove_partial_saves(tmp_path)
    assert not (tmp_path / f"{TMP_PREFIX}abc").exists()
    assert resolve_resume(tmp_path / "none", "auto") is None and resolve_resume(tmp_path, None) is None


def test_pruning_keeps_the_last_n_steps_and_the_newest(trained, tmp_path):
    tr, net, opt, sched = trained
    for s in (2, 4, 6, 8):
        save_state(tmp_path, s, net, opt, sched, {}, {})
    prune_states(tmp_path, 8, 4)
    assert [s for s, _ in list_states(tmp_path)] == [4, 6, 8]
    prune_states(tmp_path, 8, None)
    assert [s for s, _ in list_states(tmp_path)] == [4, 6, 8]


def test_runs_are_not_mixed_and_overwrite_clears_the_old_one(trained, tmp_path):
    tr, net, opt, sched = trained
    save_state(tmp_path, 2, net, opt, sched, {}, {})
    (tmp_path / RUN_MARKER).write_text("")
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(FileExistsError, match="--resume auto"):
        check_output_dir(tmp_path, resuming=False, overwrite=False, output_name="x")
    check_output_dir(tmp_path, resuming=True, overwrite=False, output_name="x")
    truncate_log(tmp_path / "train_log.jsonl", 2)
    assert (tmp_path / "train_log.jsonl").read_text() == json.dumps({"step": 1}) + "\n"
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "0000002_00.png").write_bytes(b"old run")
    (tmp_path / "mine.txt").write_text("a file of the user's")
    clear_run(tmp_path, "x")
    assert list_states(tmp_path) == [] and not (tmp_path / RUN_MARKER).exists()
    assert not (tmp_path / "samples").exists() and (tmp_path / "mine.txt").is_file()
    check_output_dir(tmp_path, resuming=False, overwrite=False, output_name="x")
