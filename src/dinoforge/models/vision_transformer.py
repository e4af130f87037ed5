"""The DINOv2 Vision Transformer backbone, parameter-compatible with the official implementation.

Token order everywhere (attention maps, `x_prenorm`): CLS, then the register tokens, then the
patch tokens in row-major order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.models.layers import Block, Mlp, PackedLayout, PatchEmbed, SwiGLUFFNFused
from dinoforge.utils import DinoforgeError

FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], offset: float, antialias: bool) -> Tensor:
    """Resize position embeddings (1, 1 + M·M, D) to a patch grid (h, w) exactly like the official code, in fp32.

    The CLS position is kept. Offset mode (released models): bicubic with scale factor (h + offset) / M. Offset 0
    (register models): bicubic to an explicit size, optionally antialiased. Used at forward time for inputs of
    another size and, once, when weights are loaded into a model built for another image size.
    """
    pos = pos_embed.float()
    n, dim = pos.shape[1] - 1, pos.shape[-1]
    m = math.isqrt(n)
    if m * m != n:
        raise DinoforgeError(f"position embedding of {n} patches is not a square grid; cannot resize it")
    h, w = grid
    patches = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs: dict[str, Any] = {"scale_factor": ((h + offset) / m, (w + offset) / m)}
    else:
        kwargs = {"size": (h, w)}
    patches = F.interpolate(patches, mode="bicubic", antialias=antialias, **kwargs)
    return torch.cat((pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


INIT_SCHEMES = ("official", "xavier")


class DinoVisionTransformer(nn.Module):
    """ViT with CLS/register/mask tokens, LayerScale and official position-embedding interpolation.

    Constructor keywords are the official ones; `model.arch` keeps them so weights can be saved with
    their architecture. `block_chunks` is accepted for compatibility only: blocks are always stored
    flat (`blocks.{i}`) and chunked checkpoints are re-keyed on load. `pad_to_patch=True` zero-pads
    inputs whose sides are not multiples of the patch size (bottom/right); otherwise they are an error.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        pad_to_patch: bool = False,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise DinoforgeError(f"unknown ffn_layer {ffn_layer!r}; choose one of {', '.join(FFN_LAYERS)}")
        self.arch: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            ffn_bias=ffn_bias, proj_bias=proj_bias,
            drop_path_rate=drop_path_rate, drop_path_uniform=drop_path_uniform, init_values=init_values,
            ffn_layer=ffn_layer, block_chunks=block_chunks, num_register_tokens=num_register_tokens,
            interpolate_antialias=interpolate_antialias, interpolate_offset=interpolate_offset,
            pad_to_patch=pad_to_patch,
        )  # fmt: skip
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.pad_to_patch = pad_to_patch
        self.chunked_blocks = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                ffn=_make_ffn(ffn_layer, embed_dim, hidden, ffn_bias),
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                drop_path=rates[i],
                init_values=init_values,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self, scheme: str = "official") -> None:
        """official: pos_embed trunc-normal 0.02, CLS/registers normal 1e-6, Linear trunc-normal 0.02 (the patch
        embedding keeps PyTorch's default). xavier: the same but xavier-uniform on every Linear and on the patch
        embedding, CLS/registers normal 0.02: from scratch its branches write ~5x more into the residual stream,
        so a short run starts from distinct images (docs/learning.md)."""
        if scheme not in INIT_SCHEMES:
            raise DinoforgeError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
        token_std = 1e-6 if scheme == "official" else 0.02
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=token_std)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=token_std)
        nn.init.zeros_(self.mask_token)
        if scheme == "xavier":
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if scheme == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def set_img_size(self, img_size: int) -> None:
        """Rebuild for `img_size` in place: the position embedding is resized once (`resize_pos_embed`, as the
        forward would at that size) into the same Parameter object, so an optimizer keeps tracking it."""
        side = img_size // self.patch_size
        pos = self.pos_embed
        pos.data = resize_pos_embed(pos, (side, side), self.interpolate_offset, self.interpolate_antialias).to(pos)
        pos.grad = None
        pe = self.patch_embed
        pe.img_size, pe.grid_size, pe.num_patches = (img_size, img_size), (side, side), side * side
        self.arch["img_size"] = img_size

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embeddings for an h×w input (x holds CLS + patch tokens), resized by `resize_pos_embed`."""
        if x.shape[1] == self.pos_embed.shape[1] and h == w:
            return self.pos_embed
        grid = (h // self.patch_size, w // self.patch_size)
        return resize_pos_embed(self.pos_embed, grid, self.interpolate_offset, self.interpolate_antialias).to(x.dtype)

    def _check_size(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p == 0 and w % p == 0:
            return x
        if not self.pad_to_patch:
            raise DinoforgeError(
                f"input size {h}x{w} is not a multiple of the patch size {p}; resize or crop it, "
                "or build the model with pad_to_patch=True"
            )
        return F.pad(x, (0, (-w) % p, 0, (-h) % p))

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Patch-embed, replace masked patches by mask_token, add CLS + positions, insert registers."""
        x = self._check_size(x)
        h, w = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens + 1
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r],
            "x_norm_patchtokens": x_norm[:, r:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self,
        x: Tensor | list[Tensor],
        masks: Tensor | list[Tensor | None] | None = None,
        packing: str | None = None,
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Token features as a dict; a list of inputs (e.g. global and local crops) gives a list of dicts.

        `packing` ("njt" or "flex", see layers/packing.py) runs a list's crops through each block as one packed
        sequence with attention kept inside each crop; None runs each input as its own batch.
        """
        if isinstance(x, list):
            masks_list = masks if masks is not None else [None] * len(x)
            tokens = [self.prepare_tokens_with_masks(t, m) for t, m in zip(x, masks_list, strict=True)]
            if packing is not None:
                return self._forward_packed(tokens, masks_list, packing)
            for blk in self.blocks:
                tokens = blk(tokens)
            return [self._outputs(t, m) for t, m in zip(tokens, masks_list, strict=True)]
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self._outputs(tokens, masks)

    def _forward_packed(
        self, tokens: list[Tensor], masks: Sequence[Tensor | None], backend: str
    ) -> list[dict[str, Tensor | None]]:
        layout = PackedLayout([t.shape[:2] for t in tokens], backend, tokens[0].device)
        x = layout.pack(tokens)
        for blk in self.blocks:
            x = blk(x, layout)
        return [self._outputs(t, m) for t, m in zip(layout.unpack(x), masks, strict=True)]

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise DinoforgeError(f"n={n} blocks requested but the model has {depth}")
            return list(range(depth - n, depth))
        out = []
        for i in n:
            if not -depth <= i < depth:
                raise DinoforgeError(f"block index {i} out of range for a model with {depth} blocks")
            out.append(i % depth)
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last `n` blocks (or of the listed block indices), optionally normed,
        reshaped to [B, D, h, w] and paired with the class token, as in the official API."""
        x = self._check_size(x)
        wanted = self._block_indices(n)
        tokens = self.prepare_tokens_with_masks(x)
        taken = {}
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in wanted:
                taken[i] = tokens
        outputs = [taken[i] for i in wanted]
        if norm:
            outputs = [self.norm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        outputs = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            outputs = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens, strict=True))
        return tuple(outputs)

    def get_attention_maps(self, x: Tensor, blocks: Sequence[int] = (-1,)) -> list[Tensor]:
        """Attention probabilities [B, heads, T, T] of the listed blocks (tokens: CLS, registers, patches)."""
        wanted = self._block_indices(list(blocks))
        tokens = self.prepare_tokens_with_masks(x)
        maps = {}
        for i, blk in enumerate(self.blocks):
            if i in wanted:
                maps[i] = blk.attn.attention_weights(blk.norm1(tokens))
            if i >= max(wanted):
                break
            tokens = blk(tokens)
        return [maps[i] for i in wanted]

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Attention probabilities [B, heads, T, T] of the last block."""
        return self.get_attention_maps(x, [-1])[0]

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Tensor | dict | list:
        """Normed CLS features (through `head`), or the full `forward_features` output when is_training."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def _make_ffn(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    if kind == "mlp":
        return Mlp(dim, hidden, bias=bias)
    if kind in ("swiglu", "swiglufused"):
        return SwiGLUFFNFused(dim, hidden, bias=bias)
    return nn.Identity()


# The DINOv2 sizes, by factory name (also the config's student.arch): width, depth, heads and FFN ratio. The FFN
# kind is not a size's: the factories default to "mlp", the released giant uses "swiglufused".
ARCHS: dict[str, dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4.0),
}


def _vit(arch: str, patch_size: int, kwargs: dict[str, Any]) -> DinoVisionTransformer:
    kwargs.setdefault("img_size", 518)
    kwargs.setdefault("init_values", 1.0)
    kwargs.setdefault("block_chunks", 0)
    return DinoVisionTransformer(patch_size=patch_size, **ARCHS[arch], **kwargs)


def vit_small(patch_size: int = 14, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 blocks, 6 heads."""
    return _vit("vit_small", patch_size, kwargs)


def vit_base(patch_size: int = 14, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 blocks, 12 heads."""
    return _vit("vit_base", patch_size, kwargs)


def vit_large(patch_size: int = 14, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 blocks, 16 heads."""
    return _vit("vit_large", patch_size, kwargs)


def vit_giant2(patch_size: int = 14, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-g/2 of DINOv2: 1536 wide, 40 blocks, 24 heads (use ffn_layer='swiglufused' as released)."""
    return _vit("vit_giant2", patch_size, kwargs)
