"""The processes of an `accelerate launch` or torchrun: this process's part of each step's batch
(`Shard`), sums over the processes, and a side channel for what the processes tell each other.

Data parallel (fmn.forget under a launch): every process draws the same global batch of
processes x batch_size samples from the same generator (noise, timesteps, reference picks, prompt
rows: functions of the sample's index in the global batch, not of the process) and computes its
slice, so that a step's math is that of one process with the global batch; the gradients are
averaged over the processes after each step's backward passes (fmn.losses scales each process's loss
so that the average is the global batch's gradient).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

# waits between processes in fmn.batch can be as long as one process's share of the concepts
SIDE_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Shard:
    """Samples [rank * b, (rank + 1) * b) of each step's global batch of world * b."""
    rank: int = 0
    world: int = 1

    def part(self, local_batch: int) -> slice:
        return slice(self.rank * local_batch, (self.rank + 1) * local_batch)

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """x (detached) summed over the processes; x itself on one process."""
        x = x.detach().clone()
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def same_start(self, params) -> None:
        """The main process's values of params in every process (they load the same model; this makes
        sure of it, as DDP does)."""
        if self.world > 1:
            for chunk in buckets(list(params)):
                flat = torch.cat([p.detach().reshape(-1) for p in chunk])
                torch.distributed.broadcast(flat, src=0)
                with torch.no_grad():
                    for p, v in zip(chunk, flat.split([p.numel() for p in chunk])):
                        p.copy_(v.view_as(p))

    def average_gradients(self, params) -> None:
        """Every process's gradients of params replaced by their mean over the processes (a missing one
        counts as zeros). Done here rather than by DDP: DDP expects the loss to be computed from the
        module's output, and the attention loss reads scores recorded inside the forward pass."""
        if self.world > 1:
            for chunk in buckets(list(params)):
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in chunk])
                torch.distributed.all_reduce(flat)
                flat /= self.world
                for p, g in zip(chunk, flat.split([p.numel() for p in chunk])):
                    p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def buckets(params, size: int = 1 << 25) -> list[list]:
    """params in runs of one dtype and device of at most `size` elements (or one larger tensor): one
    collective each, without a copy of every tensor at once."""
    out, n = [], 0
    for p in params:
        if not out or n + p.numel() > size or (p.dtype, p.device) != (out[-1][0].dtype, out[-1][0].device):
            out.append([])
            n = 0
        out[-1].append(p)
        n += p.numel()
    return out


def shard_of(accel, data_parallel: bool = True) -> Shard:
    """This process's Shard under data parallel; Shard() (the whole batch) on one process or without it."""
    if data_parallel and accel.num_processes > 1:
        return Shard(accel.process_index, accel.num_processes)
    return Shard()


def side_group(accel):
    """A gloo group with a week's timeout for small Python objects (fmn.batch: the pending list, the
    results), whatever the training backend (NCCL times out in minutes); None on one process.
    Every process must call it at the same point."""
    if accel.num_processes < 2:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=SIDE_TIMEOUT)


def broadcast(obj, group):
    """The main process's obj, on every process."""
    if group is None:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather(obj, group) -> list:
    """Every process's obj, in process order, on every process."""
    if group is None:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def world() -> tuple[int, int]:
    """(process index, number of processes) of the launch this process belongs to, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def first_to_fail() -> bool:
    """Whether this process is the first of its launch to fail (always, alone): that one reports its
    error; a later one's error is most likely the lost connection to it (gloo: "Connection closed by
    peer"), and the launcher stops the rest. Decided through the launch's key-value store."""
    rank, size = world()
    if size < 2:
        return True
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        return store.compare_set("fmn/first-failure", "", str(rank)) == str(rank).encode()
    except Exception:  # no store (a torch without it, or its host is gone): report as if first
        return True
