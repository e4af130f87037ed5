"""Evaluation: logreg (in progress)."""

from dinoforge.utils import DinoforgeError


def logreg_command() -> None:
    """logreg evaluation (in progress)."""
    raise DinoforgeError("eval logreg: not implemented yet")
