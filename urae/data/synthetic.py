"""Procedural images for tests and benchmarks: smooth gradients plus shapes, different per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8: two rotated colour gradients and a disc, so every crop and bucket differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    a, b, c = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([np.sin(3 * xx + a) * 0.5 + 0.5, np.cos(3 * yy + b) * 0.5 + 0.5, (xx * yy + c) % 1.0], -1)
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    return (img * 255).round().astype(np.uint8)


def write_image(path: str | Path, width: int, height: int, seed: int = 0) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(width, height, seed)).save(path, quality=95)
    return path
