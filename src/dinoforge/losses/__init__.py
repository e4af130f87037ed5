"""DINOv2 losses: DINO (CLS), iBOT (masked patches), KoLeo, and teacher centering."""

from dinoforge.losses.centering import ema_center, sinkhorn_knopp, softmax_center
from dinoforge.losses.dino import DINOLoss
from dinoforge.losses.ibot import iBOTPatchLoss
from dinoforge.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "ema_center", "iBOTPatchLoss", "sinkhorn_knopp", "softmax_center"]
