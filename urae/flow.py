"""Rectified-flow training maths for FLUX: timestep sampling, noising, targets, latent packing.

x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0 (FLUX's convention; t in [0, 1], t = 1 is noise).
The guidance embedding is fed 1.0 in training (URAE §3.4): FLUX.1-dev is guidance-distilled.
"""

from __future__ import annotations

import torch

from urae.common import has_guidance_embedding

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "sigmoid", "shift")
TRAIN_GUIDANCE = 1.0


def sample_timesteps(n: int, method: str = "uniform", generator: torch.Generator | None = None,
                     sigmoid_scale: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                     shift: float = 3.0) -> torch.Tensor:
    """n training timesteps in (0, 1). `uniform` is the URAE recipe; the rest are sd-scripts' options."""
    if method == "uniform":
        return torch.rand(n, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    if method == "sigmoid":
        return torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
    if method == "shift":
        t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
        return shift * t / (1 + (shift - 1) * t)
    raise ValueError(f"unknown timestep_sampling {method!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FLUX's 2x2 patch tokens (same order as FluxPipeline)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent of size h x w."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE positions (0, row, col) of the h/2 x w/2 image tokens of an h x w latent."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def predict_flow(transformer, x_t: torch.Tensor, t: torch.Tensor, t5: torch.Tensor, pooled: torch.Tensor,
                 guidance: float = TRAIN_GUIDANCE) -> torch.Tensor:
    """The transformer's velocity prediction for latents x_t [B, C, H, W] at timesteps t [B] in (0, 1)."""
    _, _, h, w = x_t.shape
    dtype = next(transformer.parameters()).dtype
    g = None
    if has_guidance_embedding(transformer):
        g = torch.full((x_t.shape[0],), guidance, device=x_t.device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack_latents(x_t).to(dtype),
        timestep=t.to(x_t.device, dtype),
        guidance=g,
        pooled_projections=pooled.to(dtype),
        encoder_hidden_states=t5.to(dtype),
        txt_ids=torch.zeros(t5.shape[1], 3, device=x_t.device, dtype=dtype),
        img_ids=image_ids(h, w, x_t.device, dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def flow_loss(transformer, x0: torch.Tensor, t5: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, guidance: float = TRAIN_GUIDANCE) -> torch.Tensor:
    """Unweighted MSE between the predicted and true velocity (the URAE objective)."""
    pred = predict_flow(transformer, noisy_latents(x0, noise, t), t, t5, pooled, guidance)
    return torch.nn.functional.mse_loss(pred.float(), flow_target(x0, noise).float())
