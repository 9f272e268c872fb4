"""The one TOML reader and writer of the project.

Reading is the standard library's `tomllib` (Python 3.11+) or its backport `tomli` on 3.10. Writing
covers what the tools write (a run's resolved config: strings, numbers, booleans, lists and tables of
them), so no third-party TOML writer is needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def load(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def loads(text: str) -> dict:
    return tomllib.loads(text)


def _key(k) -> str:
    k = str(k)
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to TOML")


def dumps(d: dict) -> str:
    """Top-level `key = value` lines (tables inline); None values are left out, as TOML has no null."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in d.items() if v is not None)
