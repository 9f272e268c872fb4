"""Logging set-up both commands share: plain messages, and exactly two known-harmless third-party lines hidden.

The hidden lines, printed on every run (once per process) and not actionable here:
- bitsandbytes on a CPU with AVX512-BF16 cannot find the optional `kernels` package for its 4-bit CPU
  kernel (we use no 4-bit CPU matmuls);
- transformers falls back to the PIL image processors of CLIP/SigLIP when torchvision is missing (the
  FLUX pipeline uses no image processor for text-to-image).
Any other message from those loggers, and every other warning, still shows.
"""

from __future__ import annotations

import logging


def _kernels_missing(record: logging.LogRecord) -> bool:
    """bitsandbytes' line is harmless only when its cause is the missing optional package, not a broken one."""
    cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return isinstance(cause, ModuleNotFoundError) and cause.name == "kernels"


# logger name -> (a phrase only the harmless message contains, a further check of the record or None)
_KNOWN_HARMLESS = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community", _kernels_missing),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to", None),
}


class _KnownHarmless(logging.Filter):
    def __init__(self, phrase: str, check):
        super().__init__()
        self.phrase, self.check = phrase, check

    def filter(self, record: logging.LogRecord) -> bool:
        harmless = self.phrase in str(record.msg) and (self.check is None or self.check(record))
        return not harmless


def quiet_known_warnings() -> None:
    """Attach the filters (idempotent). Call before diffusers/transformers are imported: the loggers exist
    by name before their modules do, so the filters are in place when the lines are logged."""
    for name, (phrase, check) in _KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownHarmless) for f in logger.filters):
            logger.addFilter(_KnownHarmless(phrase, check))


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s")
    quiet_known_warnings()
