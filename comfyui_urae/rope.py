"""Position schemes for FLUX past its trained size: URAE's NTK, YaRN, and DyPE's time-dependent YaRN / NTK.

FLUX.1 rotates 3 RoPE axes (text/time, row, column). The schemes:
- `none`: stock RoPE (theta 10000);
- `ntk`: URAE's theta x ntk_factor on every axis, at every step (the runtime sets `pos_embed.theta`);
- `yarn`: NTK-by-parts on the two spatial axes, the scale per axis s = (grid size) / (base grid), with the
  attention-temperature factor mscale = 0.1 ln s + 1 on the tables; the text/time axis untouched;
- `dype-yarn`: YaRN whose ramps beta and gamma are multiplied by kappa(sigma) = sigma^lambda;
- `dype-ntk`: per spatial axis theta x (s^(d/(d-2)))^(2 kappa(sigma)).
sigma is the flow-matching time of the call (after the shift): 1 is noise, so early steps see the extrapolated
frequencies and late steps tend back to the base ones.

The formulas follow DyPE (Issachar et al., "DyPE: Dynamic Position Extrapolation for Ultra High Resolution
Diffusion"; public code github.com/guyyariv/DyPE, MIT; patent pending for commercial use per its README);
tests/test_rope.py checks the tables against its `FluxPosEmbed`. The operations and their order are the
reference's, so the tables agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import math

import torch

SCHEMES = ("ntk", "yarn", "dype-yarn", "dype-ntk", "none")
# the schemes that replace the position embedding (ntk and none only change or keep theta)
TABLE_SCHEMES = ("yarn", "dype-yarn", "dype-ntk")
DYNAMIC_SCHEMES = ("dype-yarn", "dype-ntk")


@dataclasses.dataclass(frozen=True)
class RopeParams:
    """The reference's parameters, with its defaults."""

    base_resolution: int = 1024  # the trained size; base grid = base_resolution / 16 tokens per axis
    dype_lambda: float = 2.0  # kappa(sigma) = sigma ** lambda
    yarn_beta: tuple[float, float] = (1.25, 0.75)  # ramp between linear interpolation and NTK (rotations)
    yarn_gamma: tuple[float, float] = (16.0, 2.0)  # ramp back to the base frequencies (rotations)

    @property
    def base_patches(self) -> int:
        return self.base_resolution // 16


def _correction_dim(rotations: float, dim: int, theta: float, base_len: int) -> float:
    """The dimension index whose wavelength makes `rotations` turns over base_len positions (inf at 0 turns)."""
    if rotations <= 0:
        return math.inf
    return (dim * math.log(base_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def _ramp_mask(lo_rot: float, hi_rot: float, dim: int, theta: float, base_len: int, device) -> torch.Tensor:
    """1 on the dimensions below the ramp, 0 above it, linear between (the reference's `1 - linear_ramp_mask`)."""
    low = max(math.floor(_correction_dim(lo_rot, dim, theta, base_len)), 0)
    high = min(math.ceil(_correction_dim(hi_rot, dim, theta, base_len)), dim - 1)
    low, high = max(0, low), min(dim // 2, high)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return 1 - ramp.to(device, torch.float64)  # the ramp in float32, the complement in float64, as the reference


def yarn_frequencies(dim: int, theta: float, scale: float, kappa: float | None, params: RopeParams,
                     device=None) -> torch.Tensor:
    """NTK-by-parts frequencies (float64) of one axis at `scale` > 1; `kappa` scales the ramps (DyPE) or None."""
    exps = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    s = torch.tensor(scale, dtype=torch.float64, device=device)
    base = 1.0 / (theta ** exps)
    linear = 1.0 / (s * theta ** exps)
    ntk = 1.0 / torch.pow(theta * s ** (dim / (dim - 2)), exps)
    (b0, b1), (g0, g1) = params.yarn_beta, params.yarn_gamma
    if kappa is not None:
        b0, b1, g0, g1 = b0 * kappa, b1 * kappa, g0 * kappa, g1 * kappa
    n = params.base_patches
    mask = _ramp_mask(b0, b1, dim, theta, n, device)
    freqs = linear * (1 - mask) + ntk * mask
    mask = _ramp_mask(g0, g1, dim, theta, n, device)
    return freqs * (1 - mask) + base * mask


def _axis_table(pos: torch.Tensor, freqs: torch.Tensor, mscale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of pos x freqs, each pair interleaved (diffusers' `repeat_interleave_real`), as float32."""
    f = torch.outer(pos, freqs)
    cos = f.cos().repeat_interleave(2, dim=1).float()
    sin = f.sin().repeat_interleave(2, dim=1).float()
    if mscale is not None:
        cos, sin = cos * mscale, sin * mscale
    return cos, sin


def rope_tables(ids: torch.Tensor, axes_dim, scheme: str, sigma: float = 1.0, params: RopeParams = RopeParams(),
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's (cos, sin) tables [L, sum(axes_dim)] for positions `ids` [L, n_axes] under a table scheme.

    The scale of each spatial axis comes from the positions themselves ((largest + 1) / base grid), so a
    non-square grid gets one scale per axis. An axis no longer than the base grid keeps stock frequencies.
    """
    if scheme not in TABLE_SCHEMES:
        raise ValueError(f"rope_tables is for {', '.join(TABLE_SCHEMES)}, not {scheme!r}")
    pos = ids.float()
    device = pos.device
    kappa = float(sigma) ** params.dype_lambda if scheme in DYNAMIC_SCHEMES else None
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dim):
        exps = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        patches = pos[:, i].max().item() + 1 if i > 0 else 0
        mscale = None
        if patches <= params.base_patches:
            freqs = 1.0 / (theta ** exps)
        elif scheme == "dype-ntk":
            factor = max(1.0, ((patches / params.base_patches) ** (dim / (dim - 2))) ** (2.0 * kappa))
            freqs = 1.0 / ((theta * factor) ** exps)
        else:
            scale = patches / params.base_patches
            freqs = yarn_frequencies(dim, theta, scale, kappa, params, device)
            mscale = torch.tensor(0.1 * math.log(scale) + 1.0, dtype=torch.float64, device=device)
        cos, sin = _axis_table(pos[:, i], freqs, mscale)
        cos_out.append(cos)
        sin_out.append(sin)
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


def batch_tables(ids: torch.Tensor, axes_dim, scheme: str, sigmas, params: RopeParams = RopeParams(),
                 theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for a batch: [L, D] when every sample shares its time (or the scheme ignores it), else [B, L, D]
    with each sample's own tables."""
    if scheme not in DYNAMIC_SCHEMES:
        return rope_tables(ids, axes_dim, scheme, 1.0, params, theta)
    values = [float(s) for s in sigmas]
    if len(set(values)) == 1:
        return rope_tables(ids, axes_dim, scheme, values[0], params, theta)
    per = {s: rope_tables(ids, axes_dim, scheme, s, params, theta) for s in set(values)}
    return torch.stack([per[s][0] for s in values]), torch.stack([per[s][1] for s in values])
