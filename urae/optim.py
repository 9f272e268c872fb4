"""Optimizers and learning-rate schedules by sd-scripts' names."""

from __future__ import annotations

import torch

from urae.config import ConfigError

# sgd: plain SGD (no momentum unless optimizer_args set it): a step proportional to the gradient, which is
# what makes a wrongly scaled gradient visible when two ways of computing the same step are compared
OPTIMIZERS = ("prodigy", "adamw", "adamw8bit", "adafactor", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine")


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        pass
    if v.startswith("(") and v.endswith(")"):
        return tuple(_parse_value(x.strip()) for x in v[1:-1].split(",") if x.strip())
    return v


def parse_kwargs(items: list[str] | None, what: str) -> dict:
    """sd-scripts' `key=value` strings -> typed kwargs ("decouple=True", "betas=(0.9,0.99)")."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: {item!r} is not key=value")
        out[key.strip()] = _parse_value(value.strip())
    return out


def step_size(optimizer) -> dict:
    """The learning rate, and for Prodigy its effective step size d·lr (its lr of 1.0 is a multiplier of the
    step size d it estimates, which starts at d0 = 1e-6 and grows): what the progress bar and the log show."""
    g = optimizer.param_groups[0]
    lr = float(g["lr"])
    return {"lr": lr, "d*lr": lr * float(g["d"])} if "d" in g else {"lr": lr}


# The URAE recipe's Prodigy settings; optimizer_args override them.
PRODIGY_DEFAULTS = {"weight_decay": 1e-4, "decouple": True, "use_bias_correction": True, "safeguard_warmup": True,
                    "betas": (0.9, 0.999)}


def make_optimizer(name: str, params, lr: float, args: list[str] | None = None):
    kwargs = parse_kwargs(args, "optimizer_args")
    name = name.lower()
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, **{**PRODIGY_DEFAULTS, **kwargs})
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **{"weight_decay": 1e-4, **kwargs})
    if name == "adamw8bit":
        from urae.optional_imports import import_bitsandbytes

        try:
            bnb = import_bitsandbytes()
        except ImportError as e:
            raise RuntimeError("optimizer_type = adamw8bit needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(params, lr=lr, **{"weight_decay": 1e-4, **kwargs})
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, **{"scale_parameter": False, "relative_step": False, "warmup_init": False,
                                           **kwargs})
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **kwargs)
    raise ConfigError(f"unknown optimizer_type {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown lr_scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def check_optimizer(name: str, lr: float, args: list[str] | None) -> None:
    """Build the optimizer on one dummy parameter: a misspelt optimizer_args key fails now, not after the model
    has loaded."""
    try:
        make_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], lr, args)
    except TypeError as e:
        raise ConfigError(f"optimizer_args {args} do not fit optimizer_type = {name}: {e}") from None
