"""Training's collectives over the process group that dinoforge.distributed joins: gradient averaging, rank 0's
parameters to every process, FSDP2 sharding."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from dinoforge.distributed import world_size


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
