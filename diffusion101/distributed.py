"""Several processes under torchrun: joining the process group, agreeing on a stop, and checking
that DistributedDataParallel kept the replicas equal. A run is distributed when torchrun set
RANK; every function here is a no-op answer for a single process."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .config import UserError

# What torchrun sets for each process it starts: RANK without the others was set by hand.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a process waits for the others to join (seconds; DIFFUSION101_PEER_TIMEOUT): a peer
# that never comes (a crashed process, a wrong WORLD_SIZE) ends the run with a line, not a hang.
PEER_TIMEOUT = 300.0


def _whole_number(name: str, low: int, high: int) -> int:
    text = os.environ[name]
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a whole number (torchrun sets it)") from None
    if not low <= value <= high:
        raise UserError(f"{name}={value} is out of range ({low}..{high})")
    return value


def environment():
    """torchrun's variables, checked before any process group starts: None for one process
    (RANK unset), else (rank, world, local_rank). Any of them missing, not a number, or out of
    range (RANK from 0 to WORLD_SIZE - 1) is a UserError."""
    if "RANK" not in os.environ:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise UserError(f"RANK is set but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: start several processes "
                        f"with torchrun --nproc_per_node=N, or unset RANK to run one")
    world = _whole_number("WORLD_SIZE", 1, 65536)
    rank, local_rank = _whole_number("RANK", 0, world - 1), _whole_number("LOCAL_RANK", 0, world - 1)
    _whole_number("MASTER_PORT", 1, 65535)
    return rank, world, local_rank


def peer_timeout() -> float:
    text = os.environ.get("DIFFUSION101_PEER_TIMEOUT") or str(PEER_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 86400:  # (NaN fails too)
        raise UserError(f"DIFFUSION101_PEER_TIMEOUT={text!r} must be seconds in (0, 86400]")
    return seconds


def setup(device: torch.device):
    """(rank, world, device, distributed) for this process. A process started by torchrun
    (which sets RANK) joins a process group, even alone: NCCL on CUDA (one GPU per local
    rank), gloo on CPU; it waits at most peer_timeout() seconds for the others."""
    found = environment()
    if found is None:
        return 0, 1, device, False
    rank, world, local_rank = found
    timeout = peer_timeout()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # torch's store and rendezvous errors
            raise UserError(f"process {rank} of {world} could not join the others at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                            f"{timeout:g} s ({str(e).splitlines()[0][:120]}); is every process "
                            f"started, with the same WORLD_SIZE?") from None
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
