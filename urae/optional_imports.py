"""bitsandbytes stays out of a run that does not use it.

Importing diffusers imports bitsandbytes whenever it is installed (through peft's helpers), and
bitsandbytes 0.50 on a CPU with AVX512-BF16 asks the `kernels` package for a hub kernel at import:
a network look-up on every command, and two warnings ("Skipping publisher trust check …", "Failed to
load CPU gemm_4bit_forward …") when offline. Only the 8-bit optimizer needs it.

The commands therefore mark it absent before the third-party imports (`sys.modules[name] = None`, the
documented way to block an import: `importlib.util.find_spec` then answers None, so diffusers,
transformers, accelerate and peft all take their "not installed" branch), and `import_bitsandbytes`
lifts the mark when an 8-bit optimizer is chosen. Library users (ComfyUI, notebooks) are never blocked:
only the command-line entry points call `defer_bitsandbytes`.
"""

from __future__ import annotations

import sys

_NAME = "bitsandbytes"


def defer_bitsandbytes() -> None:
    """Hide bitsandbytes from this process until `import_bitsandbytes` (no effect once it is imported)."""
    if _NAME not in sys.modules:
        sys.modules[_NAME] = None


def import_bitsandbytes():
    """bitsandbytes itself, the deferral lifted; ImportError when it is not installed."""
    if _NAME in sys.modules and sys.modules[_NAME] is None:
        del sys.modules[_NAME]
    import bitsandbytes

    return bitsandbytes
