"""TOML configs with command-line overrides of the same names (sd-scripts style).

A tool declares its keys once as `Option`s; `resolve` merges defaults, `--config FILE` and
`--key value` flags (command line wins), rejects unknown keys with the closest known name, and
checks types. Both entry points use it, so their TOML files and flags behave alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from urae import tomlfile
from urae.common import did_you_mean, parse_bool


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: type  # bool, int, float, str, list (of str) or dict
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    aliases: tuple[str, ...] = ()
    repeat: bool = False  # list options that may be given several times on the command line


def _suggest(name: str, known) -> str:
    return did_you_mean(name, known, cutoff=0.5)


def _coerce(opt: Option, value, source: str, typed: bool = False):
    """`value` as the option's type. typed: it comes from TOML, which has numbers of its own, so a quoted
    number (`learning_rate = "1e-3"`) is a mistake rather than a spelling to accept."""
    if value is None:
        return None
    t = opt.type
    if typed and t in (int, float) and isinstance(value, str):
        raise ConfigError(f"{source}: {opt.name} = {value!r} is not a valid {t.__name__} (a number is written "
                          f"without quotes in TOML)")
    try:
        if t is bool:
            if not isinstance(value, (bool, str)):
                raise ValueError
            mode = _bool_choice(opt, value)  # a bool option with named modes besides true/false
            if mode:
                return mode
            return parse_bool(value)
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if t is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if t is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {opt.name} = {value!r} is not a valid {t.__name__}") from None
    raise TypeError(opt.type)


def _bool_choice(opt: Option, value) -> str | None:
    if opt.choices and isinstance(value, str) and value.strip().lower() in opt.choices:
        return value.strip().lower()
    return None


def _check_choice(opt: Option, value, source: str):
    if opt.type is bool and isinstance(value, bool):
        return value
    if opt.choices is not None and value is not None and value not in opt.choices:
        raise ConfigError(f"{source}: {opt.name} = {value!r}; choose one of {', '.join(map(str, opt.choices))}")
    return value


def read_toml(path: str | os.PathLike) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomlfile.load(p)
    except tomlfile.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from e


def flatten_sections(d: dict, sections: tuple[str, ...] = ()) -> dict:
    """Allow `[section]` tables for readability: their keys are flattened (sd-scripts does the same)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in sections:
            out.update(v)
        else:
            out[k] = v
    return out


def _flag_value(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as a user types it (true/false)
    if value in (None, [], {}):
        return "unset"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def option_help(o: Option) -> str:
    """The help line of an option: what it does, then its choices and its default (also when unset), so that
    `--help` answers what a value may be and what happens when it is not given."""
    parts = [o.help.rstrip(".")] if o.help else []
    if o.choices:
        parts.append(f"choices: {', '.join(map(str, o.choices))}")
    if not (o.default is None and "default" in o.help):  # the help already says what "unset" means
        parts.append(f"default: {_show(o.default)}")
    return "; ".join(parts).replace("%", "%%")  # argparse expands % in help


class _OneLineErrors(argparse.ArgumentParser):
    """A command-line mistake is one line and exit code 2, like every other user error (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str, description: str, options: list[Option]) -> argparse.ArgumentParser:
    ap = _OneLineErrors(prog=prog, description=description, allow_abbrev=False)
    ap.add_argument("--config", metavar="FILE", help="TOML file with any of the keys below (flags override it)")
    for o in options:
        names = [f"--{o.name}"] + [f"--{a}" for a in o.aliases]
        kw: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS, "help": option_help(o)}
        if o.type is bool:
            # `--flag`, `--flag true|false` and `--no-flag` / `--no_flag` all work (sd-scripts users type the first)
            kw.update(nargs="?", const=True, type=str if o.choices else _flag_value,
                      metavar="|".join(("true", "false", *(o.choices or ()))))
            ap.add_argument(f"--no-{o.name}", f"--no_{o.name}", dest=o.name, action="store_false",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif o.type is list:
            kw["action"] = "append" if o.repeat else "store"
            if not o.repeat:
                kw["nargs"] = "+"
        elif o.type is dict:
            kw["type"] = str
        else:
            kw["metavar"] = "{" + ",".join(map(str, o.choices)) + "}" if o.choices else o.type.__name__.upper()
        ap.add_argument(*names, **kw)
    return ap


def resolve(options: list[Option], argv: list[str] | None, prog: str, description: str,
            sections: tuple[str, ...] = (), foreign: dict[str, str] | None = None) -> dict:
    """Defaults < TOML (`--config`) < command line. Unknown keys anywhere are errors with a suggestion;
    `foreign` maps other tools' names (sd-scripts' flags) to what they mean here, said instead of a guess."""
    by_name = {o.name: o for o in options}
    alias = {a: o.name for o in options for a in o.aliases}
    foreign = foreign or {}

    def hint(name: str, known) -> str:
        return f": {foreign[name]}" if name in foreign else _suggest(name, known)

    ap = build_parser(prog, description, options)
    ns, unknown = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        ap.error(f"unknown option {flag}{hint(flag.lstrip('-').split('=')[0], list(by_name) + ['config'])}")
    cli = vars(ns)
    cfg: dict[str, Any] = {o.name: o.default for o in options}
    sources = {o.name: "default" for o in options}
    path = cli.pop("config", None)
    if path:
        for k, v in flatten_sections(read_toml(path), sections).items():
            k = alias.get(k, k)
            if k not in by_name:
                raise ConfigError(f"{path}: unknown key {k!r}{hint(k, by_name)}")
            cfg[k] = _check_choice(by_name[k], _coerce(by_name[k], v, path, typed=True), path)
            sources[k] = "config"
    for k, v in cli.items():
        o = by_name[k]
        if o.type is dict and isinstance(v, str):
            try:
                v = tomlfile.loads(f"x = {v}")["x"]
            except tomlfile.TOMLDecodeError as e:
                raise ConfigError(f"--{k}: not an inline TOML table like {{a = 1}}: {e}") from e
        cfg[k] = _check_choice(o, _coerce(o, v, "command line"), "command line")
        sources[k] = "command line"
    cfg["_sources"] = sources
    cfg["_config_file"] = path
    return cfg


def check_ranges(cfg: dict, ranges: dict, prefix: str = "") -> None:
    """Numbers in range: `ranges` maps a key to (lowest, whether the lowest itself is allowed, highest or None).
    Unset (None) values are not checked; NaN is never in range."""
    for k, (low, inclusive, high) in ranges.items():
        v = cfg.get(k)
        if v is None:
            continue
        ok = (v >= low if inclusive else v > low) and (high is None or v <= high)
        if not ok:
            want = f"in [{low}, {high}]" if high is not None else f"{'>=' if inclusive else '>'} {low}"
            raise ConfigError(f"{prefix}{k} must be {want}, got {v}")


def format_table(cfg: dict, only_changed: bool = False) -> str:
    """A compact two-column table of the resolved config (the one-line-per-key summary users see)."""
    rows = [(k, v) for k, v in cfg.items() if not k.startswith("_")
            and (not only_changed or cfg.get("_sources", {}).get(k) != "default")]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k:<{width}}  {v!r}" for k, v in rows)


def to_toml(cfg: dict) -> str:
    return tomlfile.dumps({k: v for k, v in cfg.items() if not k.startswith("_")})
