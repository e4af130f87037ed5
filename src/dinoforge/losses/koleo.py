"""KoLeo regulariser: spreads the student's L2-normalised CLS features by pushing nearest neighbours apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.losses.cross_entropy import float32_region


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimate: −mean_i log(‖x_i − x_nn(i)‖ + eps); 0 at batch size one, where the
    official code takes a sample as its own neighbour (−log(eps·√D), inf in fp16)."""

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """student_output: [B, D] features of one crop set (not two views of the same images); fp32 under autocast
        too, so that low-precision dot products cannot pick another nearest neighbour."""
        with float32_region(student_output):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            if x.shape[0] < 2:
                return x.sum() * 0.0
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-2.0)  # below any cosine, so a sample is never its own neighbour
                nn_index = dots.argmax(dim=1)
            dist = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
            return -torch.log(dist + eps).mean()
