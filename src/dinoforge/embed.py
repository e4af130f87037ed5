"""Feature extraction: `dinoforge embed` and the extract_features helper used by eval and curate."""

from dinoforge.utils import DinoforgeError


def embed_command() -> None:
    """Embed an image folder with a backbone (in progress)."""
    raise DinoforgeError("embed: not implemented yet")
