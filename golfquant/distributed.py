"""Process groups from torchrun's environment, and the collectives training and quantization share.

One process: everything here is a no-op (or the identity). Under `torchrun --nproc_per_node=N`: NCCL with one GPU
per process (LOCAL_RANK) when CUDA is available, gloo on CPU otherwise.

Work is shared out so that the result does not depend on how many processes did it: items are assigned to ranks
by a rule of the item's index (`my_items`), every rank ends with everything (`gather`), and a rank that fails
makes every rank raise its error at the same point (`collective`), instead of leaving the others waiting.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from golfquant.errors import GolfquantError, OptionError

T = TypeVar("T")


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
    """Leave the process group once every process is done with it, and free it now: a gloo group still alive
    (held by a reference cycle) when the interpreter exits aborts the process."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
        gc.collect()


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum or max) over the group; the tensor itself on one process."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def rank_slice(n: int, env: DistEnv) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n items (shares differ by at most one)."""
    return n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size


def my_items(items: Sequence[T], sizes: Sequence[float] | None = None) -> list[T]:
    """This rank's share of `items`: round robin over the items, the largest first when `sizes` are given, so
    that the shares take about the same time. The same items on every rank give disjoint shares covering all."""
    env = current()
    order = sorted(range(len(items)), key=lambda i: (-sizes[i], i)) if sizes is not None else range(len(items))
    return [items[i] for k, i in enumerate(order) if k % env.world_size == env.rank]


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank ([obj] on one process)."""
    if not current().enabled:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective(fn: Callable[[], T]) -> list[T]:
    """Run `fn` on every rank and gather its results; when it raises on any rank, every rank raises that rank's
    error (a GolfquantError keeps its type's message; anything else is reported with the rank), so no rank is
    left waiting in a later collective."""
    if not current().enabled:
        return [fn()]
    try:
        result, error = fn(), None
    except GolfquantError as e:
        result, error = None, e
    except Exception as e:  # noqa: BLE001: carried to every rank, then raised there
        result, error = None, RuntimeError(f"rank {current().rank}: {type(e).__name__}: {e}")
    outcomes = gather((result, error))
    for _, err in outcomes:
        if err is not None:
            err.raised_on_every_rank = True  # so that the CLI reports it once
            raise err
    return [r for r, _ in outcomes]


def on_main(fn: Callable[[], T]) -> T:
    """`fn` run on rank 0 only, its result (or its error) handed to every rank: how files are read and written, so
    that one process touches them and every rank goes on with the same outcome."""
    return collective(lambda: fn() if current().is_main else None)[0]


def resolve_device(text: str) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`. Under torchrun a bare `cuda` or
    `auto` is this process's GPU (LOCAL_RANK). A CUDA device on a machine without CUDA is an OptionError."""
    name = text.strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise OptionError(f"--device {text!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise OptionError(f"--device {text}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                          "use --device cpu")
    if name in ("auto", "cuda"):
        return torch.device("cuda", current().local_rank if current().enabled else torch.cuda.current_device())
    try:
        index = int(name[5:])
    except ValueError:
        raise OptionError(f"--device {text!r}: the GPU index must be an integer (cuda:0)") from None
    if not 0 <= index < torch.cuda.device_count():
        raise OptionError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)
