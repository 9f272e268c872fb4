"""Training states for resume: one folder per step, written atomically, the newest complete one found.

    <output_dir>/state-0000100/  adapter.safetensors  optimizer.pt  scheduler.pt  train_state.json

`train_state.json` is written last, so a folder without it is incomplete; the folder is built under
a temporary name and renamed, so a crash mid-save never leaves a half state under a real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from urae.io import atomic_path, set_default_mode

STATE_RE = re.compile(r"^state-(\d{7})$")
RUN_MARKER = "train_config.toml"
TMP_PREFIX = ".state-tmp-"


def state_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"state-{step:07d}"


def list_states(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete states, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = STATE_RE.match(p.name)
        if m and p.is_dir() and (p / "train_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_state(output_dir: Path, step: int, network, optimizer, scheduler, extra: dict,
               adapter_metadata: dict) -> Path:
    final = state_dir(output_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=output_dir))
    old = None
    try:
        network.save_weights(str(tmp / "adapter.safetensors"), None, adapter_metadata)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "train_state.json").write_text(json.dumps({"step": step, **extra}, indent=1))
        set_default_mode(tmp)
        if final.exists():  # moved aside, not deleted, until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=output_dir))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)
    return final


def _check_complete(path: Path) -> None:
    if not (Path(path) / "train_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete training state (no train_state.json)")


def load_adapter_state(path: Path, network) -> None:
    """The adapter first: its saved factors and frozen copies spare the network its SVD initialisation."""
    _check_complete(path)
    network.load_weights(str(Path(path) / "adapter.safetensors"))


def load_optimizer_state(path: Path, optimizer, scheduler) -> dict:
    _check_complete(path)
    path = Path(path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "train_state.json").read_text())


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (written by a run that died before its next save)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep))


def remove_partial_saves(output_dir: Path) -> None:
    """Temporary folders of a run killed mid-save: never complete states, safe to delete."""
    for p in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def clear_run(output_dir: Path, output_name: str) -> None:
    """--overwrite: remove the previous run's states, log, samples and final file, so nothing of it is resumed
    or mistaken for this run's."""
    for _, p in list_states(output_dir):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(output_dir / "samples", ignore_errors=True)
    remove_partial_saves(output_dir)
    for name in ("train_log.jsonl", f"{output_name}.safetensors", RUN_MARKER):
        (output_dir / name).unlink(missing_ok=True)


def run_started(output_dir: Path, output_name: str) -> bool:
    """Whether the folder holds what a run leaves worth keeping: a saved state or the final file. A marker or a log
    alone is a run that failed or was killed before saving anything: there is nothing to resume or to lose."""
    return bool(list_states(output_dir)) or (Path(output_dir) / f"{output_name}.safetensors").exists()


def forget_unstarted_run(output_dir: Path, output_name: str, created: bool) -> None:
    """After a failure: a run that saved nothing leaves no marker, so the corrected command is not refused; a
    folder this run created and left empty (a hub error before any file was written) is removed."""
    out = Path(output_dir)
    if not out.is_dir() or run_started(out, output_name):
        return
    (out / RUN_MARKER).unlink(missing_ok=True)
    remove_partial_saves(out)
    if created:
        for folder in (out / "logs", out):  # only if empty: rmdir refuses otherwise
            try:
                folder.rmdir()
            except OSError:
                pass


def prune_states(output_dir: Path, step: int, keep_last_n_steps: int | None) -> None:
    """sd-scripts' save_last_n_steps: drop states older than step - N (the newest is always kept)."""
    if not keep_last_n_steps:
        return
    for s, p in list_states(output_dir)[:-1]:
        if s < step - keep_last_n_steps:
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        states = list_states(output_dir)
        return states[-1][1] if states else None
    p = Path(resume)
    if not (p / "train_state.json").is_file():
        raise FileNotFoundError(f"resume: {p} is not a complete training state folder (state-NNNNNNN)")
    return p


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool, output_name: str) -> None:
    """Refuse to mix runs: a folder with another run's files needs --resume or --overwrite."""
    if resuming or overwrite or not output_dir.is_dir():
        return
    if not run_started(output_dir, output_name):  # a marker alone: a run that never saved (reused silently)
        return
    clash = [p.name for p in output_dir.iterdir()
             if p.name == RUN_MARKER or STATE_RE.match(p.name) or p.name == f"{output_name}.safetensors"]
    if clash:
        raise FileExistsError(f"{output_dir} already holds a training run ({', '.join(sorted(clash)[:3])}); "
                              f"pass --resume auto to continue it, --overwrite to start over there, "
                              f"or choose another --output_dir")
