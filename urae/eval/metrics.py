"""The metrics, each a small class: a name, the model it needs (None: weight-free), and `score`.

Image metrics score each image (and, where it means something, its native-resolution tiles); set metrics
compare a set of images with a reference set (FID's role), on whole images and on tiles. Columns ending in
`@tiles` are the tiled protocol of 4K evaluation: non-overlapping tiles at native resolution, so a model sees
the pixels a person sees at 100 %.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from PIL import Image

from urae.eval import distances, models, spectrum
from urae.eval.models import EvalError


@dataclasses.dataclass
class Item:
    """One image to score: its file, the prompt it was made from (if known), its group (folder or variant) and
    the row it belongs to (the same prompt and seed across groups)."""

    path: Path
    group: str
    key: str
    prompt: str | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def image(self) -> Image.Image:
        with Image.open(self.path) as im:
            return im.convert("RGB")


def tile_images(image: Image.Image, size: int) -> list[Image.Image]:
    return [image.crop(box) for box in spectrum.tiles(image.width, image.height, size)]


class Metric:
    name = ""
    model_id: str | None = None
    columns: tuple[str, ...] = ()
    lower_is_better: tuple[str, ...] = ()  # columns where smaller is better (distances)
    needs_prompt = False
    needs_reference = False

    def __init__(self, model_id: str | None = None):
        if model_id is not None:
            self.model_id = model_id

    def model_ids(self) -> list[str]:
        return [self.model_id] if self.model_id else []

    def check(self) -> None:
        """Everything this metric needs is here or can be fetched; before any slow work."""
        for m in self.model_ids():
            models.check_available(m, self.name)

    def describe(self) -> str:
        return f"{self.name} ({self.model_id})" if self.model_id else f"{self.name} (no weights)"


class ImageMetric(Metric):
    def score(self, items: list[Item], tile: int) -> list[dict[str, float]]:
        raise NotImplementedError


class SetMetric(Metric):
    needs_reference = True
    lower_is_better = ()

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        raise NotImplementedError

    def embed(self, items: list[Item], tile: int) -> dict[str, torch.Tensor]:
        """Features of the whole images and of all their tiles (one image in memory at a time for the tiles)."""
        whole, tiled = [], []
        for it in items:
            im = it.image()
            whole.append(self.features([im]))
            tiled.append(self.features(tile_images(im, tile)))
        return {self.name: torch.cat(whole), f"{self.name}@tiles": torch.cat(tiled)}

    def score_sets(self, groups: dict[str, list[Item]], reference: list[Item], tile: int) -> dict[str, dict]:
        ref = self.embed(reference, tile)
        out = {}
        for name, items in groups.items():
            feats = ref if items is reference else self.embed(items, tile)  # compare's reference is one of the groups
            out[name] = {col: (self.distance(feats[col], ref[col]) if min(len(feats[col]), len(ref[col])) >= 2
                               else float("nan")) for col in self.columns}
        return out


class Detail(ImageMetric):
    """Weight-free real detail: effective resolution and high-frequency share (urae.eval.spectrum)."""

    name = "detail"
    columns = ("effective_resolution", "effective_resolution@tiles", "hf_share", "hf_share@tiles")

    def score(self, items, tile):
        return [spectrum.detail(it.image(), tile) for it in items]


class ClipScore(ImageMetric):
    """100 · max(cos(image, prompt), 0) in CLIP's joint space (torchmetrics' CLIPScore)."""

    name = "clip_score"
    model_id = "openai/clip-vit-large-patch14"
    columns = ("clip_score",)
    needs_prompt = True
    processor_id: str | None = None

    def score(self, items, tile):
        parts = models.clip(self.model_id, self.processor_id, self.name)
        img = torch.nn.functional.normalize(models.clip_image_embeds(parts, [it.image() for it in items]), dim=-1)
        txt = torch.nn.functional.normalize(models.clip_text_embeds(parts, [it.prompt for it in items]), dim=-1)
        cos = (img * txt).sum(-1)
        return [{self.columns[0]: self._value(c, parts[0])} for c in cos.tolist()]

    def _value(self, cos: float, model) -> float:
        return 100.0 * max(cos, 0.0)


class PickScore(ClipScore):
    """PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on human preferences; logit_scale · cos."""

    name = "pickscore"
    model_id = "yuvalkirstain/PickScore_v1"
    processor_id = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    columns = ("pickscore",)

    def __init__(self, model_id: str | None = None):
        super().__init__(model_id)
        if model_id is not None and Path(model_id).expanduser().is_dir():
            self.processor_id = None  # a local folder carries its own processor

    def model_ids(self):
        return [self.model_id] + ([self.processor_id] if self.processor_id else [])

    def _value(self, cos, model):
        return float(model.logit_scale.detach().exp()) * cos


class FdDinov2(SetMetric):
    """Fréchet distance in DINOv2 features (Stein et al. 2023: a better judge of generated images than FID)."""

    name = "fd_dinov2"
    model_id = "facebook/dinov2-large"
    columns = ("fd_dinov2", "fd_dinov2@tiles")
    lower_is_better = columns

    def features(self, images):
        return models.dinov2_features(models.dinov2(self.model_id, self.name), images)

    def distance(self, a, b):
        return distances.frechet_distance(a, b)


class Cmmd(SetMetric):
    """CMMD (Jayasumana et al. 2024): MMD on CLIP embeddings, no Gaussian assumption, unbiased at small sets."""

    name = "cmmd"
    model_id = "openai/clip-vit-large-patch14-336"
    columns = ("cmmd", "cmmd@tiles")
    lower_is_better = columns

    def features(self, images):
        return models.clip_image_embeds(models.clip(self.model_id, None, self.name), images)

    def distance(self, a, b):
        return distances.cmmd(a, b)


class Pyiqa(ImageMetric):
    """No-reference quality through pyiqa (an optional extra: it needs torchvision), whole image and tiles."""

    model_id = None

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.columns = (name, f"{name}@tiles")
        self._metric = None

    def available(self) -> str | None:
        """None when pyiqa imports, else why not (one line)."""
        try:
            import pyiqa  # noqa: F401
        except Exception as e:  # ImportError, or torchvision's operators missing from this torch build
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    def score(self, items, tile):
        import numpy as np
        import pyiqa

        if self._metric is None:
            self._metric = pyiqa.create_metric(self.name, device=models.default_device())

        def run(im):
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
            return float(self._metric(x.to(models.default_device())))

        out = []
        for it in items:
            im = it.image()
            ts = [run(t) for t in tile_images(im, tile)]
            out.append({self.name: run(im), f"{self.name}@tiles": sum(ts) / len(ts)})
        return out


REGISTRY = {"detail": Detail, "clip_score": ClipScore, "pickscore": PickScore, "fd_dinov2": FdDinov2, "cmmd": Cmmd}
PYIQA = ("maniqa", "qualiclip", "musiq")


def make_metrics(names: list[str], overrides: dict[str, str] | None = None, say=print) -> list[Metric]:
    """Metric objects by name; pyiqa ones are skipped with one line when pyiqa cannot be imported."""
    overrides = overrides or {}
    for k in overrides:
        if k not in REGISTRY or REGISTRY[k].model_id is None:
            raise EvalError(f"--metric_model {k}=…: {k} is not a metric with a model "
                            f"({', '.join(n for n, c in REGISTRY.items() if c.model_id)})")
    out: list[Metric] = []
    for name in names:
        if name in PYIQA:
            m = Pyiqa(name)
            why = m.available()
            if why:
                say(f"skipping {name}: pyiqa is not usable here ({why}); `pip install pyiqa` adds it (it needs "
                    f"torchvision)")
                continue
            out.append(m)
        elif name in REGISTRY:
            out.append(REGISTRY[name](overrides.get(name)))
        else:
            from urae.common import did_you_mean

            raise EvalError(f"unknown metric {name!r}{did_you_mean(name, [*REGISTRY, *PYIQA])}; known: "
                            f"{', '.join([*REGISTRY, *PYIQA])}")
    return out


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise EvalError(f"--metric_model {item!r}: expected NAME=MODEL (a hub id or a local folder)")
        out[key.strip()] = os.path.expanduser(value.strip())
    return out
