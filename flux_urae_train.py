#!/usr/bin/env python
"""URAE training for FLUX.1.

    accelerate launch flux_urae_train.py --config presets/4k.toml [--any_key value ...]
    python flux_urae_train.py --config presets/demo.toml          # tiny offline demo, CPU, ~1 minute
"""

import sys

from urae.logs import quiet_known_warnings
from urae.optional_imports import defer_bitsandbytes

quiet_known_warnings()  # before the third-party imports below log them
defer_bitsandbytes()  # only an 8-bit optimizer imports it (see urae.optional_imports)

from urae.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
