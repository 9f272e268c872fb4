"""Prompt lists: plain lines (with sd-scripts' inline `--w --h --d --s --l` flags) or JSONL records."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

# sd-scripts sample-prompt flags -> our request fields
_INLINE = {"w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance"}
_FIELDS = {"prompt", "width", "height", "seed", "steps", "guidance"}
_INT_FIELDS = {"width", "height", "seed", "steps"}


def _typed(field: str, value, where: str):
    try:
        return int(value) if field in _INT_FIELDS else float(value) if field == "guidance" else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} = {value!r} is not a number") from None


def parse_line(line: str, where: str = "prompt") -> dict:
    """`a cat --w 2048 --h 1024 --d 7` -> {"prompt": "a cat", "width": 2048, "height": 1024, "seed": 7}."""
    parts = line.split(" --")
    rec: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        if key in _INLINE:
            rec[_INLINE[key]] = _typed(_INLINE[key], value.strip(), where)
        # other sd-scripts flags (negative prompt, cfg scale, …) do not apply to guidance-distilled FLUX
    return rec


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
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{where}: a JSONL line needs a \"prompt\" string")
            unknown = set(rec) - _FIELDS
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
            rec = {k: _typed(k, v, where) for k, v in rec.items()}
        else:
            rec = parse_line(line, where)
        records.append(rec)
    if not records:
        raise ValueError(f"prompts file {p} has no prompts (empty lines and # comments are skipped)")
    return records


def describe(rec: dict) -> str:
    return shlex.quote(rec["prompt"][:60] + ("…" if len(rec["prompt"]) > 60 else ""))
