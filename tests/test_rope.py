"""Position schemes: our RoPE tables against DyPE's reference `FluxPosEmbed` (tests/reference_dype, MIT)."""

import pytest
import torch

from tests.reference_dype.transformer_flux_pos import FluxPosEmbed, get_1d_rotary_pos_embed
from urae.rope import batch_tables, rope_tables

FLUX_AXES = (16, 56, 56)
SIZES = [(2048, 2048), (4096, 4096), (4096, 2304), (2304, 4096)]  # width x height
# our scheme -> the reference's (method, dype)
REFERENCE = {"yarn": ("yarn", False), "dype-yarn": ("yarn", True), "dype-ntk": ("ntk", True)}


def flux_ids(width, height, text=512, full=False):
    """FLUX's positions: text tokens at 0, image token (row, col) at (0, row, col). Each axis's table row
    depends only on that axis's position, so without `full` the image part is one token per row and column
    (every row and column index, the same largest ones) instead of the whole grid: the same table values."""
    h, w = height // 16, width // 16
    if full:
        img = torch.zeros(h, w, 3)
        img[..., 1] = torch.arange(h)[:, None]
        img[..., 2] = torch.arange(w)[None, :]
        img = img.reshape(-1, 3)
    else:
        k = torch.arange(max(h, w))
        img = torch.stack([torch.zeros(len(k)), (k % h).float(), (k % w).float()], 1)
        img[-1, 1:] = torch.tensor([h - 1.0, w - 1.0])
    return torch.cat([torch.zeros(text, 3), img])


def reference_tables(ids, method, dype, sigma, axes=FLUX_AXES):
    ref = FluxPosEmbed(10000, list(axes), method=method, dype=dype)
    ref.set_timestep(sigma)
    return ref(ids)


def _max_diff(a, b):
    return max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())


@pytest.mark.parametrize("width,height", SIZES)
def test_tables_equal_the_reference(width, height):
    """Every table scheme x sigma at every size, every axis: equal to float32 rounding (the tables are
    bounded by mscale < 1.15, so 1e-6 absolute is a few float32 ulps)."""
    ids = flux_ids(width, height, text=8)
    rows = []
    for scheme, (method, dype) in REFERENCE.items():
        for sigma in (1.0, 0.5, 0.1):
            ours = rope_tables(ids, FLUX_AXES, scheme, sigma)
            diff = _max_diff(ours, reference_tables(ids, method, dype, sigma))
            rows.append((scheme, sigma, diff))
            assert diff <= 1e-6, (scheme, sigma, width, height, diff)
    print(f"\n{width}x{height}: " + ", ".join(f"{s} σ={t}: {d:.1e}" for s, t, d in rows))


def test_schemes_really_differ_and_dype_follows_sigma():
    """A wrong scale, ramp or kappa would not match the reference; check the tests can see such changes."""
    ids = flux_ids(4096, 2304, text=4)
    yarn = rope_tables(ids, FLUX_AXES, "yarn")
    d1 = rope_tables(ids, FLUX_AXES, "dype-yarn", 1.0)
    d01 = rope_tables(ids, FLUX_AXES, "dype-yarn", 0.1)
    assert _max_diff(yarn, d1) == 0  # kappa(1) = 1: DyPE at pure noise is YaRN
    assert _max_diff(d1, d01) > 1e-2
    # each axis has its own scale: the transposed grid gives other tables
    assert _max_diff(rope_tables(flux_ids(2304, 4096, text=4), FLUX_AXES, "yarn"), yarn) > 1e-2
    # the text/time axis is stock on every scheme
    base = reference_tables(ids, "base", False, 1.0)
    for scheme in REFERENCE:
        t = rope_tables(ids, FLUX_AXES, scheme, 0.5)
        assert torch.equal(t[0][:, :16], base[0][:, :16]) and torch.equal(t[1][:, :16], base[1][:, :16])


def test_ntk_and_none_are_the_reference_ntk_factor_and_base():
    """URAE's `ntk` is theta x factor on all axes, as the reference's get_1d_rotary_pos_embed(ntk_factor=)."""
    from diffusers.models.embeddings import FluxPosEmbed as DiffusersPosEmbed

    ids = flux_ids(2048, 1024, text=4)
    ours = DiffusersPosEmbed(10000 * 10, list(FLUX_AXES))(ids)
    cos, sin = zip(*[get_1d_rotary_pos_embed(d, ids[:, i], 10000, use_real=True, ntk_factor=10.0,
                                             freqs_dtype=torch.float64) for i, d in enumerate(FLUX_AXES)])
    assert _max_diff(ours, (torch.cat(cos, -1), torch.cat(sin, -1))) <= 1e-6
    assert _max_diff(DiffusersPosEmbed(10000, list(FLUX_AXES))(ids), reference_tables(ids, "base", False, 1.0)) == 0


