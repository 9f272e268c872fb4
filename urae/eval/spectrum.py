"""Real detail without weights: the power spectrum of an image, its effective resolution and high-frequency share.

An image made at N pixels holds detail up to N/2 cycles; an image upscaled from n < N pixels holds almost none
between n/2 and N/2, whatever its pixel count. The radially averaged power spectrum of natural images falls as a
power law of frequency, so the spectrum is compared with the power law fitted to its coarse scales: the
*effective cutoff* is the highest frequency whose power is still within 3 dB of that law (the half-power point)
and above the noise floor of 8-bit rounding. The effective resolution is that cutoff in pixels, 2·f·(long side):
an image made at 4096² scores near 4096, the same image of a 1024² original upscaled ×4 near 1024.

Limits (docs/eval.md): nearest-neighbour upscaling makes blocks whose hard edges are real high frequencies and
scores high; a very smooth image (a plain sky) scores low because it holds little detail, however it was made.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights: the detail people see is in the luminance
# Rounding to 8 bits adds white noise of variance q²/12 (q = 1/255) to each channel; the luminance mixes three
# independent ones. Below this, a PNG cannot say whether detail is there.
QUANT_FLOOR = (1 / 255) ** 2 / 12 * sum(w * w for w in LUMA)
FLOOR_MARGIN = 10.0  # power must stand 10 dB above the rounding floor to count
HALF_POWER = 0.5  # -3 dB against the coarse scales' power law
FIT_BAND = (0.005, 0.08)  # cycles/pixel fitted for the power law: below the Nyquist (0.083) of a ×6 upscale
HF_CUTOFF = 0.25  # the top octave: what a ×2 upscale cannot make


@dataclasses.dataclass
class Spectrum:
    freqs: np.ndarray  # bin centres, cycles per pixel, up to 0.5
    power: np.ndarray  # mean power per bin (variance units of [0, 1] luminance)
    energy: np.ndarray  # summed power per bin
    count: np.ndarray  # spectrum samples per bin (a ring's mean is as certain as its count is large)
    long_side: int


def luminance(image) -> torch.Tensor:
    """PIL image or H×W×3 uint8 array -> H×W float32 luminance in [0, 1]."""
    a = torch.from_numpy(np.array(image.convert("RGB") if hasattr(image, "convert") else image)).to(torch.float32)
    if a.ndim == 2:
        return a / 255
    return a[..., :3] @ torch.tensor(LUMA) / 255


@functools.lru_cache(maxsize=4)
def _geometry(h: int, w: int):
    """Per shape, computed once (a 4096² image's 16 tiles share one): the window, each rfft bin's ring, and how
    many bins of the full spectrum it stands for (the rfft holds one of each ± pair of columns)."""
    win = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    n = min(h, w) // 2
    ring = (torch.sqrt(fy * fy + fx * fx) * 2 * n).long().clamp_(max=n).flatten()  # ring n: beyond 0.5, dropped
    mult = torch.full((h, w // 2 + 1), 2.0, dtype=torch.float64)
    mult[:, 0] = 1
    if w % 2 == 0:
        mult[:, -1] = 1
    count = torch.bincount(ring, mult.flatten(), minlength=n + 1)[:n]
    return win, float(win.square().mean()), ring, mult.flatten(), count, n


def radial_spectrum(gray: torch.Tensor) -> Spectrum:
    """Hann-windowed (the image's borders would otherwise add a false high-frequency cross) power spectrum,
    normalised so that white noise of variance v reads v in every bin, averaged over rings of width 1/min(H, W)."""
    h, w = gray.shape
    win, win_power, ring, mult, count, n = _geometry(h, w)
    x = (gray - gray.mean()).float() * win  # float32: 7 digits are plenty for a spectrum, and twice as fast
    p = torch.fft.rfft2(x, norm="ortho").abs().square_().flatten().double() / win_power
    energy = torch.bincount(ring, p * mult, minlength=n + 1)[:n]
    power = energy / count.clamp(min=1)
    freqs = (torch.arange(n, dtype=torch.float64) + 0.5) / (2 * n)
    return Spectrum(freqs.numpy(), power.numpy(), energy.numpy(), count.numpy(), max(h, w))


def power_law(s: Spectrum, slope: float | None = None) -> tuple[float, float] | None:
    """(slope, log intercept) of the power law of the coarse scales, each ring weighted by its sample count; with
    `slope` given only the intercept is fitted (a tile takes its image's slope: its own few coarse rings are too
    noisy to set one)."""
    signal = s.power - QUANT_FLOOR
    band = (s.freqs >= FIT_BAND[0]) & (s.freqs <= FIT_BAND[1]) & (signal > 0)
    if band.sum() < 3:  # tiny images: fit what there is below a quarter of Nyquist
        band = (s.freqs <= 0.125) & (signal > 0)
    if band.sum() < 2:
        return None
    x, y, w = np.log(s.freqs[band]), np.log(signal[band]), s.count[band]
    if slope is None:
        slope, icpt = np.polyfit(x, y, 1, w=np.sqrt(w))
        return float(slope), float(icpt)
    return slope, float(np.average(y - slope * x, weights=w))


def effective_cutoff(s: Spectrum, slope: float | None = None) -> float:
    """The highest frequency (cycles/pixel) whose power is within 3 dB of the coarse scales' power law and
    10 dB above the rounding floor; 0 for a flat image."""
    fit = power_law(s, slope)
    if fit is None:
        return 0.0
    trend = np.exp(fit[1]) * s.freqs ** fit[0]
    ok = (s.power - QUANT_FLOOR >= HALF_POWER * trend) & (s.power >= FLOOR_MARGIN * QUANT_FLOOR)
    # smooth over ±2.5% of the band so one ring of noise neither makes nor breaks the cutoff
    k = max(1, len(ok) // 40)
    frac = np.convolve(ok.astype(np.float64), np.ones(2 * k + 1) / (2 * k + 1), mode="same")
    above = np.nonzero(frac >= 0.5)[0]
    return float(s.freqs[above[-1]]) if len(above) else 0.0


def hf_share(s: Spectrum, cutoff: float = HF_CUTOFF) -> float:
    """The share of the image's varying energy (above the rounding floor) at frequencies >= cutoff."""
    signal = np.clip(s.energy - QUANT_FLOOR * s.energy / np.maximum(s.power, 1e-300), 0, None)
    total = signal[1:].sum()  # the lowest ring holds what the mean removal and window left of the DC term
    return float(signal[s.freqs >= cutoff].sum() / total) if total > 0 else 0.0


def tiles(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping size×size boxes (left, top, right, bottom) covering the image, centred; the whole image when
    it is smaller than one tile."""
    if width < size or height < size:
        return [(0, 0, width, height)]
    nx, ny = width // size, height // size
    x0, y0 = (width - nx * size) // 2, (height - ny * size) // 2
    return [(x0 + i * size, y0 + j * size, x0 + (i + 1) * size, y0 + (j + 1) * size)
            for j in range(ny) for i in range(nx)]


def detail(image, tile: int | None = None) -> dict[str, float]:
    """Effective resolution (pixels of the image's long side) and high-frequency share, for the whole image and,
    with `tile`, the median / mean over its native-resolution tiles (cutoffs scaled to the whole image's size)."""
    gray = luminance(image)
    h, w = gray.shape
    s = radial_spectrum(gray)
    out = {"effective_resolution": 2 * effective_cutoff(s) * max(h, w), "hf_share": hf_share(s)}
    if tile:
        fit = power_law(s)
        cuts, shares = [], []
        for left, top, right, bottom in tiles(w, h, tile):
            t = radial_spectrum(gray[top:bottom, left:right])
            cuts.append(2 * effective_cutoff(t, fit[0] if fit else None) * max(h, w))
            shares.append(hf_share(t))
        out["effective_resolution@tiles"] = float(np.median(cuts))
        out["hf_share@tiles"] = float(np.mean(shares))
    return out
