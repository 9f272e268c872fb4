"""Datasets users have: an image folder with .txt/.json side files, or an sd-scripts dataset TOML.

Scanning reads only image headers (size, EXIF orientation) and side files, so it is cheap enough to
repeat at every start; pixels are decoded only when a latent is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from urae.data.buckets import Bucket, BucketSpec
from urae.data.options import DataOptions, parse_resolution

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_VARIANTS = ("prompt", "generated_prompt")  # keys of the URAE .json side files
# Side files tried, in this order, when no caption_extension is set (the first that exists is read).
CAPTION_EXTENSIONS = (".txt", ".json", ".caption")
DEFAULT_CACHE_FOLDER = ".urae_cache"
# Above this enlargement an image mostly adds interpolated pixels: worth a warning at 2K/4K.
UPSCALE_WARN = 1.5

# sd-scripts dataset-TOML keys: those we use, and those that have no meaning here (warned, not fatal).
_DATASET_KEYS = {"resolution", "bucket_mode", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"}
_SUBSET_KEYS = {"image_dir", "caption_extension", "num_repeats", "random_crop", "real_prompt_ratio"}
_IGNORED_KEYS = {
    "batch_size", "enable_bucket", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "color_aug",
    "flip_aug", "face_crop_aug_range", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "token_warmup_min", "token_warmup_step",
    "class_tokens", "is_reg", "alpha_mask", "secondary_separator", "enable_wildcard", "cache_info",
    "validation_seed", "validation_split", "network_multiplier", "debug_dataset", "custom_attributes",
    "max_token_length", "conditioning_data_dir", "image_only",
}


@dataclass(frozen=True)
class Subset:
    """One image folder and how to read it."""

    image_dir: Path
    spec: BucketSpec
    caption_extension: str | None = None  # None: whichever of CAPTION_EXTENSIONS exists
    num_repeats: int = 1
    random_crop: bool = False
    real_prompt_ratio: float = 0.5
    cache_root: Path | None = None  # None -> <image_dir>/.urae_cache


@dataclass
class ImageItem:
    """One training image: where it is, its captions, and (after planning) its size and bucket."""

    path: Path
    subset: Subset
    captions: dict[str, str]
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF orientation
    bucket: Bucket | None = None

    @property
    def rel_path(self) -> Path:
        return self.path.relative_to(self.subset.image_dir)

    @property
    def cache_root(self) -> Path:
        return self.subset.cache_root or self.subset.image_dir / DEFAULT_CACHE_FOLDER


@dataclass
class ScanResult:
    items: list[ImageItem]
    undecodable: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)
    too_small: list[Path] = field(default_factory=list)
    missing_captions: int = 0  # images with no caption side file
    bad_captions: list[tuple[Path, str]] = field(default_factory=list)  # (side file, why): empty or unreadable
    upscaled: list[tuple[Path, float]] = field(default_factory=list)  # (image, factor) above UPSCALE_WARN


def bucket_spec(options: DataOptions, overrides: dict | None = None) -> BucketSpec:
    o = {**options.to_dict(), **(overrides or {})}
    steps = int(o["bucket_reso_steps"])
    if steps % 16:
        raise ValueError(f"bucket_reso_steps must be a multiple of 16 for FLUX, got {steps}")
    if o["bucket_mode"] not in ("urae", "area"):
        raise ValueError(f"bucket_mode must be 'urae' or 'area', got {o['bucket_mode']!r}")
    return BucketSpec(mode=o["bucket_mode"], resolution=parse_resolution(o["resolution"]),
                      min_bucket_reso=o["min_bucket_reso"], max_bucket_reso=o["max_bucket_reso"],
                      steps=steps, no_upscale=bool(o["bucket_no_upscale"]))


def subsets_from_options(options: DataOptions) -> list[Subset]:
    cache_root = Path(options.cache_dir) if options.cache_dir else None
    if options.dataset_config:
        return subsets_from_toml(options.dataset_config, options)
    if not options.train_data_dir:
        raise ValueError("no data: set train_data_dir (an image folder) or dataset_config (an sd-scripts dataset TOML)")
    d = Path(options.train_data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"train_data_dir {d} is not a folder")
    return [Subset(d.resolve(), bucket_spec(options), options.caption_extension, 1, options.random_crop,
                   float(options.real_prompt_ratio), _subset_cache_root(cache_root, d))]


def _subset_cache_root(cache_root: Path | None, image_dir: Path) -> Path | None:
    # One folder per image folder (named by its path, not its position in a TOML), so two folders
    # holding "0001.png" never share a cache file and reordering subsets keeps the caches.
    if cache_root is None:
        return None
    image_dir = image_dir.resolve()
    return cache_root / f"{image_dir.name}-{hashlib.sha1(str(image_dir).encode()).hexdigest()[:8]}"


def subsets_from_toml(path: str | os.PathLike, options: DataOptions) -> list[Subset]:
    """Read an sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]).

    Lookup order for a key: subset, then dataset, then [general], then `options`.
    """
    from urae import tomlfile

    path = Path(path)
    cfg = tomlfile.load(path)
    general = cfg.get("general", {})
    datasets = cfg.get("datasets", [])
    if not datasets:
        raise ValueError(f"{path}: no [[datasets]] entries")
    ignored: set[str] = set()
    unknown: set[str] = set()

    def check(block: dict, allowed: set[str], where: str):
        for k in block:
            if k in allowed or k in ("subsets",):
                continue
            (ignored if k in _IGNORED_KEYS else unknown).add(f"{where}.{k}")

    check(general, _DATASET_KEYS | _SUBSET_KEYS - {"image_dir"}, "general")
    cache_root = Path(options.cache_dir) if options.cache_dir else None
    out: list[Subset] = []
    for di, ds in enumerate(datasets):
        check(ds, _DATASET_KEYS | _SUBSET_KEYS - {"image_dir"}, f"datasets[{di}]")
        dataset_level = {**general, **{k: v for k, v in ds.items() if k != "subsets"}}
        spec = bucket_spec(options, {k: v for k, v in dataset_level.items() if k in _DATASET_KEYS})
        subsets = ds.get("subsets", [])
        if not subsets:
            raise ValueError(f"{path}: datasets[{di}] has no [[datasets.subsets]]")
        for si, sub in enumerate(subsets):
            check(sub, _SUBSET_KEYS | {"metadata_file"}, f"datasets[{di}].subsets[{si}]")
            merged = {**dataset_level, **sub}
            if "image_dir" not in merged:
                raise ValueError(f"{path}: datasets[{di}].subsets[{si}] has no image_dir "
                                 "(metadata_file-only fine-tuning subsets are not supported)")
            image_dir = Path(merged["image_dir"]).expanduser()  # one rule for every path: relative to the cwd
            if not image_dir.is_dir():
                beside = path.parent / image_dir
                hint = (f"; relative paths are relative to the current folder ({Path.cwd()}), not to the TOML: "
                        f"write {beside.resolve()}" if not image_dir.is_absolute() and beside.is_dir() else "")
                raise FileNotFoundError(f"{path}: image_dir {merged['image_dir']} is not a folder{hint}")
            ext = merged.get("caption_extension", options.caption_extension)
            if ext is not None and not ext.startswith("."):
                ext = "." + ext
            ratio = float(merged.get("real_prompt_ratio", options.real_prompt_ratio))
            if not 0 <= ratio <= 1:
                raise ValueError(f"{path}: real_prompt_ratio must be in [0, 1], got {ratio}")
            repeats = int(merged.get("num_repeats", 1))
            if repeats < 1:
                raise ValueError(f"{path}: num_repeats must be >= 1, got {repeats}")
            out.append(Subset(image_dir.resolve(), spec, ext, repeats,
                              bool(merged.get("random_crop", options.random_crop)), ratio,
                              _subset_cache_root(cache_root, image_dir)))
    if ignored:
        logger.warning("%s: keys with no effect in URAE training, ignored: %s", path, ", ".join(sorted(ignored)))
    if unknown:
        logger.warning("%s: unknown keys, ignored (typo?): %s", path, ", ".join(sorted(unknown)))
    return out


def find_images(root: Path) -> list[Path]:
    """Images under `root`, nested folders included, hidden folders (caches) skipped; sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(out)


