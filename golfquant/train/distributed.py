"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

One process: everything here is a no-op. Under `torchrun --nproc_per_node=N`: NCCL with one GPU per process
(LOCAL_RANK) when CUDA is available, gloo on CPU otherwise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from golfquant.errors import OptionError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def init_from_env() -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), if any.

    Idempotent: a group that is already initialized is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistEnv()
    if not dist.is_available():
        raise OptionError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise OptionError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible; "
                              "use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def current() -> DistEnv:
    """The process group this process is in (set up by `init_from_env` or the caller), or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum or max) over the group; the tensor itself on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_slice(n: int, env: DistEnv) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n items (shares differ by at most one)."""
    return n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size
