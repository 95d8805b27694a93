"""Pre-training across processes (torchrun, DistributedDataParallel): the process group and the collectives the
loop needs; each is a no-op in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group from torchrun's variables if needed
    (NCCL with CUDA unless RELTAG_DIST_BACKEND=gloo, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = (
            "nccl"
            if torch.cuda.is_available() and os.environ.get("RELTAG_DIST_BACKEND") != "gloo"
            else "gloo"
        )
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def min_over_ranks(n: int, device: torch.device) -> int:
    """The smallest `n` of all ranks (every rank takes the same number of steps: DDP needs it)."""
    if not is_distributed():
        return n
    t = torch.tensor([n], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def mean_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` averaged over the ranks (the logged losses)."""
    if not is_distributed():
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values / dist.get_world_size()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (the RNG states a checkpoint holds)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
