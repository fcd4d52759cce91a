"""Several processes under torchrun: joining the process group, agreeing on a stop, and checking
that DistributedDataParallel kept the replicas equal. A run is distributed when torchrun set
RANK; every function here is a no-op answer for a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: torch.device):
    """(rank, world, device, distributed) for this process. A process started by torchrun
    (which sets RANK) joins a process group, even alone: NCCL on CUDA (one GPU per local
    rank), gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, device, False
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, True


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all processes (a sum, then a division: gloo has no average)."""
    total = value.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def any_process(flag: bool, distributed: bool) -> bool:
    """True if `flag` holds on any process: a stop decided by one process (its clock) stops all."""
    if not distributed:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def replica_divergence(model) -> float:
    """Largest |w_rank - w_rank0| over all weights and ranks: 0.0 when DDP kept them in step."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
