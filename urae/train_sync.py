"""What keeps the training processes in step: per-rank batches, gradient averaging, agreement checks.

The adapter is attached sd-scripts-style (the frozen Linear's `forward` is swapped), so its parameters
live outside the transformer's module tree and are never called through a module forward of their own:
DDP's reducer would see no forward, and under FSDP the sharded tree does not contain them. They stay
replicated, and their gradients are averaged here as reduce-to-0 then broadcast: the traffic of an
all-reduce, with bit-identical results on every rank (gloo's all-reduce can round differently per rank,
and replicated adapters would drift apart). The initial adapter is rank 0's, broadcast; every state save
first checks that the ranks still agree.
"""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def init_rng(seed: int):
    """The adapter's initial random draws (a plain LoRA's down factor, any random init of another network
    module) come from `seed` alone, whatever ran before; the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def broadcast_from_main(module: torch.nn.Module, world: int) -> None:
    """Every rank takes rank 0's parameters and buffers, so the ranks start from one adapter by construction
    (not because they happened to run the same code on the same inputs)."""
    if world == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.numel():
            groups.setdefault((t.dtype, t.device), []).append(t.data)
    for tensors in groups.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


class RanksDiverged(RuntimeError):
    """The replicated adapter differs between processes: a bug, never a user's mistake (keeps its traceback)."""


def differing_tensors(named: dict[str, torch.Tensor], device, world: int) -> list[str]:
    """Names of the tensors whose checksums (sum, sum of squares, position-weighted sum, in fp64) are not equal
    on every rank; [] on one process."""
    if world == 1 or not named:
        return []
    sums = []
    for t in named.values():
        x = t.detach().double().reshape(-1)
        w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64)
        sums.append(torch.stack([x.sum(), x.square().sum(), (x * w).sum()]))
    c = torch.stack(sums).to(device)
    hi, lo = c.clone(), c.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    bad = (hi != lo).any(dim=1).tolist()
    return [name for name, b in zip(named, bad) if b]


def check_ranks_agree(module: torch.nn.Module, device, world: int, when: str, last_good) -> None:
    """Collective: raise RanksDiverged on every rank, naming the tensors that differ, before anything is saved."""
    bad = differing_tensors(module.state_dict(), device, world)
    if bad:
        kept = f"the last good state {last_good} is left as it was" if last_good else "no state was saved yet"
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise RanksDiverged(f"the adapters differ between the {world} processes {when}: {', '.join(bad[:5])}{more}; "
                            f"nothing was saved ({kept}). This is a bug: please report it with this traceback and "
                            f"your accelerate config")
