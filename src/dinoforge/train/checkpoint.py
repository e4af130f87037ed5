"""All checkpoint reading and writing: the full training state (also under FSDP2) written atomically and restored by
--resume, the exported teacher backbone, and a checkpoint's teacher (backbone and heads) read back to distil from."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinoforge import distributed as dist_utils
from dinoforge.models.heads import DINOHead
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weights import (
    build_backbone,
    infer_arch,
    load_state_dict_strict,
    normalize_state_dict,
    save_backbone,
)
from dinoforge.train.highres import crop_phases, global_size_at, switch_resolution
from dinoforge.utils import DinoforgeError, atomic_torch_save, require_file

CKPT_RE = re.compile(r"model_(\d+)\.pth$")


def rng_state() -> dict:
    """All RNG states, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in a folder, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("model_*.pth") if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: Path, iteration: int, payload: dict, keep: int = 3) -> Path:
    """Write model_{iteration}.pth atomically (temp file + rename), then drop all but the newest `keep`."""
    path = atomic_torch_save({**payload, "iteration": iteration}, Path(ckpt_dir) / f"model_{iteration:07d}.pth")
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_newest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict, list[str]] | None:
    """The newest checkpoint that reads (path, content) and why each newer one did not (a file cut short by a
    crash outside save_checkpoint, a foreign file); None when the folder holds none; an error when none reads."""
    unreadable = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path), unreadable
        except DinoforgeError as e:
            unreadable.append(str(e))
    if unreadable:
        raise DinoforgeError(f"no readable checkpoint in {ckpt_dir}: {'; '.join(unreadable)}")
    return None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by save_checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise DinoforgeError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def check_crop_size(ckpt: dict, cfg: DictConfig, path: Path) -> int:
    """Refuse to resume a checkpoint whose position embedding has another grid than the config gives its iteration
    (another global crop size, or another high-res phase): one line that says how to resume, or how to continue at
    the new size as a new run. Returns that global crop size."""
    saved, it = ckpt.get("config", {}), ckpt["iteration"]
    asked = global_size_at(cfg, it)
    trained = global_size_at(saved, it) if "global_crops_size" in saved.get("crops", {}) else None
    if trained is None or trained == asked:
        return asked
    if len(crop_phases(cfg)) == 1 and len(crop_phases(saved)) == 1:
        what, fix = f"was trained with crops.global_crops_size={trained}", f"crops.global_crops_size={trained}"
    else:
        what, fix = f"trained at {trained} px global crops", "the checkpoint's crops and crops.highres settings"
    raise DinoforgeError(
        f"cannot resume {path}: it {what}, the config asks for {asked} at its iteration {it}; resume with {fix}, "
        f"or start a new run (another -o) from it with student.pretrained_weights={path} (position embedding "
        "resized, heads kept)"
    )


