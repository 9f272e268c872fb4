"""Transformer files stored in float8 (flux1-dev-fp8.safetensors): found from the header, refused for the minor/major
SVD in the plan unless the SVD gets full-precision weights or the user accepts the rounding; plain init trains and
generation works on them."""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _fails_fast, args

from urae.demo import write_demo_dataset
from urae.quantised import quantised_weights, rounding_against_minor
from urae.train_plan import make_plan
from urae.trainer import main, parse


@pytest.fixture(scope="module")
def fp8_file(tiny_flux_dir, tmp_path_factory):
    """The tiny transformer as a BFL single file with its Linear weights in float8_e4m3fn."""
    from diffusers import FluxTransformer2DModel

    from urae.tiny import write_bfl_checkpoint

    t = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    return write_bfl_checkpoint(t, tmp_path_factory.mktemp("fp8") / "tiny-flux1-dev-fp8.safetensors", fp8=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n=8)


def test_the_header_tells_and_the_file_loads_upcast_as_generation_uses_it(tiny_flux_dir, fp8_file,
                                                                          tiny_bfl_checkpoint, caplog):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from urae.loading import load_pipeline

    found = quantised_weights(fp8_file)
    assert set(found) == {"float8_e4m3fn"} and found["float8_e4m3fn"] > 20
    assert not quantised_weights(tiny_bfl_checkpoint) and not quantised_weights(Path(tiny_flux_dir) / "transformer")
    with caplog.at_level(logging.INFO, logger="urae"):
        pipe = load_pipeline(str(tiny_flux_dir), str(fp8_file), dtype="fp32")
    assert f"{fp8_file.name} stores {found['float8_e4m3fn']} weights as float8_e4m3fn; upcast to float32" in caplog.text
    full = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    got, want = pipe.transformer.transformer_blocks[0].attn.to_q.weight, full.transformer_blocks[0].attn.to_q.weight
    assert got.dtype == torch.float32 and torch.equal(got, want.to(torch.float8_e4m3fn).float())
    assert not torch.equal(got, want)
    image = FluxPipeline.__call__(pipe, "a red circle", width=64, height=64, num_inference_steps=2,
                                  generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0


def test_minor_and_major_init_on_an_fp8_file_are_refused_in_the_plan(tiny_flux_dir, fp8_file, data_dir, tmp_path,
                                                                     capsys):
    out, n = tmp_path / "o", quantised_weights(fp8_file)["float8_e4m3fn"]
    for init in ("minor", "major"):
        _fails_fast(args(tiny_flux_dir, data_dir, out, "--transformer", str(fp8_file), "--network_args",
                         f"init={init}"), capsys,
                    f"stores {n} weights as float8_e4m3fn, and init={init} would take its singular components from "
                    f"the rounded weights")
    capsys.readouterr()
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--transformer", str(fp8_file)), capsys,
                f"svd_weights={Path(tiny_flux_dir) / 'transformer'}")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--transformer", str(fp8_file), "--network_args", "init=minor",
                     f"svd_weights={fp8_file}"), capsys, "too; the SVD needs the full-precision")
    _fails_fast(args(tiny_flux_dir, data_dir, out, "--transformer", str(fp8_file), "--network_args", "init=minor",
                     f"svd_weights={tmp_path / 'missing.safetensors'}"), capsys, "no such file")


def test_opting_in_says_how_large_the_rounding_is(tiny_flux_dir, fp8_file, data_dir, tmp_path, caplog):
    """The rounding estimate is the spectral norm of the real rounding error within a factor 2 (checked against the
    full-precision weights the tiny file was made from)."""
    from diffusers import FluxTransformer2DModel

    def plan(*extra):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="urae"):
            make_plan(parse(args(tiny_flux_dir, data_dir, tmp_path / "o", "--transformer", str(fp8_file), *extra)))
        return caplog.text

    text = plan("--allow_quantised_svd", "true")
    n = quantised_weights(fp8_file)["float8_e4m3fn"]
    assert f"WARNING: allow_quantised_svd: init=minor on {fp8_file.name}, which stores {n} weights" in text
    assert "x the largest of the 4 smallest singular values" in text
    assert plan("--network_args", "init=plain") == ""
    assert plan("--network_args", "init=minor", f"svd_weights={Path(tiny_flux_dir) / 'transformer'}") == ""

    layer, rounding, sigma = rounding_against_minor(fp8_file, 4)
    assert layer == "double_blocks.0.img_attn.qkv.weight"
    w = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").transformer_blocks[0].attn.to_q
    w = w.weight.detach().double()
    error = torch.linalg.matrix_norm(w - w.to(torch.float8_e4m3fn).double(), ord=2).item()
    assert 0.5 < rounding / error < 2, (rounding, error)
    assert sigma > 0 and f"{rounding / sigma:.1f}x" in text


def test_plain_init_trains_on_an_fp8_file_and_minor_with_full_precision_svd_weights(tiny_flux_dir, fp8_file,
                                                                                   data_dir, tmp_path):
    """init=minor with svd_weights takes W's minor components from the full-precision folder: its frozen factors
    equal those of a run on the folder itself."""
    files = {}
    for name, extra in (("plain", ["--transformer", str(fp8_file), "--network_args", "init=plain"]),
                        ("minor-svd", ["--transformer", str(fp8_file), "--network_args", "init=minor",
                                       f"svd_weights={Path(tiny_flux_dir) / 'transformer'}"]),
                        ("minor-full", ["--network_args", "init=minor"])):
        out = tmp_path / name
        assert main(args(tiny_flux_dir, data_dir, out, "--max_train_steps", "1", *extra)) == 0
        files[name] = load_file(out / "urae_demo.safetensors")
    a, b = files["minor-svd"], files["minor-full"]
    # the file holds [up | -up0] and [down ; down0]: the frozen halves (rows r.. of down) come from the SVD alone
    downs = [k for k in a if k.endswith("lora_A.weight")]
    assert downs and all(torch.allclose(a[k][4:], b[k][4:], rtol=0, atol=1e-6) for k in downs)
