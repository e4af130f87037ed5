"""Hugging Face Dinov2Model / Dinov2WithRegistersModel weights <-> official names (fused qkv <-> q/k/v), and
reading a HF model folder.

Exported folders use the hub key names (transformers 4.x: `attention.attention.query`, ...), which
transformers 5.x renames on load; imports accept both those and the 5.x in-memory names (`q_proj`, ...).
HF's Dinov2Model resizes position embeddings to an explicit size (no 0.1 offset), so for non-register
models its features equal ours at the native resolution only; Dinov2WithRegistersModel matches everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinoforge.utils import DinoforgeError, read_json

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# hub (transformers 4.x) names <-> official names: the one table both directions use
_HUB_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "embeddings.register_tokens": "register_tokens",
}
_HUB_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
}
_HUB_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_TO_HUB_BLOCK = {official: hub for hub, official in _HUB_BLOCK.items()}
# transformers 5.x in-memory names, accepted on import only
_HF_BLOCK_NAMES = {**_HUB_BLOCK, "attention.o_proj": "attn.proj", "mlp.down_proj": "mlp.w3"}
_QKV = {name: j for j, name in enumerate(_HUB_QKV)} | {
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_SWIGLU_SPLIT = {"mlp.gate_proj": 0, "mlp.up_proj": 1}


def hf_to_official(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a Dinov2(WithRegisters)Model state dict (4.x or 5.x names) to official backbone keys."""
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    for key, v in hf.items():
        key = re.sub(r"^(dinov2_with_registers|dinov2)\.", "", key)
        if key in _HUB_TOP:
            out[_HUB_TOP[key]] = v
            continue
        m = _LAYER.match(key)
        if not m:
            continue  # classifier heads and pooler weights are not part of the backbone
        i, rest = m.group(1), m.group(2)
        module, _, param = rest.rpartition(".")
        if module in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{i}.ls{module[-1]}.gamma"] = v
        elif module in _HF_BLOCK_NAMES:
            out[f"blocks.{i}.{_HF_BLOCK_NAMES[module]}.{param}"] = v
        elif module in _QKV:
            parts.setdefault(f"blocks.{i}.attn.qkv.{param}", {})[_QKV[module]] = v
        elif module in _SWIGLU_SPLIT:
            parts.setdefault(f"blocks.{i}.mlp.w12.{param}", {})[_SWIGLU_SPLIT[module]] = v
        else:
            raise DinoforgeError(f"unknown Hugging Face DINOv2 weight {key!r}")
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[j] for j in sorted(pieces)], dim=0)
    return out


def official_to_hf(sd: dict[str, Tensor], arch: dict[str, Any]) -> dict[str, Tensor]:
    """Map official backbone keys to hub-format Dinov2 names, adding the parts HF always has
    (LayerScale ones, zero biases) when the model lacks them."""
    dim = arch["embed_dim"]
    out = {hub: sd[name] for hub, name in _HUB_TOP.items() if name != "register_tokens" or name in sd}
    for i in range(arch["depth"]):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            hub = _TO_HUB_BLOCK[n]
            out[f"{h}{hub}.weight"], out[f"{h}{hub}.bias"] = sd[f"{b}{n}.weight"], sd[f"{b}{n}.bias"]
        qkv_w = sd[f"{b}attn.qkv.weight"]
        qkv_b = sd.get(f"{b}attn.qkv.bias", torch.zeros(3 * dim, dtype=qkv_w.dtype))
        for j, hub in enumerate(_HUB_QKV):
            out[f"{h}{hub}.weight"] = qkv_w[j * dim : (j + 1) * dim]
            out[f"{h}{hub}.bias"] = qkv_b[j * dim : (j + 1) * dim]
        mlp = ("mlp.w12", "mlp.w3") if f"{b}mlp.w12.weight" in sd else ("mlp.fc1", "mlp.fc2")
        for name in ("attn.proj", *mlp):
            _linear(out, f"{h}{_TO_HUB_BLOCK[name]}", sd, f"{b}{name}")
        for j in (1, 2):
            gamma = sd.get(f"{b}ls{j}.gamma", torch.ones(dim, dtype=qkv_w.dtype))
            out[f"{h}layer_scale{j}.lambda1"] = gamma
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _linear(out: dict[str, Tensor], hf_name: str, sd: dict[str, Tensor], name: str) -> None:
    w = sd[f"{name}.weight"]
    out[f"{hf_name}.weight"] = w
    out[f"{hf_name}.bias"] = sd.get(f"{name}.bias", torch.zeros(w.shape[0], dtype=w.dtype))


def _config_int(cfg: dict[str, Any], key: str, source: str, default: int | None = None, minimum: int = 1) -> int:
    """cfg[key] as an int >= minimum (a float such as 4.0 counts), else a one-line error naming `source`."""
    if key not in cfg or cfg[key] is None:
        if default is None:
            raise DinoforgeError(f"{source}: missing required field {key!r}")
        return default
    value = cfg[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and float(value) == int(value)
    if not ok or int(value) < minimum:
        raise DinoforgeError(f"{source}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def hf_config_to_arch(cfg: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Constructor keywords for a HF DINOv2 config (registers get the official offset-0 antialiased mode).

    A missing or ill-typed field raises a one-line DinoforgeError naming `source` and the field."""
    if not isinstance(cfg, dict):
        raise DinoforgeError(f"{source}: must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise DinoforgeError(f"{source}: not a DINOv2 config (model_type={cfg.get('model_type')!r})")
    if cfg.get("hidden_act", "gelu") != "gelu" and not cfg.get("use_swiglu_ffn"):
        raise DinoforgeError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (only gelu)")
    regs = _config_int(cfg, "num_register_tokens", source, 0, 0) if cfg["model_type"] == "dinov2_with_registers" else 0
    embed_dim = _config_int(cfg, "hidden_size", source)
    num_heads = _config_int(cfg, "num_attention_heads", source)
    if embed_dim % num_heads:
        raise DinoforgeError(f"{source}: hidden_size {embed_dim} is not divisible by num_attention_heads {num_heads}")
    mlp_ratio = cfg.get("mlp_ratio", 4)
    init_values = cfg.get("layerscale_value", 1.0)
    for key, value in (("mlp_ratio", mlp_ratio), ("layerscale_value", init_values)):
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise DinoforgeError(f"{source}: field {key!r} must be a positive number, got {value!r}")
    return dict(
        img_size=_config_int(cfg, "image_size", source, 518),
        patch_size=_config_int(cfg, "patch_size", source, 14),
        in_chans=_config_int(cfg, "num_channels", source, 3),
        embed_dim=embed_dim,
        depth=_config_int(cfg, "num_hidden_layers", source),
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        init_values=init_values,
        ffn_layer="swiglufused" if cfg.get("use_swiglu_ffn") else "mlp",
        block_chunks=0,
        num_register_tokens=regs,
        interpolate_antialias=bool(regs),
        interpolate_offset=0.0 if regs else 0.1,
    )


def read_hf_folder(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Official-key state dict and architecture from a HF folder (config.json + safetensors or .bin)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DinoforgeError(f"{folder} is a folder but has no config.json (not a Hugging Face model folder)")
    cfg = read_json(cfg_path, "Hugging Face config")
    arch = hf_config_to_arch(cfg, source=f"Hugging Face folder {folder}: config.json")
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise DinoforgeError(f"no model.safetensors or pytorch_model.bin in {folder}")
    hf: dict[str, Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                hf.update(load_file(str(f)))
            else:
                hf.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise DinoforgeError(f"cannot read weights file {f}: {type(e).__name__}") from None
    return hf_to_official(hf), arch
