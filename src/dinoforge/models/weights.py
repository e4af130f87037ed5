"""Backbone weights I/O: official names, official/training checkpoints, safetensors and HF folders.

Everything is loaded strictly: a missing, unexpected or wrongly shaped key is an error that lists
them, and a file that is not a checkpoint gives a one-line error naming it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinoforge.models.formats.hf import hf_to_official, read_hf_folder
from dinoforge.models.formats.timm import timm_to_official
from dinoforge.models.hub import find_hub_weights
from dinoforge.models.layers import swiglu_hidden_features
from dinoforge.models.vision_transformer import ARCHS, DinoVisionTransformer, resize_pos_embed
from dinoforge.utils import DinoforgeError, first_line, require_file, resolve_device

# released hub models: letter of the name -> size in ARCHS, and the FFN each size was released with
_HUB_SIZES = {
    "s": ("vit_small", "mlp"),
    "b": ("vit_base", "mlp"),
    "l": ("vit_large", "mlp"),
    "g": ("vit_giant2", "swiglufused"),
}
_HUB_COMMON = dict(
    img_size=518, patch_size=14, init_values=1.0, block_chunks=0,
    num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1,
)  # fmt: skip
_REG = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
HUB_ARCHS: dict[str, dict[str, Any]] = {}  # hub name (dinov2_vits14, ..._reg) -> constructor keywords
for _s, (_size, _ffn) in _HUB_SIZES.items():
    HUB_ARCHS[f"dinov2_vit{_s}14"] = {**_HUB_COMMON, **ARCHS[_size], "ffn_layer": _ffn}
    HUB_ARCHS[f"dinov2_vit{_s}14_reg"] = {**HUB_ARCHS[f"dinov2_vit{_s}14"], **_REG}
_HEADS_BY_WIDTH = {a["embed_dim"]: a["num_heads"] for a in ARCHS.values()}
ARCH_METADATA_KEY = "dinoforge_arch"


def build_backbone(arch: dict[str, Any]) -> DinoVisionTransformer:
    """Construct a randomly initialised backbone from constructor keywords, rejecting unknown ones."""
    try:
        return DinoVisionTransformer(**arch)
    except TypeError as e:
        raise DinoforgeError(f"bad backbone architecture {arch}: {e}") from None


def load_model(
    model: str | None,
    weights: str | Path | None = None,
    device: str = "auto",
    random_init: bool = False,
    **overrides: Any,
) -> DinoVisionTransformer:
    """The backbone a `--model NAME|PATH` / `--weights PATH` / `--random-init` choice names (load_backbone, with its
    architecture `overrides`), on `device` ("auto": CUDA when present): what every command that takes a backbone,
    and curation, loads."""
    if model is None and weights is None:
        raise DinoforgeError("give --model NAME and/or --weights PATH")
    device = str(resolve_device(device))
    return load_backbone(model or str(weights), weights=weights, device=device, random_init=random_init, **overrides)


def load_backbone(
    name_or_path: str | Path,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    random_init: bool = False,
    **overrides: Any,
) -> DinoVisionTransformer:
    """Build a backbone by hub name or from a weights file/folder.

    A hub name (dinov2_vits14, ..._reg) without `weights` loads the released weights from where torch.hub or
    Hugging Face already cached them (models/hub.py: find_hub_weights; nothing is downloaded), and is a one-line
    error when neither cache has them. `random_init=True` (hub names only, no weights) asks for a random init
    instead, for baselines: seeded (seed 0, the global RNG left as it was), so every process and every run of a
    random-init baseline, or of a curation embedding with one, gets the same weights.

    The architecture comes from the name, else from the `arch` stored with the weights, else it is
    inferred from tensor shapes; `overrides` (e.g. pad_to_patch=True) are applied last. An `img_size` override
    resizes the position embedding once, the way the weights' own model would at forward time (e.g. released
    518 px weights for 224 px training). Eval mode.
    """
    name = str(name_or_path)
    if random_init and (weights is not None or name not in HUB_ARCHS):
        given = weights if weights is not None else name
        raise DinoforgeError(
            f"a random init is built from a hub name ({', '.join(HUB_ARCHS)}) and takes no weights, "
            f"got {given}: drop the weights or the random init"
        )
    if name in HUB_ARCHS:
        arch = dict(HUB_ARCHS[name])
        if weights is None and not random_init:
            weights = find_hub_weights(name)
    else:
        if not Path(name).exists():
            if "/" in name or Path(name).suffix:
                raise DinoforgeError(f"weights not found: {name}")
            known = ", ".join(HUB_ARCHS)
            raise DinoforgeError(f"unknown backbone {name!r}: not a file or folder and not one of {known}")
        weights = weights if weights is not None else name
        arch = None
    state_dict = None
    if weights is not None:
        state_dict, stored_arch = read_weights(weights)
        if arch is None:
            arch = stored_arch or infer_arch(state_dict)
    if state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_backbone({**arch, **overrides}).to(device).eval()
    with torch.device("meta"):  # skip the random init that the weights overwrite anyway
        model = build_backbone({**arch, **overrides})
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    state_dict = fit_pos_embed(state_dict, model, arch)
    load_state_dict_strict(model, state_dict, source=str(weights), assign=True)
    return model.to(device).eval()


def fit_pos_embed(
    state_dict: dict[str, Tensor], model: DinoVisionTransformer, arch: dict[str, Any]
) -> dict[str, Tensor]:
    """`state_dict` with its position embedding resized to `model`'s patch grid, with the interpolation settings
    of `arch` (the weights' own model). Unchanged when the grids agree or the widths differ (the strict load then
    names the mismatch)."""
    pos, want = state_dict.get("pos_embed"), model.pos_embed.shape
    if pos is None or pos.shape == want or pos.shape[-1] != want[-1] or pos.dim() != 3:
        return state_dict
    side = math.isqrt(want[1] - 1)
    offset, antialias = arch.get("interpolate_offset", 0.1), arch.get("interpolate_antialias", False)
    resized = resize_pos_embed(pos, (side, side), offset, antialias).to(pos.dtype)
    return {**state_dict, "pos_embed": resized}


def load_state_dict_strict(
    model: torch.nn.Module, state_dict: dict[str, Tensor], source: str = "weights", assign: bool = False
) -> None:
    """load_state_dict that raises one DinoforgeError listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{label} ({len(items)}): {shown}")
    if problems:
        raise DinoforgeError(f"weights from {source} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=assign)


def save_backbone(model: DinoVisionTransformer, path: str | Path) -> Path:
    """Save as .safetensors with the constructor keywords in the metadata; load_backbone(path) rebuilds it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", ARCH_METADATA_KEY: json.dumps(model.arch)})
    tmp.replace(path)
    return path


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a backbone state dict in official key names and the stored architecture (or None)."""
    path = require_file(path, "weights")
    if path.is_dir():
        return read_hf_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors all mean "not a usable checkpoint"
        raise DinoforgeError(f"cannot read weights file {path}: {type(e).__name__}: {first_line(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise DinoforgeError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    arch = obj.get("arch") if isinstance(obj.get("arch"), dict) else None
    return normalize_state_dict(obj, source=str(path)), arch


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DinoforgeError(f"cannot read weights file {path}: {type(e).__name__}: {first_line(e)[:200]}") from None
    arch = json.loads(meta[ARCH_METADATA_KEY]) if ARCH_METADATA_KEY in meta else None
    if any(k.startswith(("embeddings.", "encoder.layer.")) or ".embeddings." in k for k in tensors):
        return hf_to_official(tensors), arch
    return normalize_state_dict(tensors, source=str(path)), arch


_PREFIXES = ("module.", "_orig_mod.", "backbone.")


def normalize_state_dict(obj: dict[str, Any], source: str = "weights") -> dict[str, Tensor]:
    """Unwrap training checkpoints and prefixes into official backbone keys.

    Handles {'teacher': ...} (keys backbone.*), {'model': ...} (teacher.backbone.* preferred over
    student.backbone.*), {'state_dict': ...}, module./backbone./_orig_mod. prefixes, chunked
    `blocks.{chunk}.{i}.` keys and timm dinov2 state dicts (recognised by the absent mask token).
    """
    sd: Any = obj
    for key in ("teacher", "model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise DinoforgeError(f"no backbone weights found in {source}")
    sd = {_strip(k, ("module.", "_orig_mod.")): v for k, v in sd.items()}
    for branch in ("teacher.backbone.", "student.backbone."):
        picked = {k[len(branch) :]: v for k, v in sd.items() if k.startswith(branch)}
        if picked:
            sd = picked
            break
    else:
        if any(k.startswith("backbone.") for k in sd):
            sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {_unchunk(_strip(k, _PREFIXES)): v for k, v in sd.items() if k != "arch"}
    if not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise DinoforgeError(f"no backbone weights found in {source} (expected a state dict of tensors)")
    if "cls_token" in sd and "mask_token" not in sd:
        return _from_timm(sd)
    return sd


def _from_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm `vit_*_dinov2` layout (no mask token, reg_token, fc1/fc2 SwiGLU) to official keys."""
    dim = sd["cls_token"].shape[-1]
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    swiglu = fc1 is not None and fc1.shape[0] == 2 * swiglu_hidden_features(4 * dim) != 4 * dim
    return timm_to_official(sd, swiglu=swiglu)


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _unchunk(key: str) -> str:
    return _CHUNKED.sub(r"blocks.\1.", key)


def infer_arch(sd: dict[str, Tensor]) -> dict[str, Any]:
    """Guess constructor keywords from official-key tensor shapes.

    Heads cannot be read from weights: known widths use the released head counts, others 64-wide heads.
    Register models get the official register interpolation (offset 0, antialias).
    """
    try:
        embed_dim = sd["cls_token"].shape[-1]
        proj = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"]
    except KeyError as e:
        raise DinoforgeError(f"cannot infer the architecture: no {e.args[0]} in the weights") from None
    patch_size, in_chans = proj.shape[-1], proj.shape[1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if embed_dim in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[embed_dim]
    else:
        heads = max(embed_dim // 64, 1) if embed_dim % 64 == 0 else 1
    arch: dict[str, Any] = dict(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        block_chunks=0,
        num_register_tokens=regs,
        interpolate_antialias=bool(regs),
        interpolate_offset=0.0 if regs else 0.1,
    )
    if "blocks.0.mlp.w12.weight" in sd:
        hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratio = 4.0 if swiglu_hidden_features(4 * embed_dim) == hidden else hidden * 1.5 / embed_dim
        arch.update(ffn_layer="swiglufused", mlp_ratio=ratio, ffn_bias="blocks.0.mlp.w12.bias" in sd)
    elif "blocks.0.mlp.fc1.weight" in sd:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        arch.update(ffn_layer="mlp", mlp_ratio=hidden / embed_dim, ffn_bias="blocks.0.mlp.fc1.bias" in sd)
    else:
        arch.update(ffn_layer="identity")
    return arch