def caption_file(image: Path, extension: str | None) -> Path | None:
    """The image's caption side file: `extension`'s, or the first of CAPTION_EXTENSIONS that exists."""
    for ext in (extension,) if extension else CAPTION_EXTENSIONS:
        side = image.with_suffix(ext)
        if side.is_file():
            return side
    return None


class CaptionError(ValueError):
    """A caption file that exists but gives no caption (empty, unreadable, JSON without a prompt)."""


def read_captions(image: Path, extension: str | None = None) -> dict[str, str] | None:
    """Caption variants from the side file; None if there is none. CaptionError if it exists but holds none."""
    side = caption_file(image, extension)
    if side is None:
        return None
    try:
        text = side.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionError(f"unreadable ({type(e).__name__})") from None
    if side.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise CaptionError("not valid JSON") from None
        caps = {k: str(data[k]).strip() for k in CAPTION_VARIANTS if isinstance(data, dict) and data.get(k)}
        caps = {k: v for k, v in caps.items() if v}
        if not caps:
            raise CaptionError(f"no {' or '.join(CAPTION_VARIANTS)} in it")
        return caps
    # Multi-line .txt captions are joined: a long VLM caption split over lines stays whole.
    caption = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not caption:
        raise CaptionError("empty")
    return {"prompt": caption}


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be used (EXIF rotation applied), from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def scan(options: DataOptions, log: bool = True) -> ScanResult:
    """Find every image, read its captions and size, and give it a bucket. Never fatal per file.

    log: emit the warnings (missing captions, skipped files); off on all but one rank.
    """
    result = ScanResult(items=[])
    for subset in subsets_from_options(options):
        for p in find_images(subset.image_dir):
            try:
                size = image_size(p)
            except Exception as e:  # PIL raises several types for unreadable files
                result.undecodable.append((p, f"{type(e).__name__}: {e}"))
                continue
            try:
                caps = read_captions(p, subset.caption_extension)
                result.missing_captions += caps is None
            except CaptionError as e:
                result.bad_captions.append((caption_file(p, subset.caption_extension), str(e)))
                caps = None
            caps = caps or {"prompt": ""}
            bucket = subset.spec.assign(*size)
            if bucket is None:
                result.too_small.append(p)
                continue
            result.items.append(ImageItem(p, subset, caps, size, bucket))
            factor = upscale_factor(size, bucket)
            if factor > UPSCALE_WARN:
                result.upscaled.append((p, factor))
    if log:
        _warn(result)
    if not result.items:
        where = options.dataset_config or options.train_data_dir
        raise ValueError(f"empty dataset: no usable images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}")
    return result


