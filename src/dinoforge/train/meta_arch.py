"""Student/teacher pair with DINO, iBOT and KoLeo losses: one forward/backward of the DINOv2 recipe."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dinoforge.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinoforge.models.heads import DINOHead
from dinoforge.models.vision_transformer import ARCHS, DinoVisionTransformer
from dinoforge.train.checkpoint import load_distillation_teacher, read_teacher_heads
from dinoforge.train.distributed import reshard
from dinoforge.utils import DinoforgeError


def backbone_kwargs(cfg: DictConfig) -> dict:
    """Constructor kwargs of the student backbone from the official `student`/`crops` keys."""
    s = cfg.student
    if s.arch not in ARCHS:
        raise DinoforgeError(f"unknown student.arch {s.arch!r}; choose from {', '.join(ARCHS)}")
    kw = dict(ARCHS[s.arch])
    for key in ("embed_dim", "depth", "num_heads"):
        if s[key] is not None:
            kw[key] = int(s[key])
    kw.update(
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        in_chans=s.in_chans,
        init_values=s.layerscale,
        ffn_layer=s.ffn_layer,
        block_chunks=s.block_chunks,
        qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens,
        interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
    )
    return kw


def packing_backend(sequence_packing: bool | None, device: torch.device) -> str | None:
    """The student's sequence-packing backend for `train.sequence_packing` on `device` (null: on for CUDA only,
    where it is faster), None for per-crop batches; always "njt" (flex_attention has no CPU backward)."""
    on = device.type == "cuda" if sequence_packing is None else sequence_packing
    return "njt" if on else None


def _head(in_dim: int, c: DictConfig) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=c.head_n_prototypes,
        hidden_dim=c.head_hidden_dim,
        bottleneck_dim=c.head_bottleneck_dim,
        nlayers=c.head_nlayers,
    )


class SSLMetaArch(nn.Module):
    """DINOv2 student (backbone + heads, trained) and teacher (no gradients): the student's EMA, or when distilling
    (DINOv2 §5) a frozen larger model, with a spare EMA of the student (`student_ema`) for export."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.arch = backbone_kwargs(cfg)
        frozen, heads = (  # a frozen teacher is built first: the student's heads take its heads' shapes
            load_distillation_teacher(cfg.distillation.teacher_checkpoint, self.arch["patch_size"])
            if cfg.distillation.enabled
            else (None, {})
        )
        self.distill = frozen is not None
        drop_path_rate = 0.0 if self.distill else cfg.student.drop_path_rate  # §5 removes stochastic depth
        student_backbone = DinoVisionTransformer(
            **self.arch, drop_path_rate=drop_path_rate, drop_path_uniform=cfg.student.drop_path_uniform
        )
        if cfg.student.init != "official":
            student_backbone.init_weights(cfg.student.init)
        for block in student_backbone.blocks:
            block.activation_checkpointing = bool(cfg.train.activation_checkpointing)
        embed_dim = student_backbone.embed_dim
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = self.do_ibot and ("ibot_head" in heads if self.distill else cfg.ibot.separate_head)
        student = {"backbone": student_backbone}
        for name, c in (("dino_head", cfg.dino), ("ibot_head", cfg.ibot)):
            if name == "dino_head" or self.ibot_separate_head:
                student[name] = DINOHead(**heads[name], in_dim=embed_dim) if name in heads else _head(embed_dim, c)
        self.student = nn.ModuleDict(student)
        if self.distill:
            self.teacher = frozen
            self.student_ema = copy.deepcopy(self.student)
            self.student_ema.requires_grad_(False)
        else:
            self.teacher = copy.deepcopy(self.student)
            self.teacher.backbone = DinoVisionTransformer(**self.arch)  # no stochastic depth in the teacher
            self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.ema_name = "student_ema" if self.distill else "teacher"

        n_dino = self.student.dino_head.last_layer.weight_v.shape[0]
        n_ibot = self.student.ibot_head.last_layer.weight_v.shape[0] if self.ibot_separate_head else n_dino
        self.dino_loss = DINOLoss(n_dino)
        self.ibot_patch_loss = iBOTPatchLoss(n_ibot)
        self.koleo_loss = KoLeoLoss()

    @property
    def ema(self) -> nn.ModuleDict:
        """The EMA of the student: the teacher, or student_ema when distilling (the teacher is then frozen)."""
        return getattr(self, self.ema_name)

    @property
    def export_prefix(self) -> str:
        """The state-dict prefix of the backbone a run exports: its EMA's."""
        return f"{self.ema_name}.backbone."

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()
        return self

    def load_pretrained(self, path: str) -> str:
        """Start the student and its EMA from a weights file (position embedding resized to the crop size; a training
        checkpoint's teacher heads too); returns a line saying what was loaded."""
        from dinoforge.models.weights import load_backbone, load_state_dict_strict

        backbone = load_backbone(path, img_size=self.arch["img_size"])
        state = {"backbone": backbone.state_dict(), **read_teacher_heads(path)}
        extra = sorted(set(state) - set(self.student))
        if extra:
            raise DinoforgeError(
                f"{path} holds {', '.join(extra)} that this config has no place for (ibot.separate_head is false)"
            )
        for name, sd in state.items():
            load_state_dict_strict(self.student[name], sd, source=f"{path} ({name})")
            self.ema[name].load_state_dict(self.student[name].state_dict())
        heads = " and ".join(n for n in state if n != "backbone") or "none (fresh heads)"
        return f"starting from {path}: backbone at {self.arch['img_size']} px, heads from the file: {heads}"

    def _distillation_batch(self, batch: dict) -> dict:
        """No masking in distillation: iBOT compares every patch token of the global crops."""
        masks = batch["collated_masks"]
        n_crops, n_patches = masks.shape
        return {
            **batch,
            "collated_masks": torch.ones_like(masks),
            "mask_indices_list": torch.arange(masks.numel(), device=masks.device),
            "masks_weight": torch.full((masks.numel(),), 1.0 / n_patches, device=masks.device),
            "n_masked_patches": torch.tensor([masks.numel()]),
        }

    def _centered_teacher(self, logits: torch.Tensor, loss: nn.Module, temp: float, n_tokens=None):
        if self.cfg.train.centering == "sinkhorn_knopp":
            if n_tokens is None:
                return loss.sinkhorn_knopp_teacher(logits, teacher_temp=temp)
            return loss.sinkhorn_knopp_teacher(logits, teacher_temp=temp, n_masked_patches_tensor=n_tokens)
        probs = loss.softmax_center_teacher(logits, teacher_temp=temp)
        loss.update_center(logits)
        return probs

    @torch.no_grad()
    def _teacher_targets(self, batch: dict, temp: float):
        global_crops = batch["collated_global_crops"]
        mask_indices = batch["mask_indices_list"]
        out = self.teacher.backbone.forward_features(global_crops)
        cls_a, cls_b = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat((cls_b, cls_a))  # swapped: student crop A is matched to teacher crop B
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        if self.do_ibot and not self.ibot_separate_head:
            logits = self.teacher.dino_head(torch.cat((cls, patches)))
            cls_logits, patch_logits = logits[: len(cls)], logits[len(cls) :]
        else:
            cls_logits = self.teacher.dino_head(cls)
            patch_logits = self.teacher.ibot_head(patches) if self.do_ibot else None
        dino_t = self._centered_teacher(cls_logits, self.dino_loss, temp).view(2, -1, cls_logits.shape[-1])
        ibot_t = None
        if self.do_ibot:
            n_masked = batch["n_masked_patches"].to(patch_logits.device)
            ibot_t = self._centered_teacher(patch_logits, self.ibot_patch_loss, temp, n_tokens=n_masked)
        probs = dino_t.flatten(0, 1).float()
        metrics = {
            "teacher_entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(probs.shape[-1]),
            "teacher_cls_std": F.normalize(cls.float(), dim=-1).std(0).mean() * math.sqrt(cls.shape[-1]),
        }
        return dino_t, ibot_t, metrics

    def forward_backward(self, batch: dict, teacher_temp: float, scaler=None) -> dict[str, torch.Tensor]:
        """Compute all losses for one batch, backpropagate the total, return the detached parts and indicators."""
        n_local = self.cfg.crops.local_crops_number
        if self.distill:
            batch = self._distillation_batch(batch)
        masks = batch["collated_masks"]
        mask_indices = batch["mask_indices_list"]
        dino_t, ibot_t, metrics = self._teacher_targets(batch, teacher_temp)

        crops = [batch["collated_global_crops"], batch["collated_local_crops"]]
        s_global, s_local = self.student.backbone.forward_features(
            crops,
            [None if self.distill else masks, None],
            packing=packing_backend(self.cfg.train.sequence_packing, crops[0].device),
        )
        s_global_cls = s_global["x_norm_clstoken"]
        s_patches = s_global["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        head_in = [s_local["x_norm_clstoken"] if n_local > 0 else s_global_cls[:0], s_global_cls]
        if self.do_ibot and not self.ibot_separate_head:
            head_in.append(s_patches)
        sizes = [len(t) for t in head_in]
        head_out = self.student.dino_head(torch.cat(head_in)).split(sizes)
        local_logits, global_logits = head_out[0], head_out[1]
        if self.do_ibot:
            patch_logits = head_out[2] if not self.ibot_separate_head else self.student.ibot_head(s_patches)

        n_terms = 2 + 2 * n_local  # each student crop against each teacher global crop but its own
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=s_global_cls.device)
        if self.do_dino:
            if n_local > 0:
                losses["dino_local_crops_loss"] = (
                    self.dino_loss(list(local_logits.chunk(n_local)), list(dino_t)) / n_terms
                )
            losses["dino_global_crops_loss"] = self.dino_loss([global_logits], [dino_t.flatten(0, 1)]) * 2 / n_terms
            total = total + self.cfg.dino.loss_weight * sum(losses.values())
            if self.do_koleo:
                losses["koleo_loss"] = self.cfg.dino.koleo_loss_weight * sum(
                    self.koleo_loss(c) for c in s_global_cls.chunk(2)
                )
                total = total + losses["koleo_loss"]
        if self.do_ibot:
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                patch_logits,
                ibot_t,
                student_masks_flat=masks,
                n_masked_patches=len(mask_indices),
                masks_weight=batch["masks_weight"],
            )
            total = total + self.cfg.ibot.loss_weight * losses["ibot_loss"]
        (scaler.scale(total) if scaler is not None else total).backward()
        out = {k: v.detach() for k, v in losses.items()}
        out["total_loss"] = total.detach()
        out.update(metrics)
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher (student_ema when distilling) ← m·ema + (1−m)·student, over every parameter."""
        ema = self.ema
        reshard(ema)  # both sides must hold their shards, not the gathered parameters
        t_params, s_params = [], []
        for k in self.student:
            for pt, ps in zip(ema[k].parameters(), self.student[k].parameters(), strict=True):
                t_params.append(pt.to_local() if hasattr(pt, "to_local") else pt)
                s_params.append(ps.to_local() if hasattr(ps, "to_local") else ps)
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
