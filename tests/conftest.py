"""Shared fixtures: one tiny real-architecture FLUX.1 folder per test session, built offline."""

import os
from pathlib import Path

import pytest

# forced, not defaulted: a user with HF_HUB_OFFLINE=0 in their shell must not run the offline tests online
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A FLUX.1-dev-layout diffusers folder (2 double + 2 single blocks, inner dim 32)."""
    from urae.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux-dev")


@pytest.fixture(scope="session")
def tiny_schnell_dir(tmp_path_factory):
    from urae.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", schnell=True)


@pytest.fixture(scope="session")
def tiny_bfl_checkpoint(tiny_flux_dir, tmp_path_factory):
    """The tiny transformer as a single-file BFL checkpoint (the flux1-dev.safetensors layout)."""
    from diffusers import FluxTransformer2DModel

    from urae.tiny import write_bfl_checkpoint

    t = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    return write_bfl_checkpoint(t, tmp_path_factory.mktemp("ckpt") / "tiny-flux1-dev.safetensors")


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """Eight procedural images with captions (the demo's data), shared by the training tests."""
    from urae.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n=8)


ROOT = Path(__file__).resolve().parents[1]


def train_argv(model, data, out, *extra) -> list[str]:
    """flux_urae_train.py's arguments for the demo preset on the tiny model, no samples or states unless asked."""
    return ["--config", str(ROOT / "presets/demo.toml"), "--no-demo", "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--sample_every_n_steps", "0",
            "--save_every_n_steps", "0", *extra]


@pytest.fixture(scope="session")
def finished_run(tiny_flux_dir, demo_data_dir, tmp_path_factory):
    """One finished training run for the tests that only read its outputs: AdamW on a cosine schedule with
    adapter dropout, states at steps 2 and 4, samples before the first step, TensorBoard asked for.
    Returns (output folder, the arguments it ran with, what it printed)."""
    import contextlib
    import io

    from urae.trainer import main

    out = tmp_path_factory.mktemp("run") / "out"
    argv = train_argv(tiny_flux_dir, demo_data_dir, out, "--max_train_steps", "4", "--save_every_n_steps", "2",
                      "--optimizer_type", "adamw", "--lr_scheduler", "cosine", "--learning_rate", "1e-2",
                      "--network_args", "init=minor", "targets=urae", "dropout=0.1", "--log_with", "tensorboard",
                      "--sample_at_first", "--sample_steps", "2")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, argv, printed.getvalue()


def memory_trainee(layers: int, single: int):
    """A tiny checkpointed transformer with a minor adapter moved off its init (so gradients are not trivial):
    what the memory tests run on CPU and on CUDA."""
    import torch

    import networks.minor_lora as ml
    from urae.tiny import build_transformer

    transformer = build_transformer(layers, single, seed=0).requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    network = ml.create_network(1.0, 4, 4, None, [], transformer, init="minor", verbose="False")
    network.apply_to([], transformer, apply_text_encoder=False, apply_unet=True)
    network.prepare_grad_etc(None, transformer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return transformer, network


def random_minor_lora(model_dir, path, seed: int, **network_args):
    """A minor-init adapter on the tiny pipeline with random updates (so it changes images), saved by the
    network module in the form flux_urae_infer.py reads."""
    import torch
    from diffusers import FluxPipeline

    from networks import minor_lora

    pipe = FluxPipeline.from_pretrained(model_dir)
    net = minor_lora.create_network(1.0, 4, 4.0, None, [], pipe.transformer, init="minor", targets="urae",
                                    verbose="False", **network_args)
    net.apply_to([], pipe.transformer, False, True)
    net.prepare_grad_etc(None, pipe.transformer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    net.save_weights(str(path), None, {})
    return path
