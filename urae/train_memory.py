"""The memory configuration of a training run: memory = "auto" or explicit keys, resolved in the plan stage.

`memory = "auto"` asks urae.memory for the cheapest lossless combination whose estimated peak fits this
GPU at the run's resolution and whose host memory fits this machine's RAM (what is free now, shared by
the processes of the node; pinned memory within `host_memory_budget`); `blocks_to_swap`, `fp8_base`,
`offload_activations` and `checkpoint_segments`, when set, override what it chose. The line it prints
says what was chosen, the expected peak, the host memory by kind, the extra compute of checkpoint
segments and what the disk offload writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from urae.config import ConfigError

MEMORY_KEYS = ("blocks_to_swap", "fp8_base", "offload_activations", "checkpoint_segments")
FLUX_BLOCKS = (19, 38)  # FLUX.1-dev/schnell: double-stream, single-stream

log = logging.getLogger("urae")


@dataclass
class MemoryChoice:
    options: object  # urae.memory.MemoryOptions
    expected_peak: int | None  # bytes of one training step on the device, estimated for real FLUX.1 shapes
    how: str
    costs: dict = field(default_factory=dict)  # urae.memory.estimate.step_costs at FLUX.1 shapes (GPU runs)
    disk_dir: str | None = None  # offload_activations = "disk": where its file goes
    steps: int = 0

    @property
    def active(self) -> bool:
        o = self.options
        return bool(o.blocks_to_swap or o.fp8_base or o.offload_activations or o.checkpoint_segments > 1)

    def summary(self) -> str:
        from urae.common import human_bytes

        c = self.costs
        parts = [self.how] + ([f"expected peak {human_bytes(self.expected_peak)}"] if self.expected_peak else [])
        if c.get("pinned") or c.get("page_cache") or c.get("converted"):
            parts.append(f"host: {human_bytes(c['pinned'])} pinned, {human_bytes(c['page_cache'])} of weights read "
                         f"from the page cache, {human_bytes(c['converted'])} converted")
        if self.options.checkpoint_segments > 1 and c:
            parts.append(f"+{100 * c['extra_flops']:.0f}% FLOPs to rebuild the segments' inputs")
        line = f"memory: {self.options.describe()} ({'; '.join(parts)})"
        if self.options.offload_activations == "disk" and c:
            run = c["disk"] * self.steps
            line += (f"\nmemory: the block inputs go to {self.disk_dir}: {human_bytes(c['disk'])} written per step, "
                     f"{run / 1e12:,.1f} TB over {self.steps} step(s); past a few hundred TB that is beyond many "
                     f"SSDs' rated endurance: prefer checkpoint_segments where the GPU allows")
        return line


def block_counts(model_config: dict | None) -> tuple[int, int]:
    """(double, single) blocks from the transformer config; FLUX.1's layout while it is not on disk."""
    if model_config is None:
        return FLUX_BLOCKS
    return int(model_config["num_layers"]), int(model_config["num_single_layers"])


def _available_ram() -> int | None:
    """MemAvailable of /proc/meminfo (free memory plus what the kernel can reclaim, page cache included)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_budgets(gib: float | None) -> tuple[int, int]:
    """(pinned budget, RAM for pinned + converted + page-cached weights) of this process: urae.memory's rule
    for the machine's RAM shared by the processes on this node; `host_memory_budget` (GiB) sets the first."""
    from urae.memory.auto import host_limits

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    pinned, ram = host_limits(total, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))), _available_ram())
    return (int(gib * 2**30) if gib is not None else pinned), ram


def _file_dtypes(path: Path) -> set[str]:
    """The tensor dtypes a .safetensors file declares (its JSON header only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def weights_in_page_cache(cfg: dict, model_location: str | None) -> bool:
    """Whether swapped blocks can stay in the memory-mapped files of the model folder: they hold them in the
    training dtype (bf16 on a GPU). Unknown (a hub id not downloaded yet): assumed, as FLUX.1's files are bf16.
    A single-file transformer is renamed into the diffusers layout tensor by tensor: counted as converted."""
    if cfg["transformer"]:
        return False
    files = sorted(Path(model_location, "transformer").glob("*.safetensors")) if model_location else []
    try:
        dtypes = set().union(*(_file_dtypes(p) for p in files)) if files else None
    except (OSError, ValueError, struct.error):
        dtypes = None
    want = "F32" if cfg["mixed_precision"] == "no" else "BF16"
    return dtypes is None or dtypes == {want}


def default_disk_dir(cfg: dict) -> str:
    """offload_activations = "disk": beside the caches (the data's disk), else the output folder."""
    return cfg["activation_dir"] or cfg["cache_dir"] or cfg["train_data_dir"] or cfg["output_dir"]


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the training GPU, None without one (the one place that asks, so a test can pretend)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def resolve_memory(cfg: dict, device: torch.device, model_config: dict | None, fsdp: bool,
                   world: int, model_location: str | None = None) -> MemoryChoice:
    from urae.data.options import parse_resolution
    from urae.memory import MemoryConfigError, MemoryOptions, check_memory_options, choose_memory, estimate_peak_bytes
    from urae.memory.estimate import step_costs

    explicit = {k: cfg[k] for k in MEMORY_KEYS if cfg[k] is not None}
    w, h = parse_resolution(cfg["resolution"])
    batch = cfg["train_batch_size"]
    total = device_memory_bytes(device)
    gpu = not fsdp and total is not None and cfg["gradient_checkpointing"]  # one process's memory to fit
    auto = cfg["memory"] == "auto" and gpu
    # the model files' headers and the machine's RAM matter only when there is a GPU to fit
    in_page_cache = weights_in_page_cache(cfg, model_location) if gpu else True
    pinned, ram = host_budgets(cfg["host_memory_budget"]) if gpu else (None, None)
    peak = None
    if auto:
        try:  # the keys the user set stay as set; auto chooses the others
            options, peak = choose_memory(total, w, h, batch_size=batch, rank=cfg["network_dim"],
                                       host_budget_bytes=pinned, fixed=explicit, host_ram_bytes=ram,
                                       weights_in_page_cache=in_page_cache)
        except MemoryConfigError as e:
            unset = [k for k in MEMORY_KEYS if k not in explicit]
            hint = f"; set {' / '.join(unset)} yourself" if unset else ""
            raise ConfigError(f"{e}{hint}, or raise host_memory_budget") from None
        how = (f"memory = auto for {total / 2**30:.0f} GiB at {w}x{h} with {ram / 2**30:.0f} GiB of RAM for it, "
               f"pinned at most {pinned / 2**30:.0f} GiB")
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
    disk_dir = default_disk_dir(cfg) if options.offload_activations == "disk" else None
    if disk_dir is not None:
        try:
            Path(disk_dir).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"offload_activations = disk: cannot use {disk_dir} for its file ({e.strerror}); set "
                              f"activation_dir to a folder on a fast local disk") from None
    if gpu and peak is None:
        peak = estimate_peak_bytes(options, w, h, batch_size=batch, rank=cfg["network_dim"])
    costs = step_costs(options, w, h, batch, ram, in_page_cache) if gpu else {}
    return MemoryChoice(options, peak, how, costs, disk_dir, cfg["max_train_steps"] * cfg["gradient_accumulation_steps"])
