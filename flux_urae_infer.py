#!/usr/bin/env python
"""Generate 2K/4K images with FLUX.1 and URAE adapters.

    python flux_urae_infer.py --model black-forest-labs/FLUX.1-dev --lora out/urae_4k.safetensors \
        --prompt "…" --width 4096 --height 4096
"""

import sys

from urae.logs import quiet_known_warnings

quiet_known_warnings()  # before the third-party imports below log them

from urae.inference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
