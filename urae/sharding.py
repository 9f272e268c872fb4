"""The frozen FLUX base split across GPUs with FSDP2, when `accelerate config` chose FSDP.

Each transformer block (and the root) is `fully_shard`-ed: every rank keeps 1/world of the frozen weights
and all-gathers a block just before it runs (forward, checkpoint recompute and backward), so 8 x 24 GB GPUs
hold the 4K recipe without offloading. accelerate's own `prepare` cannot do this for us: the adapter is
attached sd-scripts-style (each Linear's `forward` swapped), so its parameters are not in the module tree
FSDP would wrap; they stay replicated and are averaged as urae.train_sync explains.
On a machine without GPUs accelerate reports MULTI_CPU even when launched with --use_fsdp, so the
launcher's ACCELERATE_USE_FSDP is read as well: the same sharding then runs on gloo.
"""

from __future__ import annotations

import os

import torch


def fsdp_requested(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2:
        return False
    return (accelerator.distributed_type == DistributedType.FSDP
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def shard_base(transformer: torch.nn.Module, device: torch.device) -> None:
    """Shard every block, then the root (embedders, norms, projections). Call after the adapter's SVD:
    the minor components need each whole weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=reshard)


def sharded_bytes_per_rank(transformer: torch.nn.Module) -> int:
    """Bytes of base weights this rank holds (its local shards)."""
    total = 0
    for p in transformer.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
