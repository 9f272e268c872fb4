"""Prompt lists: plain lines with sd-scripts' inline flags, or JSONL records.

The flags mean what they mean in sd-scripts' sample prompts (`line_to_prompt_dict`, FLUX sampling):
`--w`/`--h` size, `--d` seed, `--s` steps, `--g` FLUX's embedded guidance, `--l` the classifier-free
guidance (CFG) scale (1 = off) and `--n` the negative prompt used with it. A value given on a line
wins over the command line's default for that field, as in sd-scripts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("urae")

# sd-scripts flag -> our record field
FLAGS = {"w": "width", "h": "height", "d": "seed", "s": "steps", "g": "guidance", "l": "cfg_scale",
         "n": "negative_prompt"}
FIELDS = {"prompt", *FLAGS.values()}
_INT_FIELDS = {"width", "height", "seed", "steps"}
_FLOAT_FIELDS = {"guidance", "cfg_scale"}
_FLAG = re.compile(r"([A-Za-z]+)(?:\s+(.*))?$", re.DOTALL)


def _typed(field: str, value, where: str):
    try:
        if field in _INT_FIELDS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif field in _FLOAT_FIELDS:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        kind = "an integer" if field in _INT_FIELDS else "a number" if field in _FLOAT_FIELDS else "a string"
        raise ValueError(f"{where}: {field} = {value!r} is not {kind}") from None
    if field == "steps" and out < 1:
        raise ValueError(f"{where}: steps = {out} must be >= 1")
    if field == "guidance" and out < 0:
        raise ValueError(f"{where}: guidance (--g) = {out} must be >= 0")
    if field == "cfg_scale" and out < 1:
        raise ValueError(f"{where}: CFG scale (--l) = {out} must be >= 1 (1 = no CFG)")
    return out


def parse_line(line: str, where: str = "prompt") -> dict:
    """`a cat --w 2048 --h 1024 --g 3.5` -> {"prompt": "a cat", "width": 2048, "height": 1024, "guidance": 3.5}.

    Flags sd-scripts knows but that mean nothing here (sampler, ControlNet image, …) are skipped with a warning.
    """
    parts = line.split(" --")
    rec: dict = {"prompt": parts[0].strip()}
    skipped = []
    for part in parts[1:]:
        m = _FLAG.match(part.strip())
        key = m.group(1).lower() if m else ""
        value = (m.group(2) or "").strip() if m else ""
        if key not in FLAGS:
            skipped.append(f"--{part.strip().split(' ')[0]}")
            continue
        if not value:
            raise ValueError(f"{where}: --{key} needs a value")
        rec[FLAGS[key]] = _typed(FLAGS[key], value, where)
    if skipped:
        log.warning(f"{where}: ignoring {', '.join(skipped)} (known flags: "
                    f"{', '.join('--' + k for k in FLAGS)})")
    if not rec["prompt"] or rec["prompt"].startswith("--"):
        raise ValueError(f"{where}: the line has flags but no prompt text before them")
    return rec


def parse_record(obj, where: str) -> dict:
    """One JSONL object: the same fields as the flags, by name (prompt, width, height, seed, steps, …)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f"{where}: a JSONL line needs a \"prompt\" string")
    unknown = set(obj) - FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(FIELDS)}")
    return {k: _typed(k, v, where) for k, v in obj.items()}


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Records with at least `prompt`; `.jsonl` lines are JSON objects, other files one prompt per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    records = []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{p}:{n}"
        if p.suffix == ".jsonl" or line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            records.append(parse_record(obj, where))
        else:
            records.append(parse_line(line, where))
    if not records:
        raise ValueError(f"prompts file {p} has no prompts (empty lines and # comments are skipped)")
    return records
