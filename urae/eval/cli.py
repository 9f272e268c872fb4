"""flux_urae_eval.py: score folders of images, compare generation settings or adapters, report a training run.

    flux_urae_eval.py score FOLDER... [--reference DIR] [--metrics detail,clip_score,…]
    flux_urae_eval.py compare --model M --prompts_file P --variant "name: --lora a.safetensors" --variant …
    flux_urae_eval.py report OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from urae.config import ConfigError, Option, resolve
from urae.eval.metrics import EvalError, make_metrics, parse_overrides

MODES = ("score", "compare", "report")
DEFAULT_METRICS = ("detail", "clip_score", "pickscore")
SET_METRICS = ("fd_dinov2", "cmmd")

COMMON = [
    Option("metrics", str, None, "comma-separated: detail (weight-free), clip_score, pickscore, fd_dinov2, cmmd, and "
           "pyiqa's maniqa, qualiclip, musiq when pyiqa is installed (default: detail, clip_score, pickscore; "
           "plus fd_dinov2 and cmmd with --reference)"),
    Option("reference", str, None, "folder of reference images (teacher outputs, real photos) for fd_dinov2 and cmmd"),
    Option("tile", int, 1024, "side of the native-resolution tiles of the @tiles columns"),
    Option("metric_model", list, [], "NAME=MODEL: another hub id or local folder for a metric's model "
           "(e.g. clip_score=openai/clip-vit-base-patch16)", repeat=True),
    Option("output_dir", str, None, "where report.html, scores.csv and scores.json go"),
]

SCORE = COMMON + [Option("prompts", str, None, "prompts of plain folders: a JSONL of {\"file\", \"prompt\"}, or one "
                         "line per image in file-name order (our folders carry their own)")]


def split_positionals(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading arguments that are not flags (folders), then the flags."""
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        i += 1
    return argv[:i], argv[i:]


def choose_metrics(cfg, have_prompts: bool, reference: bool, say=print, default=DEFAULT_METRICS):
    """The metric objects to run. Asked-for metrics that cannot run are mistakes; defaults that cannot are dropped
    with a line."""
    asked = cfg["metrics"] is not None
    names = [n.strip() for n in cfg["metrics"].split(",") if n.strip()] if asked else list(default)
    if not asked and reference:
        names += SET_METRICS
    metrics = make_metrics(names, parse_overrides(cfg["metric_model"]), say=say)
    out = []
    for m in metrics:
        if m.needs_prompt and not have_prompts:
            if asked:
                raise EvalError(f"metric {m.name} needs each image's prompt: score folders made by flux_urae_infer.py "
                                f"(images.jsonl), or give --prompts")
            say(f"skipping {m.name}: some images have no prompt (give --prompts)")
            continue
        if m.needs_reference and not reference:
            raise EvalError(f"metric {m.name} compares with a reference set: give --reference FOLDER")
        out.append(m)
    if not out:
        raise EvalError("no metric left to run")
    for m in out:
        m.check()
    return out


def _check_common(cfg) -> None:
    if cfg["tile"] < 16:
        raise EvalError(f"--tile must be >= 16, got {cfg['tile']}")


def score_main(argv: list[str]) -> int:
    from urae.eval.collect import collect_folder, read_prompts_file
    from urae.eval.report import write_all
    from urae.eval.scoring import score

    folders, flags = split_positionals(argv)
    cfg = resolve(SCORE, flags, "flux_urae_eval.py score", "Score folders of images: flux_urae_eval.py score FOLDER...")
    if not folders:
        raise EvalError("give one or more folders of images: flux_urae_eval.py score FOLDER...")
    _check_common(cfg)
    prompts = read_prompts_file(cfg["prompts"])
    groups, settings = {}, {}
    for f in folders:
        items, shared = collect_folder(f, prompts=prompts)
        name = items[0].group
        n = 2
        while name in groups:  # two folders of the same name from different places
            name = f"{items[0].group} ({n})"
            n += 1
        for it in items:
            it.group = name
        groups[name], settings[name] = items, shared
    reference = collect_folder(cfg["reference"], "reference")[0] if cfg["reference"] else None
    have_prompts = all(it.prompt for its in groups.values() for it in its)
    metrics = choose_metrics(cfg, have_prompts, reference is not None)
    out = Path(cfg["output_dir"] or "eval")
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output_dir {out} is a file, not a folder")
    n = sum(map(len, groups.values()))
    print(f"scoring {n} image(s) in {len(groups)} folder(s) with {', '.join(m.describe() for m in metrics)}; "
          f"tiles {cfg['tile']}²{f'; reference {len(reference)} image(s)' if reference else ''} -> {out}", flush=True)
    scores = score(groups, metrics, cfg["tile"], reference, settings)
    page = write_all(scores, out, "Image scores", note=f"{n} image(s) in {', '.join(groups)}")
    print_table(scores)
    print(f"wrote {page}, {out / 'scores.csv'}, {out / 'scores.json'}")
    return 0


def print_table(scores) -> None:
    """The per-group metric table on the terminal (the same numbers as the report's table)."""
    from urae.eval.report import _fmt

    cols = ["images"] + [c["column"] for c in scores.columns()]
    width = max(len(g) for g in scores.groups)
    widths = [max(len(c), 9) for c in cols]
    print(f"{'group':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for g in scores.groups:
        vals = scores.per_group.get(g, {})
        print(f"{g:<{width}}  " + "  ".join(f"{_fmt(vals.get(c)):>{w}}" for c, w in zip(cols, widths)))


def main(argv=None) -> int:
    """A user's mistake is one `error:` line and exit code 2; anything else is a bug and keeps its traceback."""
    from urae.adapters import AdapterError
    from urae.loading import ModelLoadError
    from urae.logs import setup_logging

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] not in MODES:
            if argv and argv[0] in ("-h", "--help"):
                print(__doc__)
                return 0
            raise EvalError(f"give a mode first: {', '.join(MODES)} (see flux_urae_eval.py --help)")
        mode, rest = argv[0], argv[1:]
        if mode == "score":
            return score_main(rest)
        if mode == "compare":
            from urae.eval.compare import compare_main

            return compare_main(rest)
        from urae.eval.runs import report_main

        return report_main(rest)
    except (ConfigError, EvalError, ModelLoadError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:  # on a line of its own: a progress bar may be cut mid-line
        print(f"\ninterrupted{' ' + str(e) if str(e) else ''}; images written so far are kept: run the same "
              f"command again to continue", file=sys.stderr, flush=True)
        return 130

