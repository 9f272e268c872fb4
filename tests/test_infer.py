"""flux_urae_infer.py on the tiny pipeline: equals diffusers with the same LoRA, settings, bad input."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import random_minor_lora
from diffusers import FluxPipeline
from PIL import Image

from networks import minor_lora
from urae.inference import main
from urae.outputs import read_png_info
from urae.runtime import HighResSettings, apply_highres

RUNTIME = {"ntk_factor": 7.0, "proportional_attention": True}


@pytest.fixture(scope="module")
def trained_lora(tiny_flux_dir, tmp_path_factory):
    """A minor-init adapter with random updates, saved by the network module (PEFT form, runtime metadata)."""
    return random_minor_lora(tiny_flux_dir, tmp_path_factory.mktemp("lora") / "urae_tiny.safetensors", 0,
                             runtime=json.dumps(RUNTIME))


def run(tmp_path, model, *extra):
    out = tmp_path / "imgs"
    rc = main(["--model", str(model), "--output_dir", str(out), "--steps", "3", *extra])
    return rc, out


def test_output_equals_diffusers_with_the_same_lora_and_settings(tiny_flux_dir, trained_lora, tmp_path):
    rc, out = run(tmp_path, tiny_flux_dir, "--lora", str(trained_lora), "--prompt", "a red circle",
                  "--width", "384", "--height", "256", "--seed", "5")
    assert rc == 0
    ours = np.asarray(Image.open(out / "00000_5_384x256.png"), dtype=np.int16)
    assert ours.shape == (256, 384, 3)

    ref = FluxPipeline.from_pretrained(tiny_flux_dir)
    ref.load_lora_weights(str(trained_lora))  # diffusers' own loader (PEFT form)
    with apply_highres(ref, HighResSettings(**RUNTIME)):
        theirs = ref("a red circle", width=384, height=256, num_inference_steps=3, guidance_scale=3.5,
                     generator=torch.Generator().manual_seed(5), output_type="pil").images[0]
    diff = np.abs(ours - np.asarray(theirs, dtype=np.int16))
    assert diff.max() <= 2, f"max pixel difference {diff.max()} (of 255)"
    without = FluxPipeline.from_pretrained(tiny_flux_dir)
    with apply_highres(without, HighResSettings(**RUNTIME)):
        plain = without("a red circle", width=384, height=256, num_inference_steps=3,
                        generator=torch.Generator().manual_seed(5), output_type="pil").images[0]
    assert np.abs(ours - np.asarray(plain, dtype=np.int16)).max() > 10, "the LoRA must change the image"


def test_runtime_comes_from_metadata_and_is_overridable(tiny_flux_dir, trained_lora, tmp_path):
    rc, out = run(tmp_path, tiny_flux_dir, "--lora", str(trained_lora), "--prompt", "x", "--width", "256",
                  "--height", "256")
    assert rc == 0
    info = read_png_info(out / "00000_0_256x256.png")
    rt = json.loads(info["runtime"])
    assert rt["ntk_factor"] == 7.0 and rt["proportional_attention"] is True
    rc, out2 = run(tmp_path / "b", tiny_flux_dir, "--lora", str(trained_lora), "--prompt", "x", "--width", "256",
                   "--height", "256", "--ntk_factor", "2", "--no-proportional_attention", "--shift", "1.5")
    rec = json.loads((out2 / "images.jsonl").read_text().splitlines()[0])
    assert rec["runtime"]["ntk_factor"] == 2.0 and rec["runtime"]["proportional_attention"] is False
    assert rec["runtime"]["shift"] == 1.5
    assert rec["loras"] == [{"file": str(trained_lora), "scale": 1.0}]


def test_size_defaults_without_metadata(tiny_flux_dir, tmp_path):
    rc, out = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "2048", "--height", "64", "--steps", "1")
    assert rc == 0
    rec = json.loads((out / "images.jsonl").read_text())
    assert rec["runtime"]["ntk_factor"] == 10.0 and rec["runtime"]["proportional_attention"] is True


def test_loaded_line_names_the_model_and_dtype_actually_loaded(tiny_flux_dir, tmp_path, capsys):
    rc, _ = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1",
                "--dtype", "fp16", "--device", "cpu")
    out = capsys.readouterr().out
    assert rc == 0 and f"loaded: transformer of {tiny_flux_dir}, " in out and "parameters in float16" in out, out
    assert "memory (expected for FLUX.1-dev" not in out  # GPU figures only for a GPU run


def test_schnell_runs_and_ignores_guidance(tiny_schnell_dir, tmp_path):
    rc, out = run(tmp_path, tiny_schnell_dir, "--prompt", "x", "--width", "128", "--height", "128",
                  "--guidance", "5")
    assert rc == 0
    rc, out0 = run(tmp_path / "b", tiny_schnell_dir, "--prompt", "x", "--width", "128", "--height", "128",
                   "--guidance", "0")
    a, b = (np.asarray(Image.open(o / "00000_0_128x128.png")) for o in (out, out0))
    assert (a == b).all()


def test_two_stage_and_init_image_make_the_target_size(tiny_flux_dir, tmp_path):
    rc, out = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "512", "--height", "256",
                  "--init_resolution", "256", "--strength", "0.5", "--steps", "4")
    assert rc == 0
    assert Image.open(out / "00000_0_512x256.png").size == (512, 256)
    rec = json.loads((out / "images.jsonl").read_text())
    assert rec["init_resolution"] == 256 and rec["strength"] == 0.5
    init = tmp_path / "init.png"
    Image.new("RGB", (100, 60), (200, 30, 30)).save(init)
    rc, out2 = run(tmp_path / "c", tiny_flux_dir, "--prompt", "x", "--width", "192", "--height", "128",
                   "--init_image", str(init))
    assert rc == 0 and Image.open(out2 / "00000_0_192x128.png").size == (192, 128)


def test_existing_images_are_never_overwritten_and_names_keep_counting(tiny_flux_dir, tmp_path):
    """Names are index_seed_WxH; a second run into the folder continues the index instead of renaming."""
    for _ in range(2):
        assert run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1")[0] == 0
    names = sorted(p.name for p in (tmp_path / "imgs").glob("*.png"))
    assert names == ["00000_0_64x64.png", "00001_0_64x64.png"]
    assert len((tmp_path / "imgs" / "images.jsonl").read_text().splitlines()) == 2


def _corrupt(path):
    data = path.read_bytes()
    return data[: len(data) // 3]


def _one_error_line(err: str, want: str, lines_after: int = 0) -> str:
    """A user's mistake is exactly one non-empty stderr line, `error: ...`, with no traceback (as the trainer's
    and the LoRA tools' tests require). Progress bars of a model that loaded before the mistake could be seen
    may precede it; `lines_after` allows a command to copy on the lines that follow (the conversion hint)."""
    lines = [x for x in err.splitlines() if x.strip() and "%|" not in x]
    assert len(lines) == 1 + lines_after and lines[0].startswith("error: ") and want in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "corrupt", "other_arch", "size", "empty_prompts", "no_prompt",
                                  "two_inits", "official_4k", "no_images", "bad_line", "bad_shift", "strength",
                                  "strength_0"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tiny_flux_dir, trained_lora, tmp_path, capsys):
    extra = ["--prompt", "x", "--width", "64", "--height", "64"]
    if case == "missing":
        extra += ["--lora", str(tmp_path / "nope.safetensors")]
        want = "no such file"
    elif case == "corrupt":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(_corrupt(trained_lora))
        extra += ["--lora", str(bad)]
        want = "truncated or corrupt"
    elif case == "other_arch":
        from safetensors.torch import save_file

        other = tmp_path / "wide.safetensors"
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(other))
        extra += ["--lora", str(other)]
        want = "cannot apply LoRA"
    elif case == "size":
        extra = ["--prompt", "x", "--width", "1000", "--height", "64"]
        want = "multiple of 16"
    elif case == "empty_prompts":
        f = tmp_path / "p.txt"
        f.write_text("\n# nothing\n")
        extra = ["--prompts_file", str(f)]
        want = "no prompts"
    elif case == "official_4k":
        from safetensors.torch import save_file

        official = tmp_path / "urae_4k_adapter.safetensors"
        save_file({"transformer_blocks.0.attn.processor.to_q_a.weight": torch.zeros(4, 32),
                   "transformer_blocks.0.attn.processor.to_q_b.weight": torch.zeros(32, 4)}, str(official))
        extra += ["--lora", str(official)]
        want = "official URAE 4K attention-processor format"  # then the conversion command on its own lines
    elif case == "two_inits":
        init = tmp_path / "init.png"
        Image.new("RGB", (64, 64)).save(init)
        extra += ["--init_image", str(init), "--init_resolution", "256"]
        want = "not both"
    elif case == "no_images":
        extra += ["--num_images", "0"]
        want = "--num_images must be >= 1"
    elif case == "bad_line":
        f = tmp_path / "p.txt"
        f.write_text("x --w 64 --h 64\ny --l 0.5\n")
        extra = ["--prompts_file", str(f)]
        want = "p.txt:2: CFG scale (--l) = 0.5 must be >= 1"
    elif case == "bad_shift":
        extra += ["--shift", "-1"]
        want = "shift must be positive"
    elif case in ("strength", "strength_0"):
        extra = ["--prompt", "x", "--width", "256", "--height", "256", "--init_resolution", "128", "--strength",
                 "1.5" if case == "strength" else "0"]
        want = "--strength must be in (0, 1]"
    else:
        extra = []
        want = "no prompts"
    if case in ("no_images", "bad_line", "bad_shift", "size", "empty_prompts", "two_inits", "strength", "strength_0"):
        tiny_flux_dir = tmp_path / "no-model-here"  # found before any model is looked at
    rc, out = run(tmp_path, tiny_flux_dir, *extra)
    assert rc == 2
    _one_error_line(capsys.readouterr().err, want, lines_after=2 if case == "official_4k" else 0)
    assert not list(out.glob("*.png")) if out.exists() else True


@torch.no_grad()
@pytest.mark.parametrize("h,w", [(48, 40), (36, 64), (64, 36), (16, 40)])  # 5:6, 16:9, 9:16, 5:2 latents
def test_split_vae_decode_equals_whole_decode(tiny_flux_dir, h, w):
    """The row-chunked decode (used above 2048²) is exact, unlike per-tile decoding, at any aspect ratio."""
    from urae.vae_decode import decode

    vae = FluxPipeline.from_pretrained(tiny_flux_dir).vae
    z = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(z).sample
    split = decode(vae, z, split=True, chunk_pixels=w * 8 * 7, threshold=64 * 64)  # 7-row chunks
    assert split.shape == whole.shape == (1, 3, h * 8, w * 8)
    assert (split - whole).abs().max() < 1e-4 * whole.abs().max()


def test_forced_split_decode_gives_the_same_image(tiny_flux_dir, tmp_path):
    a = run(tmp_path / "a", tiny_flux_dir, "--prompt", "x", "--width", "128", "--height", "96")[1]
    b = run(tmp_path / "b", tiny_flux_dir, "--prompt", "x", "--width", "128", "--height", "96", "--vae_tiling")[1]
    ia, ib = (np.asarray(Image.open(o / "00000_0_128x96.png"), dtype=np.int16) for o in (a, b))
    assert np.abs(ia - ib).max() <= 1


def test_prompt_line_flags_reach_the_pipeline_as_in_sd_scripts(tiny_flux_dir, tmp_path, capsys):
    """--g is the embedded guidance, --l true CFG with --n as negative prompt; a line's size wins, the plan
    says so, and the shift recorded is the one used (the scheduler config's 3.0), not null."""
    f = tmp_path / "p.txt"
    f.write_text("a red circle --w 128 --h 96 --d 3 --g 2.5 --l 3 --n blurry\n")
    rc, out = run(tmp_path, tiny_flux_dir, "--prompts_file", str(f), "--width", "64", "--height", "64")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "size 128x96: 1 image(s), from the prompts file's --w/--h" in printed
    assert "true CFG at scale 3.0" in printed
    ours = np.asarray(Image.open(out / "00000_3_128x96.png"), dtype=np.int16)
    assert ours.shape == (96, 128, 3)
    rec = json.loads((out / "images.jsonl").read_text())
    assert (rec["guidance"], rec["cfg_scale"], rec["negative_prompt"]) == (2.5, 3.0, "blurry")
    assert rec["runtime"]["shift"] == 3.0
    assert json.loads(read_png_info(out / "00000_3_128x96.png")["runtime"])["shift"] == 3.0

    ref = FluxPipeline.from_pretrained(tiny_flux_dir)
    with apply_highres(ref, HighResSettings()):
        kw = dict(width=128, height=96, num_inference_steps=3, guidance_scale=2.5, output_type="pil")
        theirs = ref("a red circle", true_cfg_scale=3.0, negative_prompt="blurry",
                     generator=torch.Generator().manual_seed(3), **kw).images[0]
        no_cfg = ref("a red circle", generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 2
    assert np.abs(ours - np.asarray(no_cfg, dtype=np.int16)).max() > 10, "CFG must change the image"


def test_two_stage_draft_not_smaller_than_the_target_is_refused_before_loading(tiny_flux_dir, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("x --w 256 --h 256\n")
    rc, out = run(tmp_path, tiny_flux_dir, "--prompts_file", str(f), "--width", "512", "--height", "512",
                  "--init_resolution", "256")
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "256x256 draft, not smaller than the 256x256 target of prompt 1 (its --w/--h)")
    assert not out.exists(), "refused before anything was written"


def test_hub_lora_offline_is_one_error_line(tiny_flux_dir, tmp_path, capsys):
    rc, _ = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--lora", "nobody-urae-test/none/urae_4k.safetensors")
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "nobody-urae-test/none/urae_4k.safetensors: no such local file")
    assert "offline" in line


def test_an_internal_error_keeps_its_traceback(tiny_flux_dir, tmp_path, monkeypatch):
    import urae.inference as inference

    def bug(cfg):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(inference, "build_requests", bug)
    with pytest.raises(ValueError, match="a bug"):
        run(tmp_path, tiny_flux_dir, "--prompt", "x")


def test_lora_names_local_paths_pass_through_and_hub_files_come_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    from urae.adapters import resolve_lora_file

    local = tmp_path / "owner" / "repo" / "a.safetensors"  # a local file shaped like a hub name wins
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resolve_lora_file("owner/repo/a.safetensors") == "owner/repo/a.safetensors"
    assert resolve_lora_file("./missing/x/y.safetensors") == "missing/x/y.safetensors"  # never looked up
    assert resolve_lora_file("plain.safetensors") == "plain.safetensors"

    cache = tmp_path / "hub"  # a file downloaded earlier, in huggingface_hub's cache layout
    snap = cache / "models--someone--urae" / "snapshots" / ("0" * 40)
    (snap / "sub").mkdir(parents=True)
    (snap / "sub" / "urae_2k.safetensors").write_bytes(b"weights")
    (cache / "models--someone--urae" / "refs").mkdir()
    (cache / "models--someone--urae" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    got = resolve_lora_file("someone/urae/sub/urae_2k.safetensors")
    assert open(got, "rb").read() == b"weights"

    from urae.adapters import AdapterError, check_adapter_file

    with pytest.raises(AdapterError, match="not in the cache"):  # the training command's early base_lora check
        check_adapter_file("someone/urae/sub/other.safetensors")


def test_fp8_storage_generates_as_fp8_rounded_weights_do(tiny_flux_dir, trained_lora, tmp_path, capsys):
    """--fp8 stores the blocks' Linear weights as float8 and upcasts them per layer: the image equals the one
    from a model whose weights were rounded to float8 beforehand (the LoRA's change stays full precision), and
    differs from the full-precision one."""
    import shutil

    from diffusers import FluxTransformer2DModel

    rounded = tmp_path / "rounded"
    shutil.copytree(tiny_flux_dir, rounded)
    t = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    n_block_linears = sum(isinstance(m, torch.nn.Linear) for b in [*t.transformer_blocks, *t.single_transformer_blocks]
                          for m in b.modules())
    with torch.no_grad():
        for block in [*t.transformer_blocks, *t.single_transformer_blocks]:
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    for p in m.parameters():
                        p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
    t.save_pretrained(rounded / "transformer")
    common = ("--lora", str(trained_lora), "--prompt", "a red circle", "--width", "256", "--height", "256")
    images = {}
    for name, model, extra in (("fp8", tiny_flux_dir, ["--fp8"]), ("rounded", rounded, []),
                               ("full", tiny_flux_dir, [])):
        rc, out = run(tmp_path / name, model, *common, *extra)
        assert rc == 0
        images[name] = np.asarray(Image.open(out / "00000_0_256x256.png"), dtype=np.int16)
        printed = capsys.readouterr().out
        if name == "fp8":  # what it did to this model on this device, not FLUX.1-dev's GPU figures
            assert "memory (expected for FLUX.1-dev" not in printed and "11.1 GiB" not in printed
            m = re.search(r"--fp8 stored (\d+) block Linear weights as float8 e4m3 on cpu .*: "
                          r"([\d.]+) KiB -> ([\d.]+) KiB \(upcast to float32 per layer\)", printed)
            assert m and int(m.group(1)) == n_block_linears and float(m.group(3)) < float(m.group(2)), printed
    to_rounded, to_full = np.abs(images["fp8"] - images["rounded"]), np.abs(images["fp8"] - images["full"])
    assert to_rounded.max() <= 1
    assert to_full.sum() > 10 * to_rounded.sum() + 1000, (to_full.sum(), to_rounded.sum())  # fp8 really applied


def test_rope_scheme_from_the_flag_or_the_adapter_reaches_png_jsonl_and_plan(tiny_flux_dir, tmp_path, capsys):
    """--rope dype-yarn at a 16:9 size past the base grid (base 256 px here, as 4096 x 2304 is past 1024): the
    plan says the scheme and where it came from, PNG text and images.jsonl record it; an adapter trained under
    a scheme makes it the default, and --rope still wins."""
    rc, out = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "1024", "--height", "576", "--steps", "1",
                  "--rope", "dype-yarn", "--rope_base_resolution", "256")
    assert rc == 0
    text = capsys.readouterr().out
    assert "position scheme: dype-yarn (base 256, lambda 2) (from --rope)" in text
    rec = json.loads((out / "images.jsonl").read_text())
    assert rec["runtime"]["rope"] == "dype-yarn" and rec["runtime"]["rope_base_resolution"] == 256
    assert json.loads(read_png_info(out / rec["file"])["runtime"])["rope"] == "dype-yarn"

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    trained = {"rope": "dype-ntk", "rope_base_resolution": 512, "dype_lambda": 1.5, "proportional_attention": True}
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], pipe.transformer, init="minor", targets="urae",
                                    verbose="False", runtime=json.dumps(trained))
    net.apply_to([], pipe.transformer, False, True)
    lora = tmp_path / "dype.safetensors"
    net.save_weights(str(lora), None, {})
    rc, out = run(tmp_path / "b", tiny_flux_dir, "--lora", str(lora), "--prompt", "x", "--width", "1024",
                  "--height", "576", "--steps", "1")
    assert rc == 0 and "position scheme: dype-ntk (base 512, lambda 1.5) (from the adapter's metadata)" in \
        capsys.readouterr().out
    rt = json.loads((out / "images.jsonl").read_text())["runtime"]
    assert {k: rt[k] for k in trained} == trained
    rc, out = run(tmp_path / "c", tiny_flux_dir, "--lora", str(lora), "--prompt", "x", "--width", "1024",
                  "--height", "576", "--steps", "1", "--rope", "none")
    assert rc == 0 and json.loads((out / "images.jsonl").read_text())["runtime"]["rope"] == "none"


