"""The data options: exactly the config keys of the data section, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from urae.common import did_you_mean

BUCKET_MODES = ("urae", "area")
# FLUX needs multiples of 16: 8x VAE downscale times the transformer's 2x2 patches.
SIZE_MULTIPLE = 16


@dataclass
class DataOptions:
    """Data/caching settings (sd-scripts names where one exists).

    resolution: the base size; URAE buckets put the long side at this size, area buckets keep
        about resolution² pixels. An int, or "W,H" / [W, H] (area = W*H; URAE uses max(W, H)).
    min_bucket_reso / max_bucket_reso: area-bucket side limits; None -> resolution // 4 and
        resolution * 2 (so 4:1 buckets exist, as in the URAE set). Also the smallest side an
        image may end at when `bucket_no_upscale` shrinks its bucket.
    bucket_no_upscale: never enlarge an image; one smaller than its bucket gets a smaller bucket of
        the same shape instead.
    random_crop: crop at a random offset instead of the centre; the offset is drawn once per
        image (seeded by its path) when the latent is cached, and recorded in the cache.
    caption_extension: the caption side file's extension; None reads whichever of .txt, .json (keys
        `prompt` / `generated_prompt`, the public URAE data) and .caption exists, in that order.
    cache_dir: where caches go; None -> a `.urae_cache` folder inside each image folder.
    cache_only: build the caches and stop (the trainer reads it).
    """

    train_data_dir: str | None = None
    dataset_config: str | None = None
    caption_extension: str | None = None  # None: whichever of .txt / .json / .caption exists
    real_prompt_ratio: float = 0.5
    resolution: Any = 2048
    bucket_mode: str = "urae"
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    random_crop: bool = False
    cache_dir: str | None = None
    cache_only: bool = False

    def __post_init__(self):
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension
        if not 0.0 <= float(self.real_prompt_ratio) <= 1.0:
            raise ValueError(f"real_prompt_ratio must be in [0, 1], got {self.real_prompt_ratio}")
        if self.bucket_mode not in BUCKET_MODES:
            raise ValueError(f"bucket_mode must be one of {BUCKET_MODES}, got {self.bucket_mode!r}")
        if self.bucket_reso_steps % SIZE_MULTIPLE:
            raise ValueError(f"bucket_reso_steps must be a multiple of {SIZE_MULTIPLE} for FLUX, got {self.bucket_reso_steps}")
        parse_resolution(self.resolution)
        if self.train_data_dir and self.dataset_config:
            raise ValueError("give either train_data_dir or dataset_config, not both")

    @classmethod
    def from_dict(cls, d: dict) -> DataOptions:
        """Build from a config mapping; an unknown key is an error that names the valid keys."""
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                hints.append(f"{k!r}{did_you_mean(k, known)}")
            raise ValueError(f"unknown data option(s): {', '.join(hints)}; valid keys: {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_resolution(value) -> tuple[int, int]:
    """int, "W,H", "WxH" or [W, H] -> (W, H), each a positive multiple of 16."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        value = [int(p) for p in parts]
    if isinstance(value, int):
        w = h = value
    elif isinstance(value, (list, tuple)) and len(value) in (1, 2):
        w, h = (int(value[0]), int(value[-1]))
    else:
        raise ValueError(f"resolution must be an int or 'W,H', got {value!r}")
    if w <= 0 or h <= 0 or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
        raise ValueError(f"resolution must be positive multiples of {SIZE_MULTIPLE}, got {w}x{h}")
    return w, h
