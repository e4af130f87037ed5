"""Evaluation: retrieval (in progress)."""

from dinoforge.utils import DinoforgeError


def retrieval_command() -> None:
    """retrieval evaluation (in progress)."""
    raise DinoforgeError("eval retrieval: not implemented yet")