def upscale_factor(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """How much the image is enlarged to cover its bucket (<= 1: only shrunk)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def _warn(result: ScanResult) -> None:
    if result.upscaled:
        worst, factor = max(result.upscaled, key=lambda x: x[1])
        logger.warning("%s of %s images are upscaled more than %.1f× to fit their bucket (most: %.2f×, %s); "
                       "an enlarged image teaches its blur at the training resolution: use images at least that "
                       "large (the 2K recipe's are 2048 px, the 4K recipe's ≥ 4096 px), or bucket_no_upscale = true "
                       "to give them smaller buckets instead", f"{len(result.upscaled):,}", f"{len(result.items):,}", UPSCALE_WARN,
                       factor, worst)
    if result.missing_captions:
        logger.warning("%d image(s) have no caption file; an empty caption is used for them", result.missing_captions)
    if result.bad_captions:
        logger.warning("%d caption file(s) give no caption; an empty caption is used for their images:\n  %s",
                       len(result.bad_captions), "\n  ".join(f"{p}: {why}" for p, why in result.bad_captions[:20])
                       + (f"\n  … and {len(result.bad_captions) - 20} more" if len(result.bad_captions) > 20 else ""))
    if result.undecodable:
        logger.warning("skipped %d image(s) that could not be decoded:\n  %s", len(result.undecodable),
                       "\n  ".join(f"{p}: {why}" for p, why in result.undecodable))
    if result.too_small:
        logger.warning("skipped %d image(s) too small for any bucket without upscaling (bucket_no_upscale):\n  %s",
                       len(result.too_small), "\n  ".join(map(str, result.too_small)))
