"""Writing generated images: PNG with the generation facts in text chunks, a JSONL sidecar, no overwrites."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from urae.io import atomic_path


def free_path(out_dir: str | os.PathLike, stem: str, suffix: str = ".png") -> Path:
    """`stem.png`, or `stem-1.png`, `stem-2.png`, … if taken: existing files are never overwritten."""
    out_dir = Path(out_dir)
    path, n = out_dir / f"{stem}{suffix}", 0
    while path.exists():
        n += 1
        path = out_dir / f"{stem}-{n}{suffix}"
    return path


def next_index(out_dir: str | os.PathLike) -> int:
    """One past the highest `NNNNN_` index of the PNGs already in `out_dir`: runs into one folder keep counting."""
    found = [int(m.group(1)) for p in Path(out_dir).glob("*.png") if (m := re.match(r"(\d+)_", p.name))]
    return max(found, default=-1) + 1


def image_stem(index: int, seed: int, width: int, height: int) -> str:
    """`00012_42_2048x2048`: the image's index in its folder, its seed and size."""
    return f"{index:05d}_{seed}_{width}x{height}"


def save_png(image: Image.Image, out_dir: str | os.PathLike, stem: str, info: dict) -> Path:
    """Save atomically; every key of `info` becomes a PNG text chunk (JSON for non-strings)."""
    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(k, v if isinstance(v, str) else json.dumps(v))
    path = free_path(out_dir, stem)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return path


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_png_info(path: str | os.PathLike) -> dict:
    with Image.open(path) as im:
        return dict(im.text)
