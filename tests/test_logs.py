"""Exactly the two known-harmless third-party log lines are hidden; everything else still shows."""

import logging
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
    assert "kernels-community" not in out.stderr and "requires torchvision" not in out.stderr
