"""ONNX export of the backbone with dynamic batch, height and width (checked with onnxruntime)."""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import Tensor, nn

from dinoforge.utils import DinoforgeError

OUTPUT_NAMES = ("cls_token", "patch_tokens")


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys cubic convolution kernel with parameter a (PyTorch: -0.75 plain, -0.5 antialiased)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n_in: int, n_out, coord_scale: Tensor, antialias: bool) -> Tensor:
    """[n_out, n_in] matrix W with W @ v == F.interpolate(v, mode="bicubic") along one axis.

    coord_scale is PyTorch's source/destination scale (M / (n + offset) or M / n). Built from
    tensor ops only, so it stays dynamic in an exported graph where n_out is symbolic.
    """
    dst = torch.arange(n_out, dtype=torch.float32)
    src = torch.arange(n_in, dtype=torch.float32)
    if not antialias:
        real = (dst + 0.5) * coord_scale - 0.5
        base = torch.floor(real)
        t = real - base
        w = torch.zeros(dst.shape[0], n_in)
        for k in range(4):
            idx = torch.clamp(base - 1 + k, 0, n_in - 1)
            w = w + _cubic(t - (k - 1), -0.75)[:, None] * (src[None, :] == idx[:, None])
        return w
    s = torch.clamp(coord_scale, min=1.0)
    support = 2.0 * s
    center = coord_scale * (dst + 0.5)
    lo = torch.clamp(torch.floor(center - support + 0.5), min=0)[:, None]
    hi = torch.clamp(torch.floor(center + support + 0.5), max=n_in)[:, None]
    w = _cubic((src[None, :] - center[:, None] + 0.5) / s, -0.5)
    w = w * ((src[None, :] >= lo) & (src[None, :] < hi))
    return w / w.sum(dim=1, keepdim=True)


def _traceable_pos_encoding(self: nn.Module, x: Tensor, h, w) -> Tensor:
    """Same result as DinoVisionTransformer.interpolate_pos_encoding, as separable bicubic matrices
    (F.interpolate would freeze the example's output size in the exported graph)."""
    n = self.pos_embed.shape[1] - 1
    m = int(round(n**0.5))
    h0, w0 = h // self.patch_size, w // self.patch_size
    off = self.interpolate_offset
    one = torch.ones((), dtype=torch.float32)
    sh = one * m / (h0 + off) if off else one * m / h0
    sw = one * m / (w0 + off) if off else one * m / w0
    wh = bicubic_matrix(m, h0, sh, self.interpolate_antialias)
    ww = bicubic_matrix(m, w0, sw, self.interpolate_antialias)
    native = (torch.arange(h0)[:, None] == torch.arange(m)[None, :]).float()
    is_native = (one * h0 == m) & (one * w0 == m)
    wh = torch.where(is_native, native, wh)
    ww = torch.where(is_native, (torch.arange(w0)[:, None] == torch.arange(m)[None, :]).float(), ww)
    pos = self.pos_embed.float()
    grid = pos[0, 1:].reshape(m, m, -1)
    grid = torch.einsum("im,mnd,jn->ijd", wh, grid, ww).reshape(1, -1, grid.shape[-1])
    return torch.cat((pos[:, :1], grid), dim=1).to(x.dtype)


class _Features(nn.Module):
    """Wraps the backbone so the graph returns (normed CLS [B, D], normed patch tokens [B, N, D])."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        out = self.backbone.forward_features(pixel_values)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def export_onnx(model: nn.Module, path: str | Path, img_size: int | None = None, opset: int = 18) -> Path:
    """Export `pixel_values [B, 3, H, W]` -> (`cls_token`, `patch_tokens`) with B, H, W dynamic.

    H and W must be multiples of the patch size at run time; `img_size` is only the tracing example.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = model.patch_size
    side = img_size or 4 * p
    if side % p:
        raise DinoforgeError(f"img_size {side} is not a multiple of the patch size {p}")
    in_chans = model.patch_embed.proj.in_channels
    example = torch.randn(2, in_chans, side, side + p, device=next(model.parameters()).device)
    wrapper = _Features(model).eval()
    model.interpolate_pos_encoding = types.MethodType(_traceable_pos_encoding, model)
    batch, height, width = (torch.export.Dim(n, min=1 if n == "batch" else p) for n in ("batch", "height", "width"))
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    except Exception as e:
        raise DinoforgeError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    finally:
        del model.interpolate_pos_encoding
    return path
