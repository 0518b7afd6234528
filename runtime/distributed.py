"""Data parallelism over the calls of each batch (torch.distributed; launched with torchrun).

Every rank runs a contiguous shard of a batch's calls, then all ranks all-gather the decoded frames, because
the next level's calls take them as visual conditions. Per-call seeds make the video identical to a one-process
run. Rank 0 emits frames and writes outputs. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None) -> str | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = torch.cuda.is_available() and device not in ("cpu",)
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(leave, wait=False)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def leave(wait: bool = True) -> None:
    """Leave the process group, if this process is in one, while the interpreter is fully alive: a gloo process that
    exits with the group still up, or tears it down while a peer still talks to it, can abort at exit ("terminate
    called without an active exception", seen once in tests/test_distributed.py). `wait`: first a barrier, so that
    every rank is done with its collectives; only on a normal finish (after a failure the barrier would hang until
    the group's timeout instead of letting torchrun stop the others). At exit (`init_from_env`) it does not wait."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def shard(n: int, rank: int, size: int) -> range:
    """Contiguous share of n items for `rank` (the first n % size ranks get one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def all_gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's rows (shards of `n` rows, in rank order) on every rank."""
    rank, size = world()
    if size == 1:
        return local
    most = len(shard(n, 0, size))
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([parts[r][: len(shard(n, r, size))] for r in range(size)])


_control = None  # a gloo group for host-side agreement, so it never waits on a CUDA stream


def agree_any(flag: bool) -> bool:
    """True if `flag` is true on any rank (every rank must call this together); `flag` alone on one process."""
    global _control
    rank, size = world()
    if size == 1:
        return flag
    if _control is None:
        _control = dist.new_group(backend="gloo")
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())
