"""Export to a Hugging Face Dinov2Model / Dinov2WithRegistersModel folder (config.json + model.safetensors);
the key names come from dinoforge.models.formats.hf."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dinoforge.models.formats.hf import official_to_hf
from dinoforge.utils import DinoforgeError


def arch_to_hf_config(arch: dict[str, Any]) -> dict[str, Any]:
    """config.json contents for Dinov2Model, or Dinov2WithRegistersModel when the model has registers."""
    if arch["ffn_layer"] == "identity":
        raise DinoforgeError("Hugging Face DINOv2 has no identity-FFN variant; cannot export this model")
    if float(arch["mlp_ratio"]) != int(arch["mlp_ratio"]):
        raise DinoforgeError(f"Hugging Face DINOv2 needs an integer mlp_ratio, got {arch['mlp_ratio']}")
    regs = arch.get("num_register_tokens", 0)
    cfg: dict[str, Any] = {
        "architectures": ["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if regs else "dinov2",
        "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "mlp_ratio": int(arch["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": arch["img_size"],
        "patch_size": arch["patch_size"],
        "num_channels": arch["in_chans"],
        "qkv_bias": True,
        "layerscale_value": arch["init_values"] or 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": arch["ffn_layer"] in ("swiglu", "swiglufused"),
        "torch_dtype": "float32",
    }
    if regs:
        cfg["num_register_tokens"] = regs
    else:
        cfg["use_mask_token"] = True
    return cfg


def export_hf(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors, a folder `transformers` loads offline with from_pretrained."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch = model.arch
    tensors = official_to_hf(model.state_dict(), arch)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(arch_to_hf_config(arch), indent=2) + "\n")
    return out_dir