def model_state(model: nn.Module, sharded: bool) -> dict:
    """The full (unsharded) model state dict; collective under FSDP2, complete on rank 0."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """The full optimizer state dict; collective under FSDP2, complete on rank 0."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict, sharded: bool, rank: int
) -> None:
    """Put a checkpoint's model, optimizer and this rank's RNG states back (under FSDP2 from the full dicts)."""
    if not sharded:
        load_state_dict_strict(model, ckpt["model"], source=f"checkpoint of iteration {ckpt['iteration']}")
        optimizer.load_state_dict(ckpt["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=ckpt["model"],
            optim_state_dict=ckpt["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])


def resume_training_state(
    ckpt_dir: Path, cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool, rank: int, say
) -> tuple[int, Path | None]:
    """--resume: restore the newest readable checkpoint in `ckpt_dir` (refusing another crop size) and return
    (first iteration to run, its path); (0, None) when there is none. `say` prints the user's lines."""
    newest = load_newest_checkpoint(ckpt_dir)
    if newest is None:
        say(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
        return 0, None
    path, ckpt, unreadable = newest
    size = check_crop_size(ckpt, cfg, path)
    if model.arch["img_size"] != size:  # checkpointed in the high-res phase
        switch_resolution(model, optimizer, size)
    restore_training_state(model, optimizer, ckpt, sharded, rank)
    for reason in unreadable:
        say(f"warning: skipping a newer checkpoint: {reason}")
    say(f"resuming from {path} at iteration {ckpt['iteration'] + 1}")
    return ckpt["iteration"] + 1, path


def save_training_state(
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    it: int,
    ckpt_dir: Path,
    sharded: bool,
    main: bool,
) -> Path | None:
    """Checkpoint iteration `it`: model, optimizer, every rank's RNG states, config and architecture, written by
    rank 0 (collective: every rank calls it); the path on rank 0, else None."""
    full_model, full_optim = model_state(model, sharded), _optim_state(model, optimizer, sharded)
    rng = rng_state()
    if dist_utils.world_size() > 1:
        gathered = [None] * dist_utils.world_size()
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    path = None
    if main:
        payload = {
            "model": full_model,
            "optimizer": full_optim,
            "rng": rng,
            "config": OmegaConf.to_container(cfg),
            "arch": model.arch,
        }
        path = save_checkpoint(ckpt_dir, it, payload, keep=cfg.train.keep_checkpoints)
    dist_utils.barrier()
    return path


def export_teacher(model_state: dict, arch: dict, path: Path, prefix: str = "teacher.backbone.") -> Path:
    """Save the backbone under `prefix` (the EMA teacher) as safetensors, with its architecture, for load_backbone."""
    backbone = DinoVisionTransformer(**arch)
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)})
    save_backbone(backbone, path)
    return path


def _head_kwargs(sd: dict[str, torch.Tensor]) -> dict:
    """DINOHead constructor arguments read off a head's weights."""
    linears = sorted(
        int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and k.endswith(".weight") and k.count(".") == 2
    )
    first = sd[f"mlp.{linears[0]}.weight"] if linears else sd["mlp.weight"]
    out_dim, bottleneck = sd["last_layer.weight_v"].shape
    return dict(
        out_dim=out_dim,
        nlayers=max(len(linears), 1),
        hidden_dim=first.shape[0] if len(linears) > 1 else 2048,
        bottleneck_dim=bottleneck,
        use_bn=any(v.dim() == 1 and k.endswith("running_mean") for k, v in sd.items()),
        mlp_bias=any(k.endswith(".bias") for k in sd),
    )


def _teacher_parts(obj: object) -> dict[str, dict[str, torch.Tensor]]:
    """The teacher's backbone, dino_head and ibot_head state dicts (each possibly empty) of a checkpoint object:
    {"teacher": {backbone.*, dino_head.*, ...}} (official eval checkpoints) or {"model": {teacher.*}} (official and
    dinoforge training checkpoints); anything else has none."""
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        sd = obj["teacher"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = {k[len("teacher.") :]: v for k, v in obj["model"].items() if k.startswith("teacher.")}
    else:
        sd = {}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {
        name: {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
        for name in ("backbone", "dino_head", "ibot_head")
    }


def read_teacher_heads(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The DINO/iBOT heads of the teacher in a training checkpoint file (see _teacher_parts); {} for backbone-only
    weights (released .pth files, exports, safetensors, HF folders)."""
    p = Path(path)
    if not p.is_file() or p.suffix == ".safetensors":
        return {}
    try:  # mmap: the file was read once already (load_backbone), and a training checkpoint holds optimizer state
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        obj = torch.load(p, map_location="cpu", weights_only=True)
    return {name: sd for name, sd in _teacher_parts(obj).items() if name != "backbone" and sd}


def load_distillation_teacher(path: str, patch_size: int) -> tuple[nn.ModuleDict, dict[str, dict]]:
    """The frozen teacher (backbone + heads) of a dinoforge or official training checkpoint, and its head shapes;
    backbone weights alone are refused: the targets need heads."""
    path = str(require_file(path, "distillation teacher checkpoint"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DinoforgeError(f"cannot read teacher checkpoint {path}: {type(e).__name__}") from None
    parts = _teacher_parts(obj)
    if not parts["backbone"] or not parts["dino_head"]:
        raise DinoforgeError(
            f"{path} has no teacher backbone + dino_head: distillation needs a training checkpoint with heads"
        )
    backbone_sd = normalize_state_dict(parts["backbone"], source=path)
    arch = obj.get("arch") if isinstance(obj.get("arch"), dict) else infer_arch(backbone_sd)
    if arch["patch_size"] != patch_size:
        raise DinoforgeError(
            f"teacher patch size {arch['patch_size']} differs from the student's {patch_size}: "
            "iBOT needs one patch grid"
        )
    backbone = build_backbone(arch)
    load_state_dict_strict(backbone, backbone_sd, source=path)
    modules, heads = {"backbone": backbone}, {}
    for name in ("dino_head", "ibot_head"):
        if parts[name]:
            heads[name] = _head_kwargs(parts[name])
            modules[name] = DINOHead(in_dim=backbone.embed_dim, **heads[name])
            load_state_dict_strict(modules[name], parts[name], source=f"{path} ({name})")
    return nn.ModuleDict(modules).eval(), heads
