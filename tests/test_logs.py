"""Exactly the two known-harmless third-party log lines are hidden; everything else still shows."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from urae.logs import quiet_known_warnings

BNB = "bitsandbytes.backends.cpu.ops"
TF = "transformers.utils.import_utils"
BNB_MSG = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
           "`pip install kernels` and the kernels >= 0.11.1")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _shown(logger: str, msg: str, *args) -> bool:
    """Whether a record gets past the logger's filters (a handler on the logger itself: transformers' loggers
    do not propagate to the root once transformers is imported)."""
    log, seen = logging.getLogger(logger), _Collect()
    log.addHandler(seen)
    try:
        log.warning(msg, *args)
    finally:
        log.removeHandler(seen)
    return bool(seen.records)


def test_only_the_known_lines_are_filtered():
    quiet_known_warnings()
    quiet_known_warnings()  # idempotent
    assert sum(type(f).__name__ == "_KnownHarmless" for f in logging.getLogger(BNB).filters) == 1
    assert not _shown(BNB, BNB_MSG, ModuleNotFoundError("No module named 'kernels'", name="kernels"))
    # the same line with another cause (a broken install) still shows
    assert _shown(BNB, BNB_MSG, ImportError("kernels: undefined symbol"))
    assert _shown(BNB, "some other bitsandbytes warning")
    assert not _shown(TF, "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                              "`CLIPImageProcessorPil` for backward compatibility.")
    assert _shown(TF, "Could not import module 'X'")
    assert _shown("transformers.other", "requires torchvision (not installed); falling back to")


@pytest.mark.slow
def test_commands_hide_them_on_import():
    code = ("from urae.logs import quiet_known_warnings; quiet_known_warnings(); "
            "import diffusers; from transformers import CLIPImageProcessor")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    # only the transformers line: nothing imported here loads bitsandbytes' CPU backend, so its line could never
    # appear (its filter is tested on the logger above)
    assert "requires torchvision" not in out.stderr


# Runs a command script as `python script args` would, and records at exit which optional packages it imported.
_RUN_AND_RECORD = """
import atexit, runpy, sys
record, script = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(record, "w").write(" ".join(
    m for m in ("diffusers", "bitsandbytes") if sys.modules.get(m) is not None)))
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def test_a_user_mistake_is_one_line_and_bitsandbytes_is_never_imported(tiny_flux_dir, tmp_path):
    """With the real installed packages: one line for a mistake, and bitsandbytes (whose import asks the hub for a
    CPU kernel and warns twice when offline on AVX512-BF16 CPUs) is not imported even after diffusers is, unless the
    run chose the 8-bit optimizer."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    script = str(root / "flux_urae_train.py")
    found_late = ["--no-demo", "--pretrained_model_name_or_path", str(tiny_flux_dir), "--train_data_dir",
                  str(tmp_path), "--output_dir", str(tmp_path / "o"), "--network_args", "init=minr"]
    for mistake, line, imported in (
            (["--learning_rate_typo", "1"],
             "error: unknown option --learning_rate_typo (did you mean 'learning_rate'?)", ""),
            (found_late, "error: network_args ['init=minr']: init='minr'", "diffusers"),
            ([*found_late, "--optimizer_type", "adamw8bit"], "error: network_args", "diffusers bitsandbytes")):
        record = tmp_path / "imported.txt"
        r = subprocess.run([sys.executable, "-c", _RUN_AND_RECORD, str(record), script, "--config",
                            str(root / "presets/demo.toml"), *mistake], env=env, cwd=root, timeout=300,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [x for x in r.stdout.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), r.stdout
        assert record.read_text() == imported


def test_a_bitsandbytes_model_folder_keeps_bitsandbytes(tmp_path):
    from urae.optional_imports import quantised_with_bitsandbytes

    (tmp_path / "transformer").mkdir()
    config = tmp_path / "transformer" / "config.json"
    config.write_text('{"_class_name": "FluxTransformer2DModel"}')
    assert not quantised_with_bitsandbytes(str(tmp_path)) and not quantised_with_bitsandbytes("org/name")
    config.write_text('{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}}')
    assert quantised_with_bitsandbytes(str(tmp_path))
