"""Evaluation: linear (in progress)."""

from dinoforge.utils import DinoforgeError


def linear_command() -> None:
    """linear evaluation (in progress)."""
    raise DinoforgeError("eval linear: not implemented yet")
