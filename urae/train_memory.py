"""The memory configuration of a training run: memory = "auto" or explicit keys, resolved in the plan stage.

`memory = "auto"` asks urae.memory for the cheapest lossless combination whose estimated peak fits this
GPU at the run's resolution; `blocks_to_swap`, `fp8_base` and `offload_activations`, when set, override
what it chose. The line it prints says what was chosen and the expected peak.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from urae.config import ConfigError

MEMORY_KEYS = ("blocks_to_swap", "fp8_base", "offload_activations")
FLUX_BLOCKS = (19, 38)  # FLUX.1-dev/schnell: double-stream, single-stream

log = logging.getLogger("urae")


@dataclass
class MemoryChoice:
    options: object  # urae.memory.MemoryOptions
    expected_peak: int | None  # bytes of one training step on the device, estimated for real FLUX.1 shapes
    how: str

    @property
    def active(self) -> bool:
        o = self.options
        return bool(o.blocks_to_swap or o.fp8_base or o.offload_activations)

    def summary(self) -> str:
        from urae.common import human_bytes

        peak = f", expected peak {human_bytes(self.expected_peak)}" if self.expected_peak else ""
        return f"memory: {self.options.describe()} ({self.how}{peak})"


def block_counts(model_config: dict | None) -> tuple[int, int]:
    """(double, single) blocks from the transformer config; FLUX.1's layout while it is not on disk."""
    if model_config is None:
        return FLUX_BLOCKS
    return int(model_config["num_layers"]), int(model_config["num_single_layers"])


def host_budget_bytes(gib: float | None) -> int:
    """Pinned host memory one process may take: as given, else 70 % of the machine's RAM shared by the
    processes on this node (pinned pages cannot be swapped out; the rest of the system needs room too)."""
    if gib is not None:
        return int(gib * 2**30)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.7 * total / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the training GPU, None without one (the one place that asks, so a test can pretend)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def resolve_memory(cfg: dict, device: torch.device, model_config: dict | None, fsdp: bool,
                   world: int) -> MemoryChoice:
    from urae.data.options import parse_resolution
    from urae.memory import MemoryConfigError, MemoryOptions, check_memory_options, choose_memory, estimate_peak_bytes
    from urae.memory.estimate import host_bytes

    explicit = {k: cfg[k] for k in MEMORY_KEYS if cfg[k] is not None}
    w, h = parse_resolution(cfg["resolution"])
    batch = cfg["train_batch_size"]
    total = device_memory_bytes(device)
    auto = cfg["memory"] == "auto" and total is not None and not fsdp and cfg["gradient_checkpointing"]
    if auto:
        host = host_budget_bytes(cfg["host_memory_budget"])
        try:  # the keys the user set stay as set; auto chooses the others
            options, _ = choose_memory(total, w, h, batch_size=batch, rank=cfg["network_dim"],
                                       host_budget_bytes=host, fixed=explicit)
        except MemoryConfigError as e:
            unset = [k for k in MEMORY_KEYS if k not in explicit]
            hint = f"; set {' / '.join(unset)} yourself" if unset else ""
            raise ConfigError(f"{e}{hint}, or raise host_memory_budget") from None
        how = (f"memory = auto for {total / 2**30:.0f} GiB at {w}x{h}, pinned host memory "
               f"{host_bytes(options, w, h, batch) / 2**30:.1f} of {host / 2**30:.0f} GiB")
        if options.fp8_base and "fp8_base" not in explicit:
            log.warning("WARNING: memory = auto found no lossless configuration that fits and chose fp8_base: the "
                        "base weights are rounded to float8, which can drown the minor components the 4K recipe "
                        "trains (README, 'Fit your GPU'); more host RAM (host_memory_budget) or a bigger GPU avoids it")
    else:
        options = dataclasses.replace(MemoryOptions(), **explicit)
        how = ("no GPU: nothing to fit" if total is None else
               f"FSDP over {world} GPUs" if fsdp and cfg["memory"] == "auto" else
               "memory = auto needs gradient checkpointing: everything resident" if cfg["memory"] == "auto" else
               "memory = off")
    if explicit:
        how += ", " + ", ".join(f"{k} = {v}" for k, v in explicit.items()) + " given"
    if fsdp and (options.blocks_to_swap or options.fp8_base):
        raise ConfigError("blocks_to_swap and fp8_base are for one GPU; under FSDP the base is already split across "
                          "the GPUs (offload_activations still helps at 4096²)")
    try:
        check_memory_options(options, block_counts(model_config), device, cfg["gradient_checkpointing"])
    except MemoryConfigError as e:
        raise ConfigError(str(e)) from None
    peak = None if fsdp or total is None or not cfg["gradient_checkpointing"] else estimate_peak_bytes(
        options, w, h, batch_size=batch, rank=cfg["network_dim"], gradient_checkpointing=True)
    return MemoryChoice(options, peak, how)
