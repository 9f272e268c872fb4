"""Exact, memory-bounded VAE decoding for 4096² images.

diffusers' tiled decode is an approximation: GroupNorm statistics and the mid-block attention differ
per tile (a trained VAE hides most seams; the result is still not the image the latents describe).
Here the full-resolution stages run over row chunks with exact halos and whole-image GroupNorm
statistics (the same machinery as the split encoder of urae.data.vae_encode), so the output equals
`vae.decode` up to float rounding while each chunk is all that sits on the GPU at full resolution.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from urae.data.vae_encode import DEFAULT_CHUNK_PIXELS, _SplitEncoder, _Unsupported

log = logging.getLogger("urae")

# Decoding more than 2048² at once needs more activation memory than fits beside the model on 24 GB.
SPLIT_DECODE_PIXELS = 2048 * 2048


class _SplitDecoder(_SplitEncoder):
    """diffusers `Decoder.forward` with the large stages split into row chunks."""

    def __init__(self, decoder, chunk_rows: int, threshold: int, compute: torch.device, store: torch.device):
        for name in ("conv_in", "up_blocks", "mid_block", "conv_norm_out", "conv_act", "conv_out"):
            if not hasattr(decoder, name):
                raise _Unsupported(f"no {name}")
        if not isinstance(decoder.conv_norm_out, torch.nn.GroupNorm):
            raise _Unsupported("spatially conditioned output norm")
        self.enc, self.rows, self.threshold = decoder, chunk_rows, threshold
        self.compute, self.store = compute, store

    def _big(self, h: int, w: int) -> bool:
        return h * w > self.threshold // 4

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        dec = self.enc
        x = self._mid_block(dec.mid_block, dec.conv_in(z.to(self.compute)))
        for block in dec.up_blocks:
            big = self._big(*x.shape[-2:])
            x = x.to(self.store) if big else x
            for resnet in block.resnets:
                x = self._resnet(resnet, x) if big else resnet(x, None)
            for up in block.upsamplers or []:
                if self._big(2 * x.shape[-2], 2 * x.shape[-1]):
                    x = self._upsample(up, x.to(self.store))
                else:
                    x = up(x)
        if not self._big(*x.shape[-2:]):
            return dec.conv_out(dec.conv_act(dec.conv_norm_out(x.to(self.compute))))
        gn = dec.conv_norm_out
        mean, rstd = self._gn_stats(x, gn)
        return self._conv(dec.conv_out, x, lambda t: self._gn_act(t, gn, mean, rstd, dec.conv_act)).to(self.compute)

    def _upsample(self, up, x: torch.Tensor) -> torch.Tensor:
        """Nearest 2x then conv, per output row chunk, from just the input rows that chunk needs."""
        conv = getattr(up, "conv", None)
        if (getattr(up, "norm", None) is not None or getattr(up, "use_conv_transpose", False) or conv is None
                or not getattr(up, "interpolate", True) or conv.stride != (1, 1) or conv.groups != 1):
            raise _Unsupported("upsampler other than nearest 2x + conv")
        p = conv.padding[0]
        b, _, h, w = x.shape
        big_h = 2 * h
        out = torch.empty(b, conv.out_channels, big_h, 2 * w, dtype=x.dtype, device=self.store)
        for a in range(0, big_h, self.rows):
            e = min(big_h, a + self.rows)
            lo, hi = a - p, e + p  # upsampled rows this chunk reads
            s0, s1 = max(lo, 0) // 2, (min(hi, big_h) + 1) // 2
            src = F.interpolate(self._dev(x[:, :, s0:s1]), scale_factor=2.0, mode="nearest")
            src = src[:, :, max(lo, 0) - 2 * s0: min(hi, big_h) - 2 * s0]
            src = F.pad(src, (conv.padding[1], conv.padding[1], max(0, -lo), max(0, hi - big_h)))
            out[:, :, a:e] = F.conv2d(src, conv.weight, conv.bias).to(self.store)
        return out


@torch.no_grad()
def decode(vae, z: torch.Tensor, split: bool | None = None, chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
           threshold: int = SPLIT_DECODE_PIXELS, device: torch.device | str | None = None) -> torch.Tensor:
    """Pixels [B, 3, 8h, 8w] in [-1, 1] from raw VAE latents [B, C, h, w] (after FLUX's unscale/unshift).

    split: None = automatically above `threshold` output pixels; True forces the split path.
    device: where to decode (the pipeline's execution device); a VAE parked elsewhere by model offload is
    moved there for the decode and back after.
    """
    param = next(vae.parameters())
    out_px = z.shape[-2] * z.shape[-1] * 64
    if param.device.type == "meta":
        # sequential offload: weights live in hooks that only the modules' own forwards trigger, so the
        # split path (which reads conv weights directly) cannot run; diffusers' tiling bounds the memory
        before = vae.use_tiling
        vae.use_tiling = before or split is True or (split is None and out_px > threshold)
        try:
            return vae.decode(z.to(device or "cpu"), return_dict=False)[0]
        finally:
            vae.use_tiling = before
    device = torch.device(device) if device is not None else param.device
    if param.device != device:
        vae.to(device)
        try:
            return decode(vae, z, split, chunk_pixels, threshold, device)
        finally:
            vae.to(param.device)
    z = z.to(device=param.device, dtype=param.dtype)
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    if split is False or (split is None and out_px <= threshold):
        return vae.decoder(z)
    store = torch.device("cpu") if param.device.type != "cpu" else param.device
    width = z.shape[-1] * 8
    try:
        dec = _SplitDecoder(vae.decoder, max(1, chunk_pixels // width), min(threshold, out_px - 1),
                            param.device, store)
        return dec(z)
    except _Unsupported as e:
        log.warning("VAE decoder layout not supported by the split decode (%s); decoding whole", e)
        return vae.decoder(z)
