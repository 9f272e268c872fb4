"""urae.optim: sd-scripts-style optimizer_args, the recipe's Prodigy defaults, early refusal of bad args."""

import pytest
import torch

from urae.config import ConfigError
from urae.optim import PRODIGY_DEFAULTS, check_optimizer, make_optimizer, make_scheduler, parse_kwargs, step_size


def test_optimizer_args_are_typed_like_sd_scripts():
    got = parse_kwargs(["decouple=True", "betas=(0.9,0.99)", "weight_decay=1e-4", "d0=none", "n=3", "mode=x"], "a")
    assert got == {"decouple": True, "betas": (0.9, 0.99), "weight_decay": 1e-4, "d0": None, "n": 3, "mode": "x"}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_kwargs(["decouple"], "optimizer_args")


def test_prodigy_gets_the_recipe_defaults_and_args_override_them():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("prodigy", [p], 1.0, ["weight_decay=0.01"])
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.01 and g["decouple"] is PRODIGY_DEFAULTS["decouple"] and g["lr"] == 1.0
    assert g["betas"] == PRODIGY_DEFAULTS["betas"]


def test_bad_optimizer_settings_are_config_errors_found_early():
    with pytest.raises(ConfigError, match="choose one of"):
        make_optimizer("sgdd", [torch.nn.Parameter(torch.zeros(1))], 1.0)
    with pytest.raises(ConfigError, match="do not fit optimizer_type = adamw"):
        check_optimizer("adamw", 1e-3, ["weight_decayy=0.1"])
    check_optimizer("adamw", 1e-3, ["weight_decay=0.1"])


def test_schedules_warm_up_and_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler("constant_with_warmup", opt, 4, 10)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    with pytest.raises(ConfigError, match="choose one of"):
        make_scheduler("linearr", opt, 0, 10)


def test_step_size_shows_prodigys_d_times_lr_beside_the_lr():
    """Prodigy's lr = 1.0 multiplies the step size d it estimates (d0 = 1e-6 at first): both are shown."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = make_optimizer("prodigy", [p], 1.0)
    opt.param_groups[0]["lr"] = 0.5  # a schedule scales lr; d is Prodigy's own
    assert step_size(opt) == {"lr": 0.5, "d*lr": pytest.approx(0.5e-6)}
    for _ in range(3):
        (p * torch.arange(8.0)).sum().backward()
        opt.step()
        opt.zero_grad()
    s = step_size(opt)
    assert s["lr"] == 0.5 and s["d*lr"] == pytest.approx(0.5 * opt.param_groups[0]["d"])
    assert step_size(make_optimizer("adamw", [p], 3e-4)) == {"lr": 3e-4}
