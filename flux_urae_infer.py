#!/usr/bin/env python
"""Generate 2K/4K images with FLUX.1 and URAE adapters.

    python flux_urae_infer.py --model black-forest-labs/FLUX.1-dev --lora out/urae_4k.safetensors \
        --prompt "…" --width 4096 --height 4096
"""

import sys

from urae.inference import main

if __name__ == "__main__":
    sys.exit(main())
