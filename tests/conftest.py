"""Shared fixtures: one tiny real-architecture FLUX.1 folder per test session, built offline."""

import os

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
