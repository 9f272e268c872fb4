"""flux_urae_eval.py score and compare: a folder ranking known in advance, user mistakes, and a compare grid on
the tiny model interrupted with Ctrl-C and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_eval_metrics import pink_image

from urae.eval.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def known_folders(tmp_path_factory):
    """A sharp 1024² pattern and the same pattern downscaled to 256² and upscaled back (prompts in PNG chunks)."""
    from PIL.PngImagePlugin import PngInfo

    root = tmp_path_factory.mktemp("known", numbered=False)
    for sub in ("sharp", "down-up"):
        (root / sub).mkdir()
    for i in range(2):
        im = pink_image(1024, 20 + i)
        meta = PngInfo()
        meta.add_text("prompt", f"pattern {i}")
        meta.add_text("seed", str(i))
        im.save(root / "sharp" / f"p{i}.png", pnginfo=meta)
        im.resize((256, 256), Image.LANCZOS).resize((1024, 1024), Image.LANCZOS).save(root / "down-up" / f"p{i}.png",
                                                                                      pnginfo=meta)
    return root


def test_score_ranks_a_sharp_pattern_above_its_downscaled_upscaled_copy(known_folders, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["score", str(known_folders / "sharp"), str(known_folders / "down-up"), "--metrics", "detail",
               "--tile", "512", "--output_dir", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "scoring 4 image(s) in 2 folder(s) with detail (no weights)" in text
    data = json.loads((out / "scores.json").read_text())
    sharp, soft = data["groups"]["sharp"]["scores"], data["groups"]["down-up"]["scores"]
    assert sharp["effective_resolution"] >= 0.95 * 1024 and sharp["effective_resolution@tiles"] >= 0.95 * 1024
    assert abs(soft["effective_resolution"] - 256) <= 0.2 * 256, soft
    assert sharp["hf_share"] > 100 * soft["hf_share"]
    rows = {(r["group"], r["row"]) for r in data["images"]}
    assert rows == {(g, f"pattern {i} · seed {i}") for g in ("sharp", "down-up") for i in range(2)}  # paired by prompt
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert csv_lines[0].startswith("group,row,file,prompt,seed,effective_resolution") and len(csv_lines) == 5
    page = (out / "report.html").read_text()
    assert "http" not in page.replace("http-equiv", "")  # no CDN, nothing fetched
    assert 'src="../../known/sharp/p0.png"' in page  # relative: the folder can move with its images


@pytest.mark.parametrize("argv, message", [
    ([], "give a mode first"),
    (["score"], "give one or more folders"),
    (["score", "/nonexistent/folder"], "no such folder"),
    (["score", "{known}/sharp", "--metrics", "detial"], "did you mean 'detail'"),
    (["score", "{known}/sharp", "--metrics", "fd_dinov2"], "give --reference FOLDER"),
    (["score", "{known}/sharp", "--metrics", "detail", "--prompts", "{known}/none.txt"], "no such file"),
    (["score", "{known}/sharp", "--metrics", "pickscore"],
     "needs the model yuvalkirstain/PickScore_v1, which is not in the local cache"),
    (["compare", "--model", "{known}", "--prompt", "x", "--variant", "nocolon"], "expected \"NAME: FLAGS\""),
    (["compare", "--model", "{known}", "--prompt", "x", "--variant", "a: --prompt y"], "--prompt is set by compare"),
])
def test_user_mistakes_are_one_line_and_exit_2(known_folders, argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(known_folders / "empty-cache"))
    rc = main([a.replace("{known}", str(known_folders)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def _compare(model, out, *extra):
    return [sys.executable, str(ROOT / "flux_urae_eval.py"), "compare", "--model", str(model), "--prompt", "a red cat",
            "--prompt", "a city at night, 4k", "--seeds", "7", "--variant", "base: ",
            "--variant", "ntk4: --ntk_factor 4 --proportional_attention", "--infer_args",
            "--steps 6 --width 256 --height 192", "--metrics", "detail", "--tile", "128", "--output_dir", str(out),
            *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_compare_on_the_tiny_model_resumes_after_ctrl_c(tiny_flux_dir, tmp_path):
    out = tmp_path / "cmp"
    first = out / "images" / "base" / "images.jsonl"
    proc = subprocess.Popen(_compare(tiny_flux_dir, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not _lines(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "\ninterrupted" in err and "run the same command again to continue" in err and "Traceback" not in err
    made = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert 1 <= len(made) < 4, sorted(made)  # stopped inside the grid, at least one image done

    rc = subprocess.run(_compare(tiny_flux_dir, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert f"{len(made)} already made, {4 - len(made)} to generate" in rc.stdout
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 4 and all(made[p] == p.stat().st_mtime_ns for p in made)  # reused, not made again
    for v in ("base", "ntk4"):
        rows = _lines(out / "images" / v / "images.jsonl")
        assert sorted((r["prompt"], r["seed"]) for r in rows) == [("a city at night, 4k", 7), ("a red cat", 7)]
    changed = _compare(tiny_flux_dir, out)
    changed[changed.index("ntk4: --ntk_factor 4 --proportional_attention")] = "ntk4: --ntk_factor 5"
    rc = subprocess.run(changed, env=ENV, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 2 and "variant ntk4: its images in" in rc.stderr and "made with other flags" in rc.stderr
    ntk = _lines(out / "images" / "ntk4" / "images.jsonl")[0]["runtime"]
    assert ntk["ntk_factor"] == 4 and ntk["proportional_attention"] is True  # the variant's flags reached the CLI
    data = json.loads((out / "scores.json").read_text())
    assert list(data["groups"]) == ["base", "ntk4"] and len(data["images"]) == 4
    assert data["groups"]["ntk4"]["settings"]["flags"] == "--steps 6 --width 256 --height 192 --ntk_factor 4 " \
                                                          "--proportional_attention"
    assert {r["row"] for r in data["images"]} == {"a red cat · seed 7", "a city at night, 4k · seed 7"}


def test_eval_prompt_presets_parse_and_share_their_prompts():
    from urae.prompts import read_prompts
    from urae.runtime import check_resolution

    plain = read_prompts(ROOT / "presets/eval_prompts.txt")
    assert len(plain) >= 10 and all(set(r) == {"prompt"} for r in plain)
    for k, long_side in (("2k", 2048), ("4k", 4096)):
        sized = read_prompts(ROOT / f"presets/eval_prompts_{k}.txt")
        assert [r["prompt"] for r in sized] == [r["prompt"] for r in plain]
        for r in sized:
            check_resolution(r["width"], r["height"])
            assert max(r["width"], r["height"]) == long_side
        assert {r["width"] == r["height"] for r in sized} == {True, False}  # square and not
