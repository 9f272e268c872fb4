"""flux_urae_eval.py compare: generate a grid of variants × prompts × seeds with flux_urae_infer.py's own code,
then score it and write the report.

Each variant is a name and the flags it adds to flux_urae_infer.py's command line (its parser checks them, so
every option it has works here); every variant gets the same prompts and seeds. Images already in a variant's
folder (its images.jsonl) are reused, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
from pathlib import Path

from urae.config import ConfigError, Option, resolve
from urae.eval.cli import COMMON, choose_metrics, print_table
from urae.eval.models import EvalError
from urae.io import atomic_path

OPTIONS = COMMON + [
    Option("model", str, None, "diffusers FLUX.1 folder or hub id (flux_urae_infer.py's --model)"),
    Option("prompts_file", str, None, "prompts, one a line with sd-scripts' flags, or JSONL (e.g. "
           "presets/eval_prompts.txt)"),
    Option("prompt", list, None, "a prompt (repeat for several)", repeat=True),
    Option("seeds", str, "0", "comma-separated seeds; every variant makes every prompt with each"),
    Option("variant", list, [], "\"NAME: FLAGS\": a column of the grid and the flux_urae_infer.py flags it adds, "
           "e.g. \"urae: --lora out/urae_4k.safetensors\" (repeat; \"base:\" adds none)", repeat=True),
    Option("infer_args", str, "", "flux_urae_infer.py flags every variant gets first, e.g. \"--steps 28 --width 2048 "
           "--height 2048\" (a variant's own flags win)"),
    Option("reference_variant", str, None, "use this variant's images as the reference set of fd_dinov2 and cmmd "
           "(e.g. a teacher model's)"),
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise EvalError(f"--variant {text!r}: expected \"NAME: FLAGS\" (e.g. \"urae: --lora a.safetensors\")")
    try:
        return name, shlex.split(flags)
    except ValueError as e:
        raise EvalError(f"--variant {name}: {e}") from None


def folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "variant"


def grid_records(cfg) -> list[dict]:
    """Every (prompt, seed) of the grid as a flux_urae_infer.py prompts-file record (a line's size and steps kept)."""
    from urae.prompts import read_prompts

    records = [{"prompt": p} for p in (cfg["prompt"] or [])]
    if cfg["prompts_file"]:
        try:
            records += read_prompts(cfg["prompts_file"])
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(str(e)) from None
    if not records:
        raise EvalError("no prompts: give --prompts_file FILE or --prompt TEXT")
    try:
        seeds = [int(s) for s in cfg["seeds"].split(",") if s.strip()]
    except ValueError:
        raise EvalError(f"--seeds {cfg['seeds']!r}: comma-separated integers") from None
    if not seeds:
        raise EvalError("--seeds: give at least one seed")
    return [{**rec, "seed": s} for rec in records for s in seeds]


def _done(folder: Path) -> dict[tuple[str, int], str]:
    """(prompt, seed) -> file of the images a variant already has (the last one wins)."""
    done = {}
    log = folder / "images.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill; its image is made again
            if isinstance(r, dict) and (folder / str(r.get("file"))).is_file():
                done[(r.get("prompt"), r.get("seed"))] = r["file"]
    return done


def compare_main(argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from urae import inference
    from urae.eval.collect import collect_folder
    from urae.eval.report import write_all
    from urae.eval.scoring import score

    cfg = resolve(OPTIONS, argv, "flux_urae_eval.py compare",
                  "Generate variants × prompts × seeds with flux_urae_infer.py's code, score them, write a report.")
    if not cfg["model"]:
        raise EvalError("give --model (a FLUX.1 folder or hub id)")
    if not cfg["variant"]:
        raise EvalError("give at least one --variant \"NAME: FLAGS\" (\"base:\" for the model alone)")
    out = Path(cfg["output_dir"] or "eval/compare")
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output_dir {out} is a file, not a folder")
    records = grid_records(cfg)
    variants = [parse_variant(v) for v in cfg["variant"]]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names) or len({folder_name(n) for n in names}) != len(names):
        raise EvalError(f"variant names must differ (also as folder names): {names}")
    if cfg["reference_variant"] is not None and cfg["reference_variant"] not in names:
        raise EvalError(f"--reference_variant {cfg['reference_variant']!r} is not one of the variants {names}")
    try:
        common = shlex.split(cfg["infer_args"])
    except ValueError as e:
        raise EvalError(f"--infer_args: {e}") from None
    for flag in ("--output_dir", "--prompt", "--prompts_file", "--num_images"):
        for name, flags in [("--infer_args", common), *variants]:
            if flag in flags:
                raise EvalError(f"{name}: {flag} is set by compare (its --output_dir, prompts and --seeds)")
    reference = cfg["reference"] or cfg["reference_variant"]
    metrics = choose_metrics(cfg, have_prompts=True, reference=bool(reference))  # weights found before generating

    # every variant's flags through flux_urae_infer.py's own parser and request checks, before anything loads
    plans = []
    for name, flags in variants:
        folder = out / "images" / folder_name(name)
        todo = folder / ".todo.jsonl"
        argv_v = ["--model", cfg["model"], *common, *flags, "--output_dir", str(folder), "--prompts_file", str(todo)]
        try:
            icfg = inference.parse(argv_v)
        except SystemExit as e:  # argparse's own one-line error was printed; name the variant too
            raise EvalError(f"variant {name}: flux_urae_infer.py refused its flags {shlex.join(flags)}") from e
        except ConfigError as e:
            raise EvalError(f"variant {name}: {e}") from None
        made_with = folder / "variant.json"
        if made_with.is_file() and json.loads(made_with.read_text())["flags"] != [*common, *flags]:
            raise EvalError(f"variant {name}: its images in {folder} were made with other flags "
                            f"({shlex.join(json.loads(made_with.read_text())['flags'])}); reusing them would mix "
                            f"settings: use another --output_dir, or another variant name")
        done = _done(folder)
        missing = [r for r in records if (r["prompt"], r["seed"]) not in done]
        plans.append((name, flags, folder, todo, icfg, missing))
    total = len(records) * len(variants)
    left = sum(len(p[-1]) for p in plans)
    print(f"compare: {len(variants)} variant(s) × {len(records)} prompt/seed pair(s) = {total} image(s), "
          f"{total - left} already made, {left} to generate; then {', '.join(m.describe() for m in metrics)} "
          f"-> {out}", flush=True)
    bar = tqdm(total=total, initial=total - left, unit="image", desc="grid")
    for k, (name, flags, folder, todo, icfg, missing) in enumerate(plans, 1):
        if not missing:
            continue
        bar.write(f"variant {k}/{len(plans)} {name}: {len(missing)} image(s) "
                  f"({shlex.join(flags) or 'no extra flags'})")
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "variant.json") as tmp:  # what its images were made with, for the next resume
            tmp.write_text(json.dumps({"name": name, "flags": [*common, *flags]}) + "\n")
        with atomic_path(todo) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in missing), encoding="utf-8")
        on_ctrl_c = signal.getsignal(signal.SIGINT)  # inference.run installs its own; scoring needs ours back
        try:
            inference.run(icfg)
        except ConfigError as e:
            raise EvalError(f"variant {name}: {e}") from None
        except inference.Interrupted as e:
            raise KeyboardInterrupt(f"in variant {name} {e}") from None
        finally:
            signal.signal(signal.SIGINT, on_ctrl_c)
            todo.unlink(missing_ok=True)
        bar.update(len(missing))
    bar.close()

    groups, settings = {}, {}
    for name, flags, folder, _todo, _icfg, _missing in plans:
        items, shared = collect_folder(folder, group=name)
        want = {(r["prompt"], r["seed"]) for r in records}
        keep = {}
        for it in items:  # only this grid's images; a repeated (prompt, seed) keeps the newest record
            if (it.prompt, it.info.get("seed")) in want:
                keep[it.key] = it
        order = {(r["prompt"], r["seed"]): i for i, r in enumerate(records)}
        groups[name] = sorted(keep.values(), key=lambda it: order[(it.prompt, it.info.get("seed"))])
        settings[name] = {"flags": shlex.join([*common, *flags]), **shared}
    if cfg["reference_variant"]:
        ref_items = groups[cfg["reference_variant"]]
    elif cfg["reference"]:
        ref_items = collect_folder(cfg["reference"], "reference")[0]
    else:
        ref_items = None
    scores = score(groups, metrics, cfg["tile"], ref_items, settings)
    page = write_all(scores, out, "Compare", note=f"{len(variants)} variant(s) × {len(records)} prompt/seed pair(s); "
                     f"model {cfg['model']}")
    print_table(scores)
    print(f"wrote {page}, {out / 'scores.csv'}, {out / 'scores.json'}")
    return 0
