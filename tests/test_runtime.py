"""The high-resolution runtime: NTK RoPE, proportional attention, static shift — exact when off, exact when on."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from urae.runtime import (
    DEFAULT_BASE_SEQ_LEN,
    HighResSettings,
    apply_highres,
    attention_scale,
    check_resolution,
    image_seq_len,
    rope_frequencies,
)
from urae.tiny import build_transformer


def _inputs(model, width=128, height=96, text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = height // 16, width // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    cfg = model.config
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([1.0]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def model():
    return build_transformer(layers=2, single_layers=2, seed=1)


@torch.no_grad()
def test_off_is_bit_identical_to_stock(model):
    x = _inputs(model)
    stock = model(**x)[0]
    with apply_highres(model, HighResSettings()):
        assert torch.equal(model(**x)[0], stock)
    with apply_highres(model, HighResSettings(ntk_factor=10, proportional_attention=True)):
        assert not torch.allclose(model(**x)[0], stock)
    assert torch.equal(model(**x)[0], stock), "settings must be removed on exit"


@torch.no_grad()
def test_ntk_frequencies_are_theta_times_factor(model):
    with apply_highres(model, {"ntk_factor": 10}):
        assert model.pos_embed.theta == 100000
        for axis, dim in enumerate(model.pos_embed.axes_dim):
            want = 1.0 / (1e5 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            assert torch.allclose(rope_frequencies(model, axis), want, rtol=1e-12)
        # the embedding the model actually uses: cos(position * frequency), interleaved per pair
        ids = torch.tensor([[0.0, 5.0, 9.0]])
        cos, _ = model.pos_embed(ids)
        d0, d1, d2 = model.pos_embed.axes_dim
        f1 = 1.0 / (1e5 ** (torch.arange(0, d1, 2, dtype=torch.float64) / d1))
        assert torch.allclose(cos[0, d0:d0 + d1:2].double(), torch.cos(5.0 * f1), atol=1e-6)
    assert model.pos_embed.theta == 10000


def test_proportional_scale_values_for_real_head_dim():
    d = 128
    ratios = [attention_scale(512 + image_seq_len(s, s), d) * math.sqrt(d) for s in (1024, 2048, 4096)]
    assert DEFAULT_BASE_SEQ_LEN == 4608
    assert ratios[0] == pytest.approx(1.000, abs=1e-12)
    assert ratios[1] == pytest.approx(1.074, abs=5e-4)
    assert ratios[2] == pytest.approx(1.147, abs=5e-4)


@torch.no_grad()
@pytest.mark.parametrize("width, height", [(128, 96), (384, 256)])
def test_proportional_attention_equals_scaled_queries(model, width, height):
    """Scaling the softmax by c equals scaling every query by c: RMSNorm weights x c, RoPE is linear."""
    x = _inputs(model, width, height)
    n = x["hidden_states"].shape[1] + x["encoder_hidden_states"].shape[1]
    base = 16
    c = math.sqrt(math.log(n) / math.log(base))
    ref = copy.deepcopy(model)
    for name, p in ref.named_parameters():
        if name.endswith(("norm_q.weight", "norm_added_q.weight")):
            p.mul_(c)
    want = ref(**x)[0]
    with apply_highres(model, HighResSettings(proportional_attention=True, base_seq_len=base)):
        got = model(**x)[0]
    stock = model(**x)[0]
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert (got - stock).abs().max() > 1e-3 * want.abs().max(), "the scale must change the output"


def test_proportional_attention_with_gradient_checkpointing_matches(model):
    """With gradients (checkpointing is skipped under no_grad): the recompute in backward must see the same
    attention scale, so outputs and gradients equal those of the plain model."""
    settings = {"proportional_attention": True, "base_seq_len": 16}
    x = _inputs(model)
    results = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).train().requires_grad_(True)
        if checkpointing:
            m.enable_gradient_checkpointing()
        calls = []
        m.transformer_blocks[0].register_forward_pre_hook(lambda *a, c=calls: c.append(1))  # recompute stops early
        with apply_highres(m, settings):
            out = m(**x)[0]
            out.square().mean().backward()
        results.append((out.detach(), m.transformer_blocks[0].attn.to_q.weight.grad.clone(), len(calls)))
    (a, ga, n_plain), (b, gb, n_ckpt) = results
    assert (n_plain, n_ckpt) == (1, 2)  # the checkpointed block really ran again in backward
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-5)


def test_static_shift_scheduler_and_restore(tiny_flux_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    original = pipe.scheduler
    with apply_highres(pipe, HighResSettings()):
        s = pipe.scheduler
        assert not s.config.use_dynamic_shifting and s.config.shift == 3.0
        t = np.linspace(1.0, 0.25, 4)  # what FluxPipeline passes as sigmas
        s.set_timesteps(sigmas=t, mu=11.5)  # a 4096² mu must be ignored
        assert np.allclose(s.sigmas[:-1].numpy(), 3 * t / (1 + 2 * t), atol=1e-6)
    assert pipe.scheduler is original
    with apply_highres(pipe, {"shift": 1.5}):
        assert pipe.scheduler.config.shift == 1.5
    with apply_highres(pipe, {"dynamic_shift": True}):
        assert pipe.scheduler is original


def test_tiny_pipeline_generates_non_square_with_everything_on(tiny_flux_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    settings = HighResSettings(ntk_factor=10, proportional_attention=True, shift=3.0)
    gen = lambda: pipe("a cat", width=384, height=256, num_inference_steps=2, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    with apply_highres(pipe, settings):
        img = gen()
    assert img.shape == (1, 256, 384, 3) and np.isfinite(img).all()
    assert not np.allclose(img, gen())


def test_settings_metadata_round_trip_and_resolution_defaults():
    s = HighResSettings(ntk_factor=10, proportional_attention=True)
    assert HighResSettings.from_dict(s.to_dict()) == s
    assert HighResSettings.for_resolution(4096, 4096) == s
    assert HighResSettings.for_resolution(1024, 768) == HighResSettings()
    assert HighResSettings.for_resolution(4096, 2048, ntk_factor=4).ntk_factor == 4


@pytest.mark.parametrize("bad, match", [
    ({"ntk_factor": 0}, "positive"),
    ({"ntk_factor": -2.0}, "positive"),
    ({"ntk_factor": float("nan")}, "positive"),
    ({"ntk_facter": 10}, "did you mean 'ntk_factor'"),
    ({"shift": 3.0, "dynamic_shift": True}, "not both"),
])
def test_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        HighResSettings.from_dict(bad)


@pytest.mark.parametrize("w, h", [(1000, 1024), (1024, 1030), (0, 1024)])
def test_sizes_not_divisible_by_16(w, h):
    with pytest.raises(ValueError, match="multiple of 16"):
        check_resolution(w, h)


def _dispatch():
    from diffusers.models.transformers import transformer_flux as tf

    return tf.dispatch_attention_fn


@torch.no_grad()
def test_attention_dispatch_is_replaced_only_inside_the_block_and_nesting_is_safe(model):
    stock = _dispatch()
    x = _inputs(model)
    on = {"proportional_attention": True, "base_seq_len": 16}
    with apply_highres(model, HighResSettings()):
        assert _dispatch() is stock, "no proportional attention: nothing to replace"
    with apply_highres(model, on):
        outer = _dispatch()
        assert outer is not stock
        a = model(**x)[0]
        with apply_highres(model, on):
            assert _dispatch() is outer, "a nested block shares the installation"
        assert _dispatch() is outer, "leaving the inner block keeps the outer one's"
        assert torch.equal(model(**x)[0], a)
    assert _dispatch() is stock, "the last block to leave puts diffusers' function back"
    with pytest.raises(RuntimeError, match="boom"), apply_highres(model, on):
        raise RuntimeError("boom")
    assert _dispatch() is stock, "restored after an error too"


def test_rope_scheme_settings_are_checked():
    assert HighResSettings().rope == "ntk"
    with pytest.raises(ValueError, match="dype-yarn"):
        HighResSettings(rope="dype_yarn")
    with pytest.raises(ValueError, match="ntk_factor 10 is for rope = ntk"):
        HighResSettings(rope="yarn", ntk_factor=10)
    with pytest.raises(ValueError, match="two numbers"):
        HighResSettings(yarn_beta=(1.0,))
    s = HighResSettings.from_dict({"rope": "dype-yarn", "yarn_gamma": [8, 1]})  # as JSON metadata gives it
    assert s.yarn_gamma == (8.0, 1.0) and s.rope_params.yarn_gamma == (8.0, 1.0)
    # URAE's size defaults (NTK 10, proportional attention) belong to its own scheme
    assert HighResSettings.for_resolution(4096, 2304).ntk_factor == 10
    other = HighResSettings.for_resolution(4096, 2304, rope="dype-yarn")
    assert other.ntk_factor == 1 and not other.proportional_attention
    with pytest.raises(ValueError, match="nearest valid width is 4096"):
        check_resolution(4100, 2304)


@torch.no_grad()
def test_dype_sees_each_steps_shifted_sigma(tiny_flux_dir):
    """Through the pipeline, DyPE's time is the scheduler's sigma after URAE's static shift, at every step."""
    from urae.runtime import SchemePosEmbed

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    settings = HighResSettings(rope="dype-ntk", rope_base_resolution=64, shift=3.0, proportional_attention=True)
    seen = []
    with apply_highres(pipe, settings):
        pos = pipe.transformer.pos_embed
        assert isinstance(pos, SchemePosEmbed)
        h = pipe.transformer.register_forward_hook(lambda *a: seen.append(pos.sigmas[0]))
        try:
            pipe(prompt="a", width=160, height=96, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        finally:
            h.remove()
    want = [3 * t / (1 + 2 * t) for t in (1, 2 / 3, 1 / 3)]  # FLUX's sigmas 1 .. 1/steps, shifted by 3
    assert seen == pytest.approx(want, abs=1e-6)
    assert not isinstance(pipe.transformer.pos_embed, SchemePosEmbed)
