#!/usr/bin/env python
"""URAE training for FLUX.1.

    accelerate launch flux_urae_train.py --config presets/4k.toml [--any_key value ...]
    python flux_urae_train.py --config presets/demo.toml          # tiny offline demo, CPU, ~1 minute
"""

import sys

from urae.logs import quiet_known_warnings

quiet_known_warnings()  # before the third-party imports below log them

from urae.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
