"""The peer of the training-step benchmarks: the DINOv2 step assembled from lightly 1.6's blocks as in its DINOv2
example (timm ViT, lightly's heads and losses, softmax centring)."""

from __future__ import annotations

import copy
import warnings

import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
from lightly.models.utils import get_weight_decay_parameters, update_drop_path_rate, update_momentum
from timm.models.vision_transformer import VisionTransformer

from dinoforge.train.meta_arch import backbone_kwargs
from dinoforge.utils import DinoforgeError


class LightlyStep:
    """The same step assembled from lightly's blocks as in its DINOv2 example (timm ViT + lightly heads/losses)."""

    def __init__(self, cfg, device: torch.device):
        arch = backbone_kwargs(cfg)
        if arch["ffn_layer"] != "mlp":
            raise DinoforgeError(f"the lightly side supports ffn_layer=mlp only, got {arch['ffn_layer']!r}")
        vit = VisionTransformer(
            img_size=arch["img_size"],
            patch_size=arch["patch_size"],
            embed_dim=arch["embed_dim"],
            depth=arch["depth"],
            num_heads=arch["num_heads"],
            qkv_bias=arch["qkv_bias"],
            init_values=arch["init_values"],
            reg_tokens=arch["num_register_tokens"],
            num_classes=0,
            pos_embed="learn",
            dynamic_img_size=True,
        )
        backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")

        def head(c) -> DINOv2ProjectionHead:
            warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
            return DINOv2ProjectionHead(
                input_dim=arch["embed_dim"],
                hidden_dim=c.head_hidden_dim,
                bottleneck_dim=c.head_bottleneck_dim,
                output_dim=c.head_n_prototypes,
            )

        def pair() -> torch.nn.ModuleDict:  # weight-normed heads cannot be deep-copied: build twice, load state
            dino = head(cfg.dino)
            ibot = head(cfg.ibot) if cfg.ibot.separate_head else dino
            return torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "dino_head": dino, "ibot_head": ibot})

        self.student, self.teacher = pair().to(device), pair().to(device)
        if cfg.student.drop_path_rate > 0:
            mode = "uniform" if cfg.student.drop_path_uniform else "linear"
            update_drop_path_rate(self.student.backbone.vit, drop_path_rate=cfg.student.drop_path_rate, mode=mode)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False).eval()
        self.student.train()
        self.dino_loss = DINOLoss(output_dim=cfg.dino.head_n_prototypes).to(device)
        self.ibot_loss = IBOTPatchLoss(output_dim=self.student.ibot_head.last_layer.out_features).to(device)
        self.koleo_loss = KoLeoLoss()
        decay, no_decay = get_weight_decay_parameters([self.student])
        self.opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        )
        self.cfg = cfg
        self.n_prefix = vit.num_prefix_tokens
        self.side = arch["img_size"] // arch["patch_size"]

    def prepare(self, batch: dict) -> dict:
        """Lightly's inputs from a dinoforge batch: token mask with prefix columns, block mask (B, H, W)."""
        masks = batch["collated_masks"]
        token_mask = torch.zeros(masks.shape[0], masks.shape[1] + self.n_prefix, dtype=torch.bool)
        token_mask[:, self.n_prefix :] = masks
        return {
            "global": batch["collated_global_crops"],
            "local": batch["collated_local_crops"],
            "token_mask": token_mask,
            "block_mask": masks.view(-1, self.side, self.side),
        }

    def __call__(self, batch: dict, teacher_temp: float = 0.07, momentum: float = 0.992) -> None:
        s, t, cfg = self.student, self.teacher, self.cfg
        n_views = 2 + cfg.crops.local_crops_number
        mask = batch["token_mask"]
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_feat = t.backbone.encode(batch["global"])
            t_cls_out = t.dino_head(t_feat[:, 0])
            t_masked_out = t.ibot_head(t_feat[mask])
        s_feat = s.backbone.encode(batch["global"], mask=mask)
        s_global_cls = s_feat[:, 0]
        s_masked_out = s.ibot_head(s_feat[mask])
        s_local_cls = s.backbone.encode(batch["local"])[:, 0]
        s_cls_out = torch.cat([s.dino_head(s_global_cls), s.dino_head(s_local_cls)])
        dino = self.dino_loss(
            teacher_out=list(t_cls_out.chunk(2)), student_out=list(s_cls_out.chunk(n_views)), teacher_temp=teacher_temp
        )
        ibot = self.ibot_loss(
            teacher_out=t_masked_out, student_out=s_masked_out, mask=batch["block_mask"], teacher_temp=teacher_temp
        )
        koleo = sum(self.koleo_loss(c) for c in s_global_cls.chunk(2))
        loss = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_loss_weight * koleo
        loss.backward()
        if cfg.optim.clip_grad:
            for name in ("backbone", "dino_head", "ibot_head"):
                torch.nn.utils.clip_grad_norm_(s[name].parameters(), cfg.optim.clip_grad)
        self.opt.step()
        update_momentum(s, t, m=momentum)
