"""Validation during training: fixed prompts and seeds at the training resolution every N steps, scored with
image metrics (default: the weight-free ones, so nothing is downloaded unasked), logged as `validation/<column>`
to train_log.jsonl and TensorBoard. `flux_urae_eval.py report OUT_DIR` turns the images into the HTML report
with a curve per metric.

Images go to `<output_dir>/validation/<step:07d>_<k:02d>.png` (prompt, seed and step in their PNG text chunks).
"""

from __future__ import annotations

from pathlib import Path

from urae.config import ConfigError
from urae.eval.metrics import ImageMetric, Item, make_metrics
from urae.eval.models import EvalError

FOLDER = "validation"
DEFAULT_METRICS = "detail"
TILE = 1024


def metric_names(cfg) -> list[str]:
    return [n.strip() for n in (cfg.get("validation_metrics") or DEFAULT_METRICS).split(",") if n.strip()]


def metrics_for(cfg, say=print) -> list[ImageMetric]:
    """The validation metrics, checked: image metrics only (a set distance needs a reference set), weights present."""
    try:
        metrics = make_metrics(metric_names(cfg), say=say)
        for m in metrics:
            if not isinstance(m, ImageMetric):
                raise EvalError(f"{m.name} compares sets with a reference set; score the validation images afterwards "
                                f"with flux_urae_eval.py score {cfg['output_dir']}/{FOLDER} --reference DIR")
            m.check()
    except EvalError as e:
        raise ConfigError(f"validation_metrics: {e}") from None
    return metrics


def check(cfg: dict) -> None:
    """Before any model loads: the prompts read and fit, the metrics exist and their weights are here."""
    from urae.data.options import parse_resolution
    from urae.prompts import read_prompts
    from urae.runtime import check_resolution

    if not cfg["validation_every_n_steps"]:
        return
    if not cfg["validation_prompts"]:
        raise ConfigError("validation_every_n_steps needs validation_prompts (a prompts file, e.g. "
                          "presets/eval_prompts.txt)")
    try:
        w, h = parse_resolution(cfg["resolution"])
        for rec in read_prompts(cfg["validation_prompts"]):
            check_resolution(rec.get("width", w), rec.get("height", h))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"validation_prompts: {e}") from e
    metrics_for(cfg, say=lambda line: None)


def records(cfg) -> list[dict]:
    """The validation prompts as sample records (marked, so the trainer keeps them apart from its samples)."""
    from urae.prompts import read_prompts

    if not (cfg.get("validation_prompts") and cfg.get("validation_every_n_steps")):
        return []
    return [{**r, "validation": True} for r in read_prompts(cfg["validation_prompts"])]


def step_items(out_dir: Path, step: int) -> list[Item]:
    from urae.eval.collect import _png_info, row_key

    items = []
    for p in sorted((Path(out_dir) / FOLDER).glob(f"{step:07d}_*.png")):
        info = _png_info(p)
        items.append(Item(p, f"step {step}", row_key(info.get("prompt"), info.get("seed"), p.stem.split("_", 1)[1]),
                          info.get("prompt"), info))
    return items


def score_step(metrics: list[ImageMetric], out_dir: Path, step: int) -> dict[str, float]:
    """Mean of each metric column over this step's validation images, as `validation/<column>`."""
    from urae.eval.scoring import score

    items = step_items(out_dir, step)
    if not items:
        return {}
    s = score({f"step {step}": items}, metrics, TILE, progress=False)
    return {f"validation/{k}": v for k, v in s.per_group[f"step {step}"].items() if k != "images"}
