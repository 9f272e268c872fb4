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


def _shown(caplog, logger: str, msg: str, *args) -> bool:
    caplog.clear()
    logging.getLogger(logger).warning(msg, *args)
    return any(r.name == logger for r in caplog.records)


def test_only_the_known_lines_are_filtered(caplog):
    quiet_known_warnings()
    quiet_known_warnings()  # idempotent
    assert sum(type(f).__name__ == "_KnownHarmless" for f in logging.getLogger(BNB).filters) == 1
    with caplog.at_level(logging.WARNING):
        assert not _shown(caplog, BNB, BNB_MSG, ModuleNotFoundError("No module named 'kernels'", name="kernels"))
        # the same line with another cause (a broken install) still shows
        assert _shown(caplog, BNB, BNB_MSG, ImportError("kernels: undefined symbol"))
        assert _shown(caplog, BNB, "some other bitsandbytes warning")
        assert not _shown(caplog, TF, "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                      "`CLIPImageProcessorPil` for backward compatibility.")
        assert _shown(caplog, TF, "Could not import module 'X'")
        assert _shown(caplog, "transformers.other", "requires torchvision (not installed); falling back to")


@pytest.mark.slow
def test_commands_hide_them_on_import():
    code = ("from urae.logs import quiet_known_warnings; quiet_known_warnings(); "
            "import diffusers; from transformers import CLIPImageProcessor")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr and "requires torchvision" not in out.stderr
