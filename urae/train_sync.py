"""What keeps the training processes in step: per-rank batches, gradient averaging, agreement checks.

The adapter is attached sd-scripts-style (the frozen Linear's `forward` is swapped), so its parameters
live outside the transformer's module tree and are never called through a module forward of their own:
DDP's reducer would see no forward, and under FSDP the sharded tree does not contain them. They stay
replicated, and their gradients are averaged here as reduce-to-0 then broadcast: the traffic of an
all-reduce, with bit-identical results on every rank (gloo's all-reduce can round differently per rank,
and replicated adapters would drift apart).
"""

from __future__ import annotations

import torch

from urae.config import ConfigError


class BatchStream:
    """Batch number m of this rank, for any m: epoch = m // per_rank, so resuming needs no replay."""

    def __init__(self, loader, rank: int, world: int):
        self.dataset, self.sampler, self.collate = loader.dataset, loader.batch_sampler, loader.collate_fn
        self.rank, self.world = rank, world
        self.sampler.set_epoch(0)
        total = len(list(self.sampler))
        self.per_rank = total // world  # equal counts keep the ranks in step
        if self.per_rank == 0:
            raise ConfigError(f"{total} batch(es) per epoch for {world} processes: add images or lower the batch size")
        self._epoch, self._batches = None, None

    def get(self, m: int) -> dict:
        epoch, pos = divmod(m, self.per_rank)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._batches = list(self.sampler)[self.rank::self.world][: self.per_rank]
            self._epoch = epoch
        return self.collate([self.dataset[key] for key in self._batches[pos]])


def seed_for(seed: int, micro: int, rank: int, world: int) -> int:
    """Randomness of micro-batch `micro` on `rank`: a resumed run draws what an uninterrupted one would."""
    return (seed * 1_000_003 + micro * world + rank) % (2**63 - 1)


def all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Average across ranks in place, bit-identical on every rank (see the module docstring)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.reduce(flat, dst=0)
    flat /= world
    torch.distributed.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def mean_over_ranks(value: float, device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / world


def any_rank(flag: bool, device, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def ranks_agree(params: list[torch.Tensor], device, world: int) -> bool:
    """Every rank must hold the same adapter after training; compare a checksum across ranks."""
    if world == 1:
        return True
    c = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params])
    c = c.reshape(-1).to(device)
    hi, lo = c.clone(), c.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))
