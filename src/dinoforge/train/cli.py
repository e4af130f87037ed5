"""`dinoforge train | distill | demo`."""

from dinoforge.utils import DinoforgeError


def train_command() -> None:
    """Self-supervised DINOv2 pretraining (in progress)."""
    raise DinoforgeError("train: not implemented yet")


def distill_command() -> None:
    """Distil a teacher backbone into a smaller student (in progress)."""
    raise DinoforgeError("distill: not implemented yet")


def demo_command() -> None:
    """Pretrain, evaluate and visualise on the bundled data (in progress)."""
    raise DinoforgeError("demo: not implemented yet")
