#!/usr/bin/env python
"""Measure ultra-resolution quality: score folders, compare settings or adapters, report a training run.

    python flux_urae_eval.py score outputs/4k outputs/2k-upscaled --reference teacher/
    python flux_urae_eval.py compare --model black-forest-labs/FLUX.1-dev --prompts_file presets/eval_prompts.txt \
        --variant "base: " --variant "urae: --lora out/urae_4k.safetensors" --output_dir eval/urae
    python flux_urae_eval.py report out/
"""

import sys

from urae.logs import quiet_known_warnings

quiet_known_warnings()  # before the third-party imports below log them

from urae.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
