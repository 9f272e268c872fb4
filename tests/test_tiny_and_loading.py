"""The tiny FLUX.1 folder loads offline through the same code as FLUX.1-dev; bad model input is a clear error."""

import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from urae.flux_keys import bfl_to_diffusers, diffusers_to_bfl
from urae.io import load_safetensors, save_safetensors_atomic
from urae.loading import ModelLoadError, load_pipeline, load_transformer, resolve_model_location
from urae.tiny import LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR, build_transformer


def test_tiny_folder_has_flux_layout_and_loads_offline(tiny_flux_dir):
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        assert (tiny_flux_dir / sub).is_dir(), sub
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.latent_channels == LATENT_CHANNELS
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == VAE_SCALING_FACTOR and pipe.vae.config.shift_factor == VAE_SHIFT_FACTOR
    assert pipe.scheduler.config.shift == 3.0 and pipe.scheduler.config.use_dynamic_shifting
    names = {n for n, _ in pipe.transformer.named_modules()}
    for real in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0",
                 "single_transformer_blocks.1.attn.to_v", "time_text_embed.guidance_embedder.linear_1"):
        assert real in names


@pytest.mark.slow
def test_tiny_pipeline_generates_deterministically(tiny_flux_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    run = lambda: pipe("a red square", height=256, width=384, num_inference_steps=2, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(3)).images
    a, b = run(), run()
    assert a.shape == (1, 256, 384, 3)
    assert (a == b).all() and a.std() > 0


def test_bfl_key_map_is_lossless_and_fuses_qkv():
    t = build_transformer(layers=2, single_layers=3)
    sd = t.state_dict()
    bfl = diffusers_to_bfl(sd)
    assert bfl["double_blocks.1.img_attn.qkv.weight"].shape == (96, 32)
    assert bfl["single_blocks.2.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)
    assert torch.equal(bfl["double_blocks.0.img_attn.qkv.weight"][32:64], sd["transformer_blocks.0.attn.to_k.weight"])
    back = bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_single_file_bfl_checkpoint_loads_exactly(tiny_flux_dir, tiny_bfl_checkpoint):
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    t = load_transformer(str(tiny_flux_dir), str(tiny_bfl_checkpoint), dtype="fp32")
    for (k, a), b in zip(ref.state_dict().items(), t.state_dict().values()):
        assert torch.equal(a, b), k
    pipe = load_pipeline(str(tiny_flux_dir), str(tiny_bfl_checkpoint), dtype="bf16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_hub_id_offline_fails_before_any_download_with_advice(monkeypatch):
    """Decided from the id alone: from_pretrained (which would try the hub) is never reached."""
    from diffusers import FluxPipeline

    def reached(*a, **k):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(FluxPipeline, "from_pretrained", reached)
    with pytest.raises(ModelLoadError, match="local FLUX.1 folder"):
        load_pipeline("black-forest-labs/FLUX.1-dev")


def _missing(p):
    return p / "missing"


def _empty_folder(p):
    (p / "empty").mkdir()
    return p / "empty"


def _sd_folder(p):
    (p / "sd").mkdir()
    (p / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return p / "sd"


def _a_file(p):
    (p / "f.safetensors").write_bytes(b"x")
    return p / "f.safetensors"


@pytest.mark.parametrize("make, match", [
    (_missing, "no such folder"),
    (_empty_folder, "no model_index.json"),
    (_sd_folder, "not a FLUX.1 pipeline"),
    (_a_file, "is a file"),
])
def test_bad_model_locations(tmp_path, make, match):
    with pytest.raises(ModelLoadError, match=match):
        resolve_model_location(str(make(tmp_path)))


def test_bad_single_files(tiny_flux_dir, tiny_bfl_checkpoint, tmp_path):
    # truncated
    data = tiny_bfl_checkpoint.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        load_transformer(str(tiny_flux_dir), str(cut))
    # another architecture
    other = save_safetensors_atomic({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4)},
                                    tmp_path / "unet.safetensors")
    with pytest.raises(ModelLoadError, match="not a FLUX.1 transformer"):
        load_transformer(str(tiny_flux_dir), str(other))
    # FLUX keys of another size (e.g. a schnell/other-width file against this config)
    wide = diffusers_to_bfl(build_transformer(layers=3, single_layers=2).state_dict())
    save_safetensors_atomic(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_transformer(str(tiny_flux_dir), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelLoadError, match="no such file"):
        load_transformer(str(tiny_flux_dir), str(tmp_path / "nope.safetensors"))


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    save_safetensors_atomic({"a": torch.ones(2)}, target)
    shared = torch.zeros(3)
    with pytest.raises(RuntimeError):  # safetensors refuses shared storage mid-write
        save_safetensors_atomic({"a": shared, "b": shared}, target)
    sd, _ = load_safetensors(target)
    assert torch.equal(sd["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_tiny_cli_writes_folder_and_bfl_file(tmp_path):
    from urae.tiny import main

    main([str(tmp_path / "m"), "--layers", "1", "--single-layers", "1", "--bfl-checkpoint",
          str(tmp_path / "m.safetensors")])
    t = load_transformer(str(tmp_path / "m"), str(tmp_path / "m.safetensors"))
    assert t.config.num_layers == 1 and t.config.num_single_layers == 1



def test_tiny_cli_into_an_existing_folder_is_refused_first_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import urae.tiny

    (tmp_path / "m").mkdir()

    def no_build(*a, **k):
        raise AssertionError("built before checking the folder")

    monkeypatch.setattr(urae.tiny, "build_pipeline", no_build)
    assert urae.tiny.main([str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'm'} already exists; choose a new folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no hidden .m.* temp folder


def test_outputs_get_the_default_mode_not_tempfiles_0600(tmp_path):
    """The mode follows the umask in force when the file is written, and reading it leaves it unchanged."""
    import os

    from urae.io import process_umask

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        f = save_safetensors_atomic({"a": torch.ones(1)}, tmp_path / "x.safetensors")
        assert os.stat(f).st_mode & 0o777 == 0o640
        os.umask(0o002)
        g = save_safetensors_atomic({"a": torch.ones(1)}, tmp_path / "y.safetensors")
        assert os.stat(g).st_mode & 0o777 == 0o664
    finally:
        assert os.umask(old) == 0o002
