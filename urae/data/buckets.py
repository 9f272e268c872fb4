"""Aspect-ratio buckets: the URAE set or sd-scripts area buckets, assignment, crop geometry, summary."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from urae.data.options import SIZE_MULTIPLE

Bucket = tuple[int, int]  # (width, height) in pixels

# URAE's shapes (width : height), long side = base; docs/training.md, recipes.
URAE_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2), (4, 1), (1, 4))


def _floor(x: float, step: int) -> int:
    return int(x // step) * step


def urae_buckets(base: int) -> list[Bucket]:
    """Long side = base, the short side floored to a multiple of 16."""
    out = []
    for a, b in URAE_RATIOS:
        long_ = base
        short = _floor(base * min(a, b) / max(a, b), SIZE_MULTIPLE)
        out.append((long_, short) if a >= b else (short, long_))
    return out


def area_buckets(max_area: int, min_size: int, max_size: int, steps: int) -> list[Bucket]:
    """sd-scripts' `make_bucket_resolutions`: widths min..max in `steps`, height = area // width."""
    resos = set()
    side = _floor(math.sqrt(max_area), steps)
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, _floor(max_area // width, steps))
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def _log_ar(w: float, h: float) -> float:
    # Distance in log space so 4:1 and 1:4 are equally far from 1:1.
    return math.log(w / h)


@dataclass(frozen=True)
class BucketSpec:
    """How one dataset's images are bucketed (built from DataOptions or a dataset TOML block)."""

    mode: str = "urae"
    resolution: tuple[int, int] = (2048, 2048)
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    steps: int = 64
    no_upscale: bool = False

    def buckets(self) -> list[Bucket]:
        w, h = self.resolution
        if self.mode == "urae":
            return urae_buckets(max(w, h))
        base = max(w, h)
        lo = self.min_bucket_reso or max(SIZE_MULTIPLE, _floor(base // 4, self.steps))
        hi = self.max_bucket_reso or base * 2
        return area_buckets(w * h, lo, hi, self.steps)

    def assign(self, width: int, height: int) -> Bucket | None:
        """The bucket for an image of this size, or None when it is too small to place without upscaling."""
        if width <= 0 or height <= 0:
            return None
        if self.mode == "area" and self.no_upscale:
            return self._area_no_upscale(width, height)
        target = _log_ar(width, height)
        best = min(self.buckets(), key=lambda b: (abs(_log_ar(*b) - target), -b[0] * b[1]))
        if not self.no_upscale or (width >= best[0] and height >= best[1]):
            return best
        return self._shrink_same_shape(best, width, height)

    def _min_side(self) -> int:
        return self.min_bucket_reso or SIZE_MULTIPLE

    def _shrink_same_shape(self, bucket: Bucket, width: int, height: int) -> Bucket | None:
        # The largest bucket of exactly the same aspect whose sides are multiples of 16 and fit inside
        # the image: (a*16*k, b*16*k) for the reduced ratio a:b.
        g = math.gcd(bucket[0], bucket[1])
        a, b = bucket[0] // g, bucket[1] // g
        unit_w, unit_h = a * SIZE_MULTIPLE, b * SIZE_MULTIPLE
        k = min(width // unit_w, height // unit_h)
        out = (unit_w * k, unit_h * k)
        return out if k > 0 and min(out) >= self._min_side() else None

    def _area_no_upscale(self, width: int, height: int) -> Bucket | None:
        # sd-scripts: a per-image bucket, the image (reduced to the max area if larger) floored to steps.
        w, h = self.resolution
        max_area = w * h
        if width * height > max_area:
            ar = width / height
            width, height = math.sqrt(max_area * ar), math.sqrt(max_area / ar)
        out = (_floor(width, self.steps), _floor(height, self.steps))
        return out if min(out) >= self._min_side() and min(out) > 0 else None


def resize_plan(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """Size to resize to so the image covers the bucket with its aspect kept (then crop the excess)."""
    bw, bh = bucket
    s = max(bw / width, bh / height)
    return max(bw, round(width * s)), max(bh, round(height * s))


def crop_offset(resized: tuple[int, int], bucket: Bucket, random_crop: bool, seed_text: str = "") -> tuple[int, int]:
    """(left, top) of the crop; random crops are seeded by `seed_text` so every rank and rerun agrees."""
    ex, ey = resized[0] - bucket[0], resized[1] - bucket[1]
    if not random_crop:
        return ex // 2, ey // 2
    rng = random.Random(seed_text)
    return rng.randint(0, ex), rng.randint(0, ey)


def bucket_table(assignments: Iterable[tuple[Bucket, int]], skipped: int = 0) -> str:
    """Summary table: bucket -> images and samples per epoch (images x repeats)."""
    images: dict[Bucket, int] = {}
    samples: dict[Bucket, int] = {}
    for bucket, repeats in assignments:
        images[bucket] = images.get(bucket, 0) + 1
        samples[bucket] = samples.get(bucket, 0) + repeats
    rows = [f"{'bucket (WxH)':>14} {'aspect':>7} {'images':>7} {'samples':>8}"]
    for b in sorted(images, key=lambda b: (b[0] / b[1], b[0] * b[1])):
        rows.append(f"{b[0]:>6}x{b[1]:<7} {b[0] / b[1]:>7.3f} {images[b]:>7} {samples[b]:>8}")
    rows.append(f"{'total':>14} {'':>7} {sum(images.values()):>7} {sum(samples.values()):>8}")
    if skipped:
        rows.append(f"skipped (too small for any bucket without upscaling): {skipped}")
    return "\n".join(rows)
