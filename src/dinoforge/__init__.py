"""dinoforge: a complete, runnable DINOv2 system."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_backbone":
        from dinoforge.models.weights import load_backbone

        return load_backbone
    raise AttributeError(name)


__all__ = ["load_backbone", "__version__"]
