"""Teacher-output centering shared by the DINO and iBOT losses: softmax with an EMA centre, or Sinkhorn-Knopp.

Both reduce across processes only when torch.distributed is initialised, so a single process gives the
same numbers as a 1-process group (the official iBOT Sinkhorn-Knopp all-reduces unconditionally and fails
outside one).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinoforge.distributed import all_reduce_sum, is_enabled


@torch.no_grad()
def softmax_center(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Teacher probabilities: subtract the running centre, sharpen by `temp`, softmax over prototypes."""
    return F.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def ema_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """New centre = momentum·centre + (1−momentum)·mean of `logits` [..., K] over every row of every process
    (a process may bring no rows)."""
    flat = logits.detach().float().reshape(-1, logits.shape[-1])
    stats = torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])
    all_reduce_sum(stats)
    batch_center = (stats[:-1] / stats[-1].clamp(min=1.0)).reshape(center.shape)
    updated = center * momentum + batch_center * (1.0 - momentum)
    return torch.where(stats[-1] > 0, updated, center)  # no rows anywhere: keep the centre


def _logsumexp(x: torch.Tensor, dim: int | None, across_processes: bool) -> torch.Tensor:
    """log Σ exp(x) over `dim` (all elements when None), optionally across processes: the large tensor is reduced
    locally, only the small per-process results are combined."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    local = torch.logsumexp(x, dim=dims, keepdim=True)  # -inf where this process has no rows
    if not (across_processes and is_enabled()):
        return local
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(local - peak)
    dist.all_reduce(total)
    return peak + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    n_samples: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Balanced soft assignment of the rows of `logits` [B, K] to K prototypes (SwAV), as the official code but in the
    log domain so large logits/temp cannot overflow; `n_samples` is the local count of real rows."""
    log_q = logits.float() / temp  # B x K: rows are samples, columns prototypes
    n_proto = log_q.shape[1]
    local = log_q.shape[0] if n_samples is None else n_samples
    n_total = torch.as_tensor(local, dtype=torch.float32, device=log_q.device).clone().reshape(())
    log_b = torch.log(all_reduce_sum(n_total))
    log_k = math.log(n_proto)

    log_q -= _logsumexp(log_q, None, across_processes=True)
    for _ in range(n_iterations):
        log_q -= _logsumexp(log_q, 0, across_processes=True) + log_k  # each prototype: mass 1/K
        log_q -= _logsumexp(log_q, 1, across_processes=False) + log_b  # each sample: mass 1/B
    return log_q.add_(log_b).exp_()
