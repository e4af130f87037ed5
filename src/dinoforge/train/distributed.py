"""torchrun-aware process groups (gloo on CPU, NCCL on GPU), gradient averaging and FSDP2 sharding."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: str | None = None) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU) and return this process's
    device: `device` ("auto"/None: CUDA when present) with the CUDA index taken from LOCAL_RANK."""
    from dinoforge.utils import resolve_device

    use_cuda = resolve_device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_enabled():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def shutdown() -> None:
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def average_gradients(modules: list[nn.Module]) -> None:
    """Average gradients across processes with one flat all-reduce per module (data-parallel training)."""
    if world_size() == 1:
        return
    for m in modules:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


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


def broadcast_module(module: nn.Module) -> None:
    """Make every process start from rank 0's parameters and buffers."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def fully_shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: shard every transformer block, then each submodule of the student, the teacher and (distillation)
    the student's EMA, all alike.
    Backbones are called through `forward_features`, so that method gets FSDP's unshard/reshard hooks too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # forward_features returns views (CLS = x_norm[:, 0]); the meta-architecture uses them out of place only
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for side in (model.student, model.teacher, getattr(model, "student_ema", {})):
        for name, sub in side.items():
            if name == "backbone":
                for block in sub.blocks:
                    fully_shard(block, **kwargs)
            fully_shard(sub, **kwargs)
            if name == "backbone":
                register_fsdp_forward_method(sub, "forward_features")


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in `module` (FSDP2 keeps a root unit's parameters gathered
    after a forward that is followed by no backward, e.g. the teacher's); no-op for unsharded modules."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
