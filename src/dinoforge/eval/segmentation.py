"""Evaluation: segmentation (in progress)."""

from dinoforge.utils import DinoforgeError


def seg_command() -> None:
    """segmentation evaluation (in progress)."""
    raise DinoforgeError("eval seg: not implemented yet")