def test_small_grids_keep_stock_axes_and_batches_get_their_own_tables():
    ids = flux_ids(4096, 512, text=4)  # 256 x 32 tokens: the short axis stays stock
    ours = rope_tables(ids, FLUX_AXES, "dype-yarn", 0.5)
    assert _max_diff(ours, reference_tables(ids, "yarn", True, 0.5)) <= 1e-6
    base = reference_tables(ids, "base", False, 1.0)
    assert torch.equal(ours[0][:, 16:72], base[0][:, 16:72])
    cos, sin = batch_tables(ids, FLUX_AXES, "dype-ntk", [0.9, 0.2, 0.9])
    assert cos.shape == (3, ids.shape[0], 128)
    for b, s in enumerate((0.9, 0.2, 0.9)):
        want = rope_tables(ids, FLUX_AXES, "dype-ntk", s)
        assert torch.equal(cos[b], want[0]) and torch.equal(sin[b], want[1])
    assert batch_tables(ids, FLUX_AXES, "dype-ntk", torch.tensor([0.3, 0.3]))[0].dim() == 2


# ---- through the runtime: one denoising step of the tiny model against the reference's embedding

def _step_inputs(model, width, height, sigmas, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, cfg = len(sigmas), model.config
    ids = flux_ids(width, height, text=0, full=True)
    return dict(hidden_states=torch.randn(b, ids.shape[0], cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(b, text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor(sigmas), guidance=torch.ones(b), img_ids=ids, txt_ids=torch.zeros(text, 3),
                return_dict=False)


@pytest.fixture(scope="module")
def tiny():
    from urae.tiny import build_transformer

    return build_transformer(layers=1, single_layers=1, seed=3)


def _reference_step(model, x, method, dype, base_patches, proportional=False):
    """The reference transformer's step: diffusers' FLUX transformer with the reference's FluxPosEmbed, its
    time set from the call as the reference's forward does (`set_timestep(timestep.item())`). The reference
    module itself imports a package it never uses (sqlalchemy) and changes nothing else in the transformer."""
    from urae.runtime import HighResSettings, apply_highres

    stock = model.pos_embed
    ref = FluxPosEmbed(10000, list(stock.axes_dim), method=method, dype=dype)
    ref.base_patches = base_patches
    ref.set_timestep(x["timestep"].item())
    model.pos_embed = ref
    try:
        with apply_highres(model, HighResSettings(proportional_attention=proportional, base_seq_len=64)):
            return model(**x)[0]
    finally:
        model.pos_embed = stock


@torch.no_grad()
@pytest.mark.parametrize("proportional", [False, True])
def test_one_step_equals_the_reference_transformer(tiny, proportional):
    """Base 256 px (16 tokens per axis) so a 384 x 320 picture is past it on both axes, as 4K is past 1024."""
    from urae.runtime import HighResSettings, apply_highres

    for scheme, (method, dype) in REFERENCE.items():
        for sigma in ((1.0, 0.3) if dype else (0.3,)):
            x = _step_inputs(tiny, 384, 320, [sigma])
            want = _reference_step(tiny, x, method, dype, 16, proportional)
            s = HighResSettings(rope=scheme, rope_base_resolution=256, proportional_attention=proportional,
                                base_seq_len=64)
            with apply_highres(tiny, s):
                got = tiny(**x)[0]
            diff = (got - want).abs().max().item()
            assert diff <= 1e-6, (scheme, sigma, diff)
            assert (got - tiny(**x)[0]).abs().max().item() > 1e-4, "the scheme changes the step"
    assert type(tiny.pos_embed).__name__ == "FluxPosEmbed" and tiny.pos_embed.theta == 10000


@torch.no_grad()
def test_batch_of_noise_levels_gets_each_samples_tables(tiny):
    from urae.runtime import HighResSettings, apply_highres

    x = _step_inputs(tiny, 384, 320, [0.9, 0.2])
    with apply_highres(tiny, HighResSettings(rope="dype-yarn", rope_base_resolution=256)):
        both = tiny(**x)[0]
        for b in range(2):
            one = {**x, **{k: x[k][b:b + 1] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                                       "timestep", "guidance")}}
            assert (tiny(**one)[0][0] - both[b]).abs().max().item() <= 1e-6
        # the planted bug "the first sample's time for the whole batch" is visible
        same = tiny(**{**x, "timestep": torch.tensor([0.9, 0.9])})[0]
        assert (same[1] - both[1]).abs().max().item() > 1e-4


@pytest.mark.parametrize("base", [2048, 4096])
def test_every_urae_bucket_gets_its_own_axis_scales(base):
    """Training's buckets (1:4 to 4:1) through the positions training builds (urae.flow.image_ids): the YaRN
    scale of each axis follows that bucket's grid, as in the reference (the whole grid up to 2048 x 1024, then
    one token per row and column, the same table values)."""
    from urae.data.buckets import urae_buckets
    from urae.flow import image_ids

    for w, h in urae_buckets(base):
        ids = image_ids(h // 8, w // 8) if w * h <= 2048 * 1024 else flux_ids(w, h, text=0)
        ids = torch.cat([torch.zeros(2, 3), ids])
        ours = rope_tables(ids, FLUX_AXES, "dype-yarn", 0.5)
        assert _max_diff(ours, reference_tables(ids, "yarn", True, 0.5)) <= 1e-6, (w, h)
