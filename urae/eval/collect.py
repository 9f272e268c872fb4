"""Folders of images -> the items to score, with their prompts, seeds and settings.

Our own folders carry `images.jsonl` (flux_urae_infer.py) or PNG text chunks (training samples) that give
each image's prompt and seed; a plain folder takes prompts from a file, or is scored without text metrics.
Images of different folders made from the same prompt and seed share a row of the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from urae.eval.metrics import Item
from urae.eval.models import EvalError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SETTINGS_KEYS = ("model", "transformer", "loras", "runtime", "steps", "guidance", "cfg_scale", "width", "height",
                 "init_resolution", "strength", "step")


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _png_info(path: Path) -> dict:
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except OSError as e:
        raise EvalError(f"{path}: cannot read it as an image ({e})") from None
    out = {}
    for k, v in text.items():
        try:
            out[k] = json.loads(v) if k != "prompt" else v
        except json.JSONDecodeError:
            out[k] = v
    return out


def row_key(prompt: str | None, seed, fallback: str) -> str:
    if prompt is None:
        return fallback
    return f"{prompt} · seed {seed}" if seed is not None else prompt


def read_prompts_file(path: str | None) -> list[str] | dict[str, str] | None:
    """A `.jsonl` of {"file", "prompt"} (matched by file name) or one prompt per line (matched in name order)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"--prompts {p}: no such file")
    if p.suffix == ".jsonl":
        rows = _jsonl(p)
        if not all(isinstance(r, dict) and "file" in r and "prompt" in r for r in rows):
            raise EvalError(f"--prompts {p}: each JSONL line needs \"file\" and \"prompt\"")
        return {Path(r["file"]).name: r["prompt"] for r in rows}
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect_folder(folder: str | Path, group: str | None = None, prompts=None) -> tuple[list[Item], dict]:
    """The items of one folder and the settings its images share (shown above its column)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvalError(f"{folder}: no such folder")
    group = group or folder.name
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise EvalError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    records = {}
    if (folder / "images.jsonl").is_file():
        records = {r["file"]: r for r in _jsonl(folder / "images.jsonl") if isinstance(r, dict) and "file" in r}
    if isinstance(prompts, list) and len(prompts) != len(files):
        raise EvalError(f"--prompts has {len(prompts)} line(s) but {folder} holds {len(files)} image(s); give one "
                        f"line per image (in file-name order) or a JSONL with \"file\" and \"prompt\"")
    items = []
    for i, path in enumerate(files):
        info = records.get(path.name) or (_png_info(path) if path.suffix.lower() == ".png" else {})
        prompt = info.get("prompt")
        if isinstance(prompts, list):
            prompt = prompts[i]
        elif isinstance(prompts, dict) and path.name in prompts:
            prompt = prompts[path.name]
        key = row_key(prompt, info.get("seed"), path.stem)
        items.append(Item(path, group, key, prompt, info))
    return items, shared_settings([it.info for it in items])


def shared_settings(infos: list[dict]) -> dict:
    """The settings every image of a column has in common (what differs per image stays with the image)."""
    out = {}
    for k in SETTINGS_KEYS:
        values = [json.dumps(i.get(k), sort_keys=True) for i in infos]
        if values and all(v == values[0] for v in values) and infos[0].get(k) is not None:
            out[k] = infos[0][k]
    return out
