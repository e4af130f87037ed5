"""Evaluation: video (in progress)."""

from dinoforge.utils import DinoforgeError


def video_command() -> None:
    """video evaluation (in progress)."""
    raise DinoforgeError("eval video: not implemented yet")
