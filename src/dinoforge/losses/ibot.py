"""iBOT loss: cross-entropy between teacher and student on the masked patch tokens of the global crops."""

from __future__ import annotations

import torch
from torch import nn

from dinoforge.losses.centering import ema_center, sinkhorn_knopp, softmax_center
from dinoforge.losses.cross_entropy import soft_cross_entropy


class iBOTPatchLoss(nn.Module):  # noqa: N801 - official name, so configs and call sites map 1:1
    """Masked-patch cross-entropy, each image's masked patches weighted 1/(its number of masked patches)."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher patch probabilities with the EMA centre subtracted; any leading shape, last dim K."""
        center = self.center.reshape(-1)
        return softmax_center(teacher_patch_tokens, center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | int,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp over the masked patches [M, K]; the sample count is summed across processes only
        when torch.distributed is initialised (the caller's tensor is not modified)."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, n_samples=n_masked_patches_tensor)

    def forward(
        self,
        student_patch_tokens: torch.Tensor,
        teacher_patch_tokens: torch.Tensor,
        student_masks_flat: torch.Tensor,
    ) -> torch.Tensor:
        """Dense variant on [B, N, K] tokens: per-image mean over masked patches, then mean over images."""
        k = student_patch_tokens.shape[-1]
        ce = -soft_cross_entropy(
            student_patch_tokens.reshape(-1, k), teacher_patch_tokens.reshape(-1, k), self.student_temp
        ).view(student_patch_tokens.shape[:-1])
        masks = student_masks_flat.float()
        per_image = (ce * masks).sum(-1) / masks.sum(-1).clamp(min=1.0)
        return -per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss on gathered masked tokens [M, K]: −Σ_m w_m·CE_m / B, w_m = 1/(masked count of m's image).

        `student_masks_flat` is the [B, N] bool mask (gives B and, when `masks_weight` is None, the weights);
        `n_masked_patches` truncates padded rows beyond the real masked tokens.
        """
        rows = slice(n_masked_patches)  # all rows when None
        ce = soft_cross_entropy(student_patch_tokens_masked[rows], teacher_patch_tokens_masked[rows], self.student_temp)
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        return (ce * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """EMA of the mean teacher patch logits over all given tokens (all-reduced when distributed)."""
        self.center.copy_(ema_center(self.center, teacher_patch_tokens, self.center_momentum))
