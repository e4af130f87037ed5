"""DINO loss on the CLS token: cross-entropy of student crops against the centred, sharpened teacher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dinoforge.losses.centering import ema_center, sinkhorn_knopp, softmax_center
from dinoforge.losses.cross_entropy import soft_cross_entropy


class DINOLoss(nn.Module):
    """Cross-entropy between teacher probabilities and student log-softmax (DINO; DINOv2 §4), summed over the
    (student, teacher) pairs given: the caller pairs the crops and divides by the number of terms."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities with the EMA centre subtracted (call `update_center` afterwards)."""
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Teacher probabilities balanced over prototypes by Sinkhorn-Knopp (across all processes)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(
        self,
        student_output_list: Sequence[torch.Tensor],
        teacher_out_softmaxed_centered_list: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Sum over the student crops of the batch-mean cross-entropy against the sum of the teacher targets ([B, K]
        each; the loss is linear in the target, so this equals the sum over pairs)."""
        targets = sum(t.float() for t in teacher_out_softmaxed_centered_list)
        total = torch.zeros((), device=student_output_list[0].device)
        for s in student_output_list:
            total = total + soft_cross_entropy(s, targets, self.student_temp).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher logits' batch mean (all-reduced when distributed)."""
        self.center.copy_(ema_center(self.center, teacher_output, self.center_momentum))
