#!/usr/bin/env python
"""URAE training for FLUX.1.

    accelerate launch flux_urae_train.py --config presets/4k.toml [--any_key value ...]
    python flux_urae_train.py --config presets/demo.toml          # tiny offline demo, CPU, ~1 minute
"""

import sys

from urae.trainer import main

if __name__ == "__main__":
    sys.exit(main())
