"""DINO / iBOT projection head: MLP → L2-normalised bottleneck → weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g · v / ‖v‖ per output row (Salimans & Kingma 2016).

    Stores `weight_g` [out, 1] and `weight_v` [out, in] like `torch.nn.utils.weight_norm`, so official head
    checkpoints load unchanged, without the deprecated hook-based implementation.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        v = nn.Linear(in_features, out_features, bias=False).weight.detach()
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight matrix [out, in]."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head of DINO/iBOT: `nlayers`-layer MLP (GELU) to a bottleneck, L2 normalisation, then a
    weight-normalised linear layer onto `out_dim` prototypes with g initialised to 1 (trainable, as official).

    State-dict keys match the official head: `mlp.0.weight`, ..., `last_layer.weight_g`, `.weight_v`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = _mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def cancel_last_layer_gradients(module: nn.Module) -> None:
    """Drop the gradients of every head `last_layer` parameter in `module` (call between backward and step).

    Keeps the prototypes fixed during the first epoch, as DINO does; AdamW skips parameters without a
    gradient, so neither the update nor the weight decay touches them.
    """
    for name, param in module.named_parameters():
        if "last_layer" in name:
            param.grad = None
