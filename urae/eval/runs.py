"""flux_urae_eval.py report OUT_DIR: a training run's validation images as the HTML report, one column per step,
with a curve per metric from its train_log.jsonl. The table shows the values logged during training; with
--metrics the images are scored again (per image too) with the metrics named."""

from __future__ import annotations

import json
from pathlib import Path

from urae.config import Option, resolve
from urae.eval.cli import split_positionals
from urae.eval.metrics import make_metrics
from urae.eval.models import EvalError

OPTIONS = [
    Option("metrics", str, None, "score the images again with these metrics (default: show the values logged "
           "during training)"),
    Option("tile", int, 1024, "side of the native-resolution tiles of the @tiles columns (with --metrics)"),
    Option("output_dir", str, None, "where report.html, scores.csv and scores.json go (default OUT_DIR/report)"),
]


def logged_values(run: Path) -> dict[int, dict[str, float]]:
    """step -> {column: value} of the validation rows of train_log.jsonl (a resumed run's rows replace older ones)."""
    out: dict[int, dict[str, float]] = {}
    log = run / "train_log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            vals = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("validation/")}
            if vals:
                out[int(row["step"])] = vals
    return out


def report_main(argv: list[str]) -> int:
    from urae.eval.report import write_all
    from urae.eval.scoring import Scores, score
    from urae.eval.validation import FOLDER, metric_names, step_items

    runs, flags = split_positionals(argv)
    cfg = resolve(OPTIONS, flags, "flux_urae_eval.py report", "A training run's validation images and curves as HTML.")
    if len(runs) != 1:
        raise EvalError("give one training output folder: flux_urae_eval.py report OUT_DIR")
    run = Path(runs[0]).expanduser()
    folder = run / FOLDER
    if not folder.is_dir():
        raise EvalError(f"{run}: no {FOLDER}/ folder; train with validation_prompts and validation_every_n_steps")
    steps = sorted({int(p.name.split("_", 1)[0]) for p in folder.glob("*.png") if p.name.split("_", 1)[0].isdigit()})
    if not steps:
        raise EvalError(f"{folder}: no validation images")
    logged = logged_values(run)
    groups = {f"step {s}": step_items(run, s) for s in steps}
    out = Path(cfg["output_dir"] or run / "report")
    if cfg["metrics"]:
        from urae.eval.cli import choose_metrics

        metrics = choose_metrics({**cfg, "reference": None, "metric_model": []}, True, False)
        print(f"scoring {sum(map(len, groups.values()))} validation image(s) of {len(steps)} step(s) with "
              f"{', '.join(m.describe() for m in metrics)} -> {out}", flush=True)
        scores = score(groups, metrics, cfg["tile"])
    else:
        train_cfg = run / "train_config.toml"
        names = ["detail"]
        if train_cfg.is_file():
            from urae.config import read_toml

            names = metric_names(read_toml(train_cfg))
        metrics = make_metrics(names, say=lambda line: None)
        per_group = {f"step {s}": {"images": len(groups[f"step {s}"]), **logged.get(s, {})} for s in steps}
        items = [it for its in groups.values() for it in its]
        scores = Scores(metrics, list(groups), items, {}, per_group, {})
        print(f"report of {len(items)} validation image(s) of {len(steps)} step(s), values logged in "
              f"{run / 'train_log.jsonl'} -> {out}", flush=True)
    for g in scores.groups:
        scores.settings[g] = {k: v for k, v in groups[g][0].info.items() if k in ("runtime", "width", "height")}
    columns = list(dict.fromkeys(k for vals in logged.values() for k in vals))
    curves = {c: [(s, logged[s][c]) for s in sorted(logged) if c in logged[s]] for c in columns}
    page = write_all(scores, out, f"Validation of {run.name}", note=f"{len(steps)} step(s): {steps[0]} to {steps[-1]}",
                     curves=curves)
    print(f"wrote {page}, {out / 'scores.csv'}, {out / 'scores.json'}")
    return 0
