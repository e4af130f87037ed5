"""The soft-target cross-entropy of DINO and iBOT, over row chunks, always in fp32.

With 65,536 or 131,072 prototypes the loss's [rows, K] temporaries (fp32 copy, scaled logits, log-softmax kept for
backward, product, its gradient) outweigh the logits themselves. `soft_cross_entropy` keeps only the logits and the
targets for backward and builds each [chunk, K] temporary one chunk at a time; backward recomputes the softmax.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

# Elements of one [chunk, K] fp32 temporary: large on GPUs (few kernel launches), cache-sized on CPUs, where it is
# also faster than the whole-tensor formula.
CHUNK_ELEMENTS = {"cuda": 2**26, "cpu": 2**20}


def float32_region(t: torch.Tensor) -> AbstractContextManager:
    """Autocast switched off on `t`'s device: what runs inside computes in the dtype of its (fp32) inputs."""
    return torch.autocast(t.device.type, enabled=False)


def _row_slices(t: torch.Tensor, chunk_rows: int | None) -> list[slice]:
    n_rows, n_cols = t.shape
    budget = CHUNK_ELEMENTS.get(t.device.type, CHUNK_ELEMENTS["cpu"])
    step = chunk_rows or max(1, budget // max(n_cols, 1))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row −Σ_k t_k·log_softmax(s/T)_k; backward (softmax(s/T)·Σt − t)/T, recomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float, chunk_rows: int | None):
        ce = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        with float32_region(logits):
            for rows in _row_slices(logits, chunk_rows):
                log_p = F.log_softmax(logits[rows].float() / temp, dim=-1)
                ce[rows] = -(log_p.mul_(targets[rows])).sum(-1)
        ctx.save_for_backward(logits, targets)
        ctx.temp, ctx.chunk_rows = temp, chunk_rows
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        with float32_region(logits):
            for rows in _row_slices(logits, ctx.chunk_rows):
                t = targets[rows].float()
                p = F.softmax(logits[rows].float() / ctx.temp, dim=-1)
                grad[rows] = p.mul_(t.sum(-1, keepdim=True)).sub_(t).mul_(grad_ce[rows, None].float() / ctx.temp)
        return grad, None, None, None


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temp: float, chunk_rows: int | None = None
) -> torch.Tensor:
    """Per-row fp32 cross-entropy −Σ_k targets·log_softmax(logits/temp) of [N, K] inputs, CHUNK_ELEMENTS/K rows
    at a time (`chunk_rows` to choose), in fp32 under autocast too; gradients reach `logits` only."""
    if targets.requires_grad:
        raise ValueError("soft_cross_entropy: the targets (teacher probabilities) must not require gradients")
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"soft_cross_entropy: [N, K] logits and targets, got {logits.shape} and {targets.shape}")
    return _SoftCrossEntropy.apply(logits, targets, temp, chunk_rows)
