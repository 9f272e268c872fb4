"""urae.eval's metrics against independent computations: FD vs scipy's sqrtm, CMMD vs a direct double sum,
effective resolution on images whose true detail is known, and the CLIP / DINOv2 / PickScore paths on tiny
random-weight models of the real architectures."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from urae.eval import distances, metrics, spectrum
from urae.eval.metrics import Item
from urae.eval.tiny_models import write_tiny_clip, write_tiny_dinov2

# ---------------------------------------------------------------- distances


def _random_cov(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def _scipy_fd(mu1, c1, mu2, c2):
    root = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
    d = (mu1 - mu2).numpy()
    return float(d @ d + np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(root.real))


def test_frechet_distance_equals_scipy_sqrtm_and_its_sample_estimate_converges():
    g = torch.Generator().manual_seed(0)
    for d in (3, 16, 64):
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        c1, c2 = _random_cov(d, g), _random_cov(d, g)
        ours, ref = distances.frechet_from_stats(mu1, c1, mu2, c2), _scipy_fd(mu1, c1, mu2, c2)
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-8), (d, ours, ref)
        assert distances.frechet_from_stats(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-8 * d)
    # from samples of Gaussians with known covariance: the estimate approaches the closed form
    d, n = 4, 40000
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    c1, c2 = _random_cov(d, g), _random_cov(d, g)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c2).T
    assert distances.frechet_distance(x, y) == pytest.approx(_scipy_fd(mu1, c1, mu2, c2), rel=0.05)


def test_cmmd_equals_a_direct_double_sum():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) + 0.3
    xs = [v / v.norm() for v in x.double()]
    ys = [v / v.norm() for v in y.double()]

    def k(a, b):
        return math.exp(-float((a - b).square().sum()) / (2 * 10.0**2))

    def mean(pairs):
        return sum(pairs) / len(pairs)

    direct = 1000 * (mean([k(a, b) for a in xs for b in xs]) + mean([k(a, b) for a in ys for b in ys])
                     - 2 * mean([k(a, b) for a in xs for b in ys]))
    assert distances.cmmd(x, y) == pytest.approx(direct, rel=1e-9)
    assert distances.cmmd(x, x) == pytest.approx(0, abs=1e-12)
    assert distances.cmmd(x, 3 * x) == pytest.approx(0, abs=1e-12)  # normalised: only directions count


# ---------------------------------------------------------------- effective resolution


def pink_image(n: int, seed: int) -> Image.Image:
    """A natural-image-like pattern: random phases, amplitude 1/f (power 1/f²) up to the Nyquist frequency."""
    g = torch.Generator().manual_seed(seed)
    fy, fx = torch.fft.fftfreq(n)[:, None], torch.fft.rfftfreq(n)[None, :]
    r = torch.sqrt(fy**2 + fx**2)
    r[0, 0] = 1
    spec = torch.complex(torch.randn(r.shape, generator=g), torch.randn(r.shape, generator=g)) / r
    spec[0, 0] = 0
    x = torch.fft.irfft2(spec, s=(n, n))
    x = (x - x.mean()) / x.std()
    return Image.fromarray((128 + 40 * x).clamp(0, 255).round().to(torch.uint8).numpy()).convert("RGB")


def _known_images(n):
    """White noise, a native n² pattern, and an n/4 pattern upscaled ×4 (Lanczos and bicubic)."""
    small = pink_image(n // 4, 1)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (n, n, 3), dtype=np.uint8))
    return {"noise": noise, "native": pink_image(n, 2),
            "lanczos x4": small.resize((n, n), Image.LANCZOS), "bicubic x4": small.resize((n, n), Image.BICUBIC)}


def _check_order(n, tile):
    scores = {k: spectrum.detail(im, tile) for k, im in _known_images(n).items()}
    # within 5% of full resolution for noise and the native pattern; the upscales within 15% of n/4
    for k in ("noise", "native"):
        for col in ("effective_resolution", "effective_resolution@tiles"):
            assert scores[k][col] >= 0.95 * n, (k, col, scores[k])
    for k in ("lanczos x4", "bicubic x4"):
        for col in ("effective_resolution", "effective_resolution@tiles"):
            assert abs(scores[k][col] - n / 4) <= 0.15 * n / 4, (k, col, scores[k])
        assert scores[k]["hf_share"] < 1e-3
    assert scores["noise"]["hf_share"] > 0.7 > scores["native"]["hf_share"] > 0.05  # white: 3/4 of the band
    return scores


def test_effective_resolution_orders_noise_native_and_upscaled_images():
    _check_order(1024, 512)


@pytest.mark.slow
def test_effective_resolution_at_4k_sees_a_1k_image_upscaled_x4():
    _check_order(4096, 1024)


def test_effective_resolution_of_a_non_square_image_and_tiles():
    im = pink_image(512, 3).crop((0, 0, 512, 256))
    s = spectrum.detail(im, 128)
    assert s["effective_resolution"] >= 0.95 * 512 and s["effective_resolution@tiles"] >= 0.95 * 512
    assert spectrum.tiles(300, 200, 128) == [(22, 36, 150, 164), (150, 36, 278, 164)]
    assert spectrum.tiles(100, 200, 128) == [(0, 0, 100, 200)]
    flat = Image.new("RGB", (64, 64), (90, 90, 90))
    assert spectrum.detail(flat) == {"effective_resolution": 0.0, "hf_share": 0.0}


# ---------------------------------------------------------------- model metrics on tiny models


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    return str(write_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dinov2"))


def _items(tmp_path, n, size, seed, group="a"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = tmp_path / f"{group}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        out.append(Item(p, group, str(i), prompt=["a red cat", "a city at night, 4k"][i % 2]))
    return out


def test_clip_score_and_pickscore_equal_the_models_own_logits(tiny_clip, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    items = _items(tmp_path, 3, (48, 40), 0)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**proc(text=[it.prompt for it in items], images=[it.image() for it in items], return_tensors="pt",
                           padding=True))
    logits = out.logits_per_image.diagonal()  # logit_scale · cos(image i, text i)
    cos = logits / model.logit_scale.exp()
    clip = metrics.ClipScore(tiny_clip).score(items, 1024)
    pick = metrics.PickScore(tiny_clip).score(items, 1024)
    assert [r["clip_score"] for r in clip] == pytest.approx([100 * max(c, 0) for c in cos.tolist()], abs=1e-4)
    assert [r["pickscore"] for r in pick] == pytest.approx(logits.tolist(), abs=1e-4)


def test_fd_dinov2_and_cmmd_over_whole_images_and_tiles(tiny_clip, tiny_dinov2, tmp_path):
    ref = _items(tmp_path, 3, (64, 32), 1, "ref")
    same = [Item(it.path, "same", it.key) for it in ref]
    other = _items(tmp_path, 3, (64, 32), 2, "other")
    for m in (metrics.FdDinov2(tiny_dinov2), metrics.Cmmd(tiny_clip)):
        feats = m.embed(ref, 32)
        assert feats[m.name].shape[0] == 3 and feats[f"{m.name}@tiles"].shape[0] == 6  # two 32² tiles per image
        s = m.score_sets({"same": same, "other": other}, ref, 32)
        for col in m.columns:
            assert s["same"][col] == pytest.approx(0, abs=1e-6), (m.name, col)
            assert s["other"][col] > 1e-6, (m.name, col, s)
        direct = m.distance(m.features([it.image() for it in other]), m.features([it.image() for it in ref]))
        assert s["other"][m.name] == pytest.approx(direct, rel=1e-5)  # batched vs one by one: fp32 rounding


def test_missing_weights_offline_name_the_model_to_fetch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(metrics.EvalError, match=r"fetch it once with `hf download facebook/dinov2-large`"):
        metrics.make_metrics(["fd_dinov2"])[0].check()
    with pytest.raises(metrics.EvalError, match="did you mean 'cmmd'"):
        metrics.make_metrics(["cmd"])
    lines = []
    assert metrics.make_metrics(["detail", "maniqa"], say=lines.append)[0].name == "detail"
    assert len(lines) == 1 and lines[0].startswith("skipping maniqa: pyiqa is not usable here")
