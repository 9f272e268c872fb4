"""urae.train_plan: readable counts and sizes, and the plan line's rank wording (minor/major files are 2r)."""

from urae.common import human_bytes, human_count
from urae.train_plan import _rank_words


def test_counts_and_sizes_read_well():
    assert [human_count(n) for n in (7, 7168, 18_690_048, 11.9e9)] == ["7", "7.17 K", "18.7 M", "11.9 B"]
    assert [human_bytes(n) for n in (512, 71 * 2**20, 3 * 2**30 // 2)] == ["512 B", "71.0 MiB", "1.5 GiB"]


def test_the_plan_explains_the_exported_rank():
    minor = _rank_words({"network_args": ["init=minor", "targets=urae"], "network_dim": 4})
    assert "rank 4" in minor and "exact rank-8 LoRA: 4 trained + 4 frozen minor components" in minor
    plain = _rank_words({"network_args": ["init=plain", "plain_init=gaussian"], "network_dim": 16})
    assert plain == "plain LoRA rank 16"


def test_batches_are_checked_against_the_buckets_and_processes(tmp_path, caplog):
    import pytest

    from urae.config import ConfigError
    from urae.data import DataOptions
    from urae.data.datasets import scan
    from urae.demo import write_demo_dataset
    from urae.train_plan import _check_batches

    found = scan(DataOptions(train_data_dir=str(write_demo_dataset(tmp_path / "d", n=8)), resolution=256), log=False)
    _check_batches({"train_batch_size": 1}, found, world=8)  # 8 images in 4 buckets of 2: 8 batches
    with pytest.raises(ConfigError, match="4 batch\\(es\\) of 2 per epoch for 8 processes"):
        _check_batches({"train_batch_size": 2}, found, world=8)
    _check_batches({"train_batch_size": 4}, found, world=1)
    assert "largest bucket holds 2 image(s)" in caplog.text


def test_the_plan_prints_every_path_resolved_against_the_current_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from urae.data import DataOptions
    from urae.data.datasets import scan
    from urae.demo import write_demo_dataset
    from urae.train_plan import RunPlan

    write_demo_dataset(tmp_path / "d", n=2)
    (tmp_path / "p.txt").write_text("a prompt\n")
    monkeypatch.chdir(tmp_path)
    found = scan(DataOptions(train_data_dir="d", resolution=256), log=False)
    plan = RunPlan(Path("out"), None, None, found, "owner/model", None, 0)
    cfg = {"transformer": None, "base_lora": "owner/repo/file.safetensors", "sample_prompts": "p.txt",
           "dataset_config": None, "cache_dir": "c", "sample_every_n_steps": 10}
    assert plan.paths(cfg) == (f"paths: data {tmp_path / 'd'}; model owner/model; base_lora owner/repo/file.safetensors; "
                               f"sample_prompts {tmp_path / 'p.txt'}; cache_dir {tmp_path / 'c'}; "
                               f"output {tmp_path / 'out'}")
    cfg["sample_every_n_steps"] = 0  # samples off: the prompts file is not read, so not listed
    assert "sample_prompts" not in plan.paths(cfg)
