"""bitsandbytes stays out of a run that does not use it.

Importing diffusers imports bitsandbytes whenever it is installed (through peft's helpers), and
bitsandbytes 0.50 on a CPU with AVX512-BF16 asks the `kernels` package for a hub kernel at import:
a network look-up on every command, and two warnings ("Skipping publisher trust check …", "Failed to
load CPU gemm_4bit_forward …") when offline. Only the 8-bit optimizer (and a model folder quantised
with bitsandbytes) needs it.

So the commands, once their settings are parsed and before diffusers is imported, mark it absent when
the run does not need it (`sys.modules[name] = None`, the documented way to block an import:
`importlib.util.find_spec` then answers None, and diffusers, transformers, accelerate and peft all take
their "not installed" branch). Nothing is blocked in a process that has already imported diffusers,
transformers or peft (a notebook, ComfyUI, the test process): the availability they recorded would disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_NAME = "bitsandbytes"
# packages that record at import whether bitsandbytes is installed
_RECORDERS = ("diffusers", "transformers", "peft")  # accelerate asks each time


def defer_bitsandbytes() -> bool:
    """Hide bitsandbytes from this process (until `import_bitsandbytes`); False when it is too late to."""
    if _NAME in sys.modules or any(m in sys.modules for m in _RECORDERS):
        return False
    sys.modules[_NAME] = None
    return True


def import_bitsandbytes():
    """bitsandbytes itself, a deferral lifted; ImportError when it is not installed."""
    if _NAME in sys.modules and sys.modules[_NAME] is None:
        del sys.modules[_NAME]
    import bitsandbytes

    return bitsandbytes


def quantised_with_bitsandbytes(model: str) -> bool:
    """Whether a local pipeline folder holds a component quantised with bitsandbytes (its config.json says so)."""
    folder = Path(str(model)).expanduser()
    if not folder.is_dir():
        return False
    for config in folder.glob("*/config.json"):
        try:
            quant = json.loads(config.read_text()).get("quantization_config") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(quant, dict) and quant.get("quant_method") == _NAME:
            return True
    return False
