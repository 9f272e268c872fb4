"""Flow-matching maths agrees with FluxPipeline's own packing and with the sampler's update rule."""

import pytest
import torch
from diffusers import FluxPipeline

from urae.flow import (
    flow_target,
    image_ids,
    noisy_latents,
    pack_latents,
    predict_flow,
    sample_timesteps,
    unpack_latents,
)
from urae.tiny import build_transformer


def test_packing_matches_diffusers():
    x = torch.randn(2, 16, 6, 10)
    ours = pack_latents(x)
    assert torch.equal(ours, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(ours, 6, 10), x)
    assert torch.equal(unpack_latents(ours, 6, 10), FluxPipeline._unpack_latents(ours, 48, 80, 8))
    assert torch.equal(image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


def test_an_euler_step_along_the_target_velocity_recovers_x0():
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = torch.tensor([0.2, 0.5, 0.9])
    xt = noisy_latents(x0, eps, t)
    v = flow_target(x0, eps)
    # the scheduler's Euler step from sigma = t to 0 is x_t + (0 - t) v
    assert torch.allclose(xt - t.view(-1, 1, 1, 1) * v, x0, atol=1e-6)


@pytest.mark.parametrize("method", ["uniform", "logit_normal", "sigmoid", "shift"])
def test_timesteps_in_unit_interval_and_reproducible(method):
    a = sample_timesteps(4096, method, torch.Generator().manual_seed(0))
    b = sample_timesteps(4096, method, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and (a > 0).all() and (a < 1).all()
    if method == "uniform":
        assert abs(a.mean().item() - 0.5) < 0.02 and abs(a.var().item() - 1 / 12) < 0.005
    if method == "shift":
        assert a.mean() > sample_timesteps(4096, "sigmoid", torch.Generator().manual_seed(0)).mean()


def test_unknown_timestep_sampling():
    with pytest.raises(ValueError, match="uniform"):
        sample_timesteps(2, "cosine")


@torch.no_grad()
def test_prediction_matches_the_pipeline_call():
    """predict_flow feeds the transformer exactly as FluxPipeline does (t, ids, guidance x1000 inside)."""
    tr = build_transformer()
    x = torch.randn(1, 16, 4, 6)
    t5, pooled = torch.randn(1, 5, 32), torch.randn(1, 32)
    t = torch.tensor([0.3])
    ours = predict_flow(tr, x, t, t5, pooled, guidance=1.0)
    ref = tr(hidden_states=FluxPipeline._pack_latents(x, 1, 16, 4, 6), timestep=t, guidance=torch.tensor([1.0]),
             pooled_projections=pooled, encoder_hidden_states=t5, txt_ids=torch.zeros(5, 3),
             img_ids=FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32), return_dict=False)[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(ref, 32, 48, 8))
    assert not torch.allclose(ours, predict_flow(tr, x, t, t5, pooled, guidance=3.5))
