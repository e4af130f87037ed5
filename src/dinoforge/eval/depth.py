"""Evaluation: depth (in progress)."""

from dinoforge.utils import DinoforgeError


def depth_command() -> None:
    """depth evaluation (in progress)."""
    raise DinoforgeError("eval depth: not implemented yet")
