"""The offline demo's assets: the tiny FLUX.1 folder and a small procedural dataset with captions.

Images are drawn from their own captions' parameters (shape, colours, position, background
gradient), so the dataset is deterministic, needs no download, and the captions mean something.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = [(256, 256), (320, 240), (240, 320), (352, 176)]


def draw_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str]:
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    fg, bg1, bg2 = (names[i] for i in rng.choice(len(names), 3, replace=False))
    w, h = size
    t = np.linspace(0, 1, h)[:, None, None]
    grad = (1 - t) * np.array(COLOURS[bg1]) + t * np.array(COLOURS[bg2])
    img = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.15, 0.3))
    cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    where = ("left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "centre")
    return img, f"a {fg} {shape} on the {where}, on a gradient from {bg1} to {bg2}"


DEMO_MARKER = ".urae-demo"  # marks a folder the demo made, the only kind it writes into


def write_demo_dataset(folder: str | os.PathLike, n: int = 16, seed: int = 0) -> Path:
    """n PNG images with .txt captions (the sd-scripts folder convention), written once.

    Only into a new folder or one the demo made: a user's own folder is never filled with demo images."""
    folder = Path(folder)
    if folder.is_dir() and (not (folder / DEMO_MARKER).is_file() or len(list(folder.glob("*.png"))) >= n):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("procedural images written by `demo = true`\n")
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, caption = draw_sample(rng, SIZES[i % len(SIZES)])
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    return folder


def ensure_demo_assets(model_dir: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    from urae.tiny import write_tiny_pipeline

    if not (Path(model_dir) / "model_index.json").is_file():
        print(f"demo: building the tiny FLUX.1 model in {model_dir}")
        write_tiny_pipeline(model_dir)
    write_demo_dataset(data_dir)