def test_sizes_off_the_16_grid_are_refused_with_the_nearest(tiny_flux_dir, tmp_path, capsys):
    rc, _ = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "4100", "--height", "2304", "--rope", "yarn")
    assert rc == 2
    assert "the nearest valid width is 4096" in capsys.readouterr().err
    # diffusers' context parallelism splits the positions, from which yarn/dype take their scales
    rc, _ = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--width", "256", "--height", "256", "--rope", "dype-yarn",
                "--context_parallel", "2")
    assert rc == 2 and "--context_parallel with rope = dype-yarn" in capsys.readouterr().err


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_finished_images(tiny_flux_dir, tmp_path, capsys, monkeypatch):
    import os
    import re
    import signal

    import urae.sampling

    real, calls = urae.sampling.generate, []

    def ctrl_c_during_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the second image
        return real(*a, **k)

    monkeypatch.setattr(urae.sampling, "generate", ctrl_c_during_the_second)
    rc, out = run(tmp_path, tiny_flux_dir, "--prompt", "x", "--num_images", "3", "--width", "64", "--height", "64")
    err = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if x.strip() and "%|" not in x]
    assert rc == 130
    assert err == [f"interrupted after 1 of 3 image(s); the 1 finished are kept in {out}"], err
    assert len(list(out.glob("*.png"))) == 1 and len((out / "images.jsonl").read_text().splitlines()) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored for whoever runs next
    import urae.inference

    calls[:] = [1, 1]  # past the simulated Ctrl-C; run() alone (as the eval tool calls it): finished, then the handler is put back
    urae.inference.run(urae.inference.parse(["--model", str(tiny_flux_dir), "--output_dir", str(tmp_path / "b"),
                                             "--steps", "1", "--prompt", "x", "--width", "64", "--height", "64"]))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_gpu_memory_line_uses_the_run_dtype_and_fp8():
    """The plan's GPU line (FLUX.1-dev figures, from urae.memory.generation's docstring) names the dtype used."""
    from types import SimpleNamespace

    from urae.inference import memory_plan

    req = [SimpleNamespace(width=4096, height=4096)]
    bf16 = memory_plan({"fp8": False}, req, torch.bfloat16)
    assert "bfloat16 transformer 22.2 GiB" in bf16 and "peak while denoising 28.7 GiB" in bf16, bf16
    fp8 = memory_plan({"fp8": True}, req, torch.float16)
    assert "float16 transformer, blocks stored as fp8 11.1 GiB" in fp8 and "17.6 GiB" in fp8, fp8
    fp32 = memory_plan({"fp8": False}, req, torch.float32)
    assert "float32 transformer 44.3 GiB" in fp32, fp32
