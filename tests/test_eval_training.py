"""Validation during training on the tiny model: values in train_log.jsonl (and TensorBoard when installed), the
run's HTML report with a curve per metric, and the validation keys' mistakes refused before anything loads."""

import json
from pathlib import Path

import pytest
from test_train import args, data_dir  # noqa: F401  (the module's dataset fixture)

from urae.eval.cli import main as eval_main
from urae.trainer import main

PROMPTS = "a red circle on a blue square --d 3\nfine text on a sign, 4k --d 5 --w 256 --h 128\n"


@pytest.mark.slow
def test_validation_curve_in_the_log_and_the_report(tiny_flux_dir, data_dir, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "val.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    rc = main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "4", "--sample_steps", "2",
                   "--validation_prompts", str(prompts), "--validation_every_n_steps", "2"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation at step 0: effective_resolution" in text and "validation at step 4" in text
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "validation/effective_resolution" in r}
    assert sorted(val) == [0, 2, 4] and len([r for r in rows if "loss" in r]) == 4
    assert set(val[2]) == {"step", "validation/effective_resolution", "validation/effective_resolution@tiles",
                           "validation/hf_share", "validation/hf_share@tiles"}
    files = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert files == [f"{s:07d}_{k:02d}.png" for s in (0, 2, 4) for k in (0, 1)]
    if (out / "logs").is_dir():  # TensorBoard installed: the same values as scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ev = EventAccumulator(str(next((out / "logs").rglob("events.*")).parent))
        ev.Reload()
        assert [e.step for e in ev.Scalars("validation/effective_resolution")] == [0, 2, 4]

    assert eval_main(["report", str(out)]) == 0
    page = (out / "report" / "report.html").read_text()
    data = json.loads((out / "report" / "scores.json").read_text())
    assert list(data["groups"]) == ["step 0", "step 2", "step 4"]
    curve = data["curves"]["effective_resolution"]
    assert curve == [[s, val[s]["validation/effective_resolution"]] for s in (0, 2, 4)]
    assert page.count('<figure class="curve"') == 4 and "step 4" in page
    assert data["groups"]["step 2"]["scores"]["hf_share"] == val[2]["validation/hf_share"]
    rows_of_report = {r["row"] for r in data["images"]}
    assert rows_of_report == {"a red circle on a blue square · seed 3", "fine text on a sign, 4k · seed 5"}


@pytest.mark.parametrize("extra, message", [
    (["--validation_every_n_steps", "2"], "validation_every_n_steps needs validation_prompts"),
    (["--validation_every_n_steps", "2", "--validation_prompts", "{p}", "--validation_metrics", "fd_dinov2"],
     "compares sets with a reference set"),
    (["--validation_every_n_steps", "2", "--validation_prompts", "{p}", "--validation_metrics", "detial"],
     "did you mean 'detail'"),
    (["--validation_every_n_steps", "2", "--validation_prompts", "{p}", "--validation_metrics", "clip_score"],
     "needs the model openai/clip-vit-large-patch14, which is not in the local cache"),
])
def test_validation_mistakes_are_refused_before_loading(tiny_flux_dir, tmp_path, extra, message, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    prompts = tmp_path / "val.txt"
    prompts.write_text(PROMPTS)
    rc = main(args(tiny_flux_dir, tmp_path / "data", tmp_path / "out", *[e.replace("{p}", str(prompts))
                                                                         for e in extra]))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not Path(tmp_path / "out").exists()
