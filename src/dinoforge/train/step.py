"""The one training step that `dinoforge train` and every benchmark run: per-step schedules, forward/backward under
autocast, gradient averaging, fp16 scaling, clipping, AdamW and the EMA teacher."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from dinoforge import distributed as dist_utils
from dinoforge.train.data import seed_step
from dinoforge.train.distributed import average_gradients
from dinoforge.train.meta_arch import SSLMetaArch
from dinoforge.train.param_groups import apply_optim_scheduler, fuse_params_groups, get_params_groups_with_decay
from dinoforge.train.precision import autocast_dtype
from dinoforge.utils import DinoforgeError


class NonFiniteLoss(DinoforgeError):
    """A step's total loss is NaN or infinite; raised before the optimiser step, so the weights stay finite."""


def build_optimizer(cfg: DictConfig, model: SSLMetaArch, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the student's fused param groups (layer-wise lr decay, no wd on bias/norm/LayerScale); the fused
    kernel is several times faster than the for-each one."""
    groups = []
    for m in model.student.values():
        groups += fuse_params_groups(
            get_params_groups_with_decay(
                m, lr_decay_rate=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult
            )
        )
    return torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=fused)


class TrainStep:
    """`step(it, batch)` trains the model on one batch at iteration `it` of `schedules` and returns the losses
    (averaged over ranks) with the step's lr, wd, momentum and teacher temperature."""

    def __init__(
        self,
        cfg: DictConfig,
        model: SSLMetaArch,
        optimizer: torch.optim.Optimizer,
        schedules,
        device: torch.device,
        sharded: bool = False,
    ):
        self.cfg, self.model, self.optimizer, self.schedules = cfg, model, optimizer, schedules
        self.sharded, self.rank, self.device_type = sharded, dist_utils.rank(), device.type
        self.amp_dtype = autocast_dtype(cfg, device)
        fp16_scaled = self.amp_dtype == torch.float16 and cfg.compute_precision.grad_scaler
        self.scaler = torch.amp.GradScaler(device.type) if fp16_scaled else None

    def __call__(self, it: int, batch: dict) -> dict[str, float]:
        cfg, model, s = self.cfg, self.model, self.schedules
        model.student.backbone.requires_grad_(it >= cfg.train.freeze_backbone_iters)  # heads-only warm-up
        lr, wd, mom, temp = s.lr[it], s.wd[it], s.momentum[it], s.teacher_temp[it]
        apply_optim_scheduler(self.optimizer, lr, wd, s.last_layer_lr[it])
        self.optimizer.zero_grad(set_to_none=True)
        seed_step(cfg.train.seed, it, self.rank)
        amp = self.amp_dtype is not None
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            parts = model.forward_backward(batch, teacher_temp=temp, scaler=self.scaler)
        values = dist_utils.all_reduce_mean(parts)
        if not math.isfinite(values["total_loss"]):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if "loss" in k)
            raise NonFiniteLoss(f"non-finite loss at iteration {it} ({shown})")
        self._optimizer_step()
        model.update_teacher(mom)
        return {**values, "lr": lr, "wd": wd, "momentum": mom, "teacher_temp": temp}

    def _optimizer_step(self) -> None:
        """Average the student's gradients over ranks (FSDP2 reduces its own), unscale fp16 gradients, clip, step."""
        students = list(self.model.student.values())
        if not self.sharded:
            average_gradients(students)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad:
            for m in students:
                torch.nn.utils.clip_grad_norm_(m.parameters(), self.cfg.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
