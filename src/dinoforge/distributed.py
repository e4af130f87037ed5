"""Process groups under torchrun (gloo on CPU, NCCL on GPU): rank, world size, joining and leaving the group.

The only module that asks torch.distributed (or torchrun's environment) who this process is; everything else
calls these helpers, which answer rank 0 of 1 outside a distributed run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dinoforge.utils import resolve_device


def is_enabled() -> bool:
    """True when a torch.distributed process group is initialised (of any size, 1 included)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """The number of processes torchrun started on this node (its LOCAL_WORLD_SIZE; 1 when not launched by it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def rank_world_or_env() -> tuple[int, int]:
    """(rank, world size) of the process group when one is initialised, else torchrun's RANK / WORLD_SIZE, else
    (0, 1). For work split by rank through files: a library caller under torchrun that has not started a
    process group still gets its own share, so two processes never write the same shards."""
    if is_enabled():
        return rank(), world_size()
    return int(os.environ.get("RANK", 0)), launched_world_size()


def init_from_env(device: str | None = None) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU) and return this process's
    device: `device` ("auto"/None: CUDA when present) with the CUDA index taken from LOCAL_RANK."""
    use_cuda = resolve_device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if launched_world_size() > 1 and not is_enabled():
        backend = "nccl" if use_cuda else "gloo"
        store = _restart_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            rank_here, world = int(os.environ["RANK"]), launched_world_size()
            dist.init_process_group(backend=backend, store=store, rank=rank_here, world_size=world)
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def _restart_store() -> dist.Store | None:
    """torchrun's agent store with its keys under this restart's prefix, when torchrun restarted the workers
    (--max-restarts); else None (the default env:// rendezvous).

    The agent keeps one store across restarts, so a restarted worker would read the dead worker's gloo address (or
    NCCL id) left there and hang connecting to it; a prefix per restart keeps each attempt's keys apart."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return dist.PrefixStore(f"dinoforge/restart_{restart}", store)


def shutdown() -> None:
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` in place across processes when a process group exists; a no-op otherwise."""
    if is_enabled():
        dist.all_reduce(t)
    return t


def all_ranks(flag: bool) -> bool:
    """True only when `flag` is true on every process (one all-reduce): a branch that skips a collective step (a
    batch with no readable image on one rank) is taken by every rank or by none, so no rank waits forever."""
    if world_size() == 1:
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of scalar tensors over processes, as Python floats (for logging)."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].float().reshape(()) for k in keys])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` as `src` has it, on every process (picklable objects; the object itself outside a distributed run)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object) -> list:
    """Every process's `obj`, in rank order, on every process (`[obj]` outside a distributed run)."""
    if world_size() == 1:
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts
