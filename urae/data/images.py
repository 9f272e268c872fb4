"""Decode an image and turn it into the bucket-sized pixel tensor the VAE encodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from urae.data.buckets import Bucket, crop_offset, resize_plan


@dataclass(frozen=True)
class CropInfo:
    """What was done to the image: resize to `resized`, then crop `bucket` at (`left`, `top`)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int

    def as_text(self) -> str:
        return f"{self.original[0]}x{self.original[1]}->{self.resized[0]}x{self.resized[1]}+{self.left}+{self.top}"


def open_rgb(path: Path):
    """Fully decode as RGB with EXIF rotation applied; transparency is composited onto white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im.convert("RGB")


def bucket_pixels(path: Path, bucket: Bucket, random_crop: bool = False, seed_text: str = "") -> tuple[torch.Tensor, CropInfo]:
    """[3, H, W] float32 in [-1, 1] (the VAE's input range), resized with LANCZOS and cropped to `bucket`."""
    from PIL import Image

    im = open_rgb(path)
    resized = resize_plan(im.width, im.height, bucket)
    original = im.size
    if resized != im.size:
        # reducing_gap: a fast box pre-reduction for big downscales, then true Lanczos.
        im = im.resize(resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = crop_offset(resized, bucket, random_crop, seed_text)
    im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    arr = np.asarray(im, dtype=np.float32)
    pixels = torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0
    return pixels, CropInfo(original, resized, left, top)
