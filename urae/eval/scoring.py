"""Run the metrics over groups of images (folders, variants or training steps) -> one `Scores` table."""

from __future__ import annotations

import dataclasses
import math

from urae.eval.metrics import ImageMetric, Item, Metric, SetMetric

CHUNK = 8  # images per metric call: the progress bar moves, the models still batch


@dataclasses.dataclass
class Scores:
    metrics: list[Metric]
    groups: list[str]  # column order of the report
    items: list[Item]
    per_image: dict[tuple[str, str], dict[str, float]]  # (group, row key) -> column -> value
    per_group: dict[str, dict[str, float]]
    settings: dict[str, dict]

    def columns(self) -> list[dict]:
        return [{"column": c, "metric": m.name, "model": m.model_id, "lower_is_better": c in m.lower_is_better,
                 "per_image": isinstance(m, ImageMetric)} for m in self.metrics for c in m.columns]

    def rows(self) -> list[str]:
        """Row keys in first-seen order."""
        return list(dict.fromkeys(it.key for it in self.items))

    def to_json(self) -> dict:
        return {
            "metrics": [{"name": m.name, "model": m.model_id, "columns": list(m.columns)} for m in self.metrics],
            "columns": self.columns(),
            "groups": {g: {"settings": self.settings.get(g, {}), "scores": _clean(self.per_group.get(g, {}))}
                       for g in self.groups},
            "images": [{"group": it.group, "row": it.key, "file": str(it.path), "prompt": it.prompt,
                        "seed": it.info.get("seed"), "scores": _clean(self.per_image.get((it.group, it.key), {}))}
                       for it in self.items],
        }


def _clean(d: dict) -> dict:
    """JSON has no NaN: a value that could not be computed (a set of one image) is null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def score(groups: dict[str, list[Item]], metrics: list[Metric], tile: int, reference: list[Item] | None = None,
          settings: dict[str, dict] | None = None, progress: bool = True) -> Scores:
    from tqdm.auto import tqdm

    items = [it for its in groups.values() for it in its]
    image_metrics = [m for m in metrics if isinstance(m, ImageMetric)]
    set_metrics = [m for m in metrics if isinstance(m, SetMetric)] if reference else []
    per_image: dict[tuple[str, str], dict[str, float]] = {(it.group, it.key): {} for it in items}
    work = len(items) * len(image_metrics) + (len(items) + len(reference or [])) * len(set_metrics)
    bar = tqdm(total=work, unit="image", desc="scoring", disable=not progress or work == 0)
    for m in image_metrics:
        use = [it for it in items if it.prompt is not None] if m.needs_prompt else items
        bar.update(len(items) - len(use))
        for i in range(0, len(use), CHUNK):
            chunk = use[i:i + CHUNK]
            for it, values in zip(chunk, m.score(chunk, tile)):
                per_image[(it.group, it.key)].update(values)
            bar.update(len(chunk))
    per_group: dict[str, dict[str, float]] = {}
    for g, its in groups.items():
        cols = {c for m in image_metrics for c in m.columns}
        per_group[g] = {"images": len(its)}
        for c in sorted(cols, key=[c for m in image_metrics for c in m.columns].index):
            vals = [per_image[(it.group, it.key)][c] for it in its if c in per_image[(it.group, it.key)]]
            per_group[g][c] = sum(vals) / len(vals) if vals else float("nan")
    for m in set_metrics:
        for g, values in m.score_sets(groups, reference, tile).items():
            per_group[g].update(values)
        bar.update(len(items) + len(reference))
    bar.close()
    return Scores(metrics, list(groups), items, per_image, per_group, settings or {})
