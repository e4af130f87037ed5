"""Training configuration: the official DINOv2 YAML layout, presets, `key=value` overrides, strict keys."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from dinoforge.utils import DinoforgeError, first_line, parse_overrides, read_yaml, unknown_keys_error

PRESETS = ("demo", "vits14", "vitb14", "vitl14", "vitl16_short", "vitg14")


def _package_yaml(name: str) -> DictConfig:
    return OmegaConf.create(resources.files("dinoforge.config").joinpath(f"{name}.yaml").read_text())


def default_config() -> DictConfig:
    """The full default configuration (every accepted key)."""
    return _package_yaml("ssl_default")


def _unknown_keys(user: DictConfig, default: DictConfig, prefix: str = "") -> list[str]:
    bad = []
    for k in user:  # nodes, not values: an interpolation is not resolved here (its target may be elsewhere)
        full = f"{prefix}{k}"
        if k not in default:
            bad.append(full)
            continue
        v, ref = user._get_node(k), default._get_node(k)
        if isinstance(v, DictConfig) and isinstance(ref, DictConfig):
            bad += _unknown_keys(v, ref, full + ".")
    return bad


def _check_keys(user: DictConfig, default: DictConfig, source: str) -> None:
    bad = _unknown_keys(user, default)
    if bad:
        raise unknown_keys_error("config", source, bad, default)


# Keys that take null besides a value of a fixed type: a null default means "use the preset" (embed_dim, depth,
# num_heads); `student.layerscale: null` builds blocks without LayerScale.
_NULLABLE_TYPES = {
    "student.embed_dim": int,
    "student.depth": int,
    "student.num_heads": int,
    "student.layerscale": float,
}


def _kind(value: object) -> str:
    """The type name used in messages: bool, int, float, str, list, mapping or null."""
    if value is None:
        return "null"
    if isinstance(value, DictConfig | dict):
        return "mapping"
    if isinstance(value, ListConfig | list | tuple):
        return "list"
    return type(value).__name__


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_problem(value: object, default: object) -> str | None:
    """Why `value` cannot replace `default` (None when it can). Numbers are interchangeable (int defaults such as
    `teacher.final_momentum_teacher: 1` take floats), a null default takes any scalar, an empty-string default
    takes null, a list must hold numbers where the default list does."""
    if default is None:
        return "a scalar or null" if isinstance(value, DictConfig | ListConfig) else None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool (true/false)"
    if _is_number(default):
        return None if _is_number(value) else f"a number ({type(default).__name__})"
    if isinstance(default, str):  # an empty default means "unset", which null says too
        ok = isinstance(value, str) or _is_number(value) or (value is None and default == "")
        return None if ok else "a string"
    if isinstance(default, ListConfig):
        if not isinstance(value, ListConfig):
            return "a list"
        if len(default) and all(_is_number(x) for x in default) and not all(_is_number(x) for x in value):
            return "a list of numbers"
        return None
    return None


def _raw(cfg: DictConfig, key: str) -> object:
    """The unresolved value at `key`: a DictConfig/ListConfig container, or the plain scalar."""
    node = cfg._get_node(key)
    return node if isinstance(node, DictConfig | ListConfig) else node._value()


def _check_types(user: DictConfig, default: DictConfig, source: str, prefix: str = "") -> None:
    """Each value of `user` must have the type of the default it replaces: `optim.epochs=abc` fails here, naming
    the key, rather than deep inside training."""
    for k in user:
        full = f"{prefix}{k}"
        if k not in default or OmegaConf.is_missing(user, k) or OmegaConf.is_interpolation(user, k):
            continue
        value, ref = _raw(user, k), _raw(default, k)
        if isinstance(ref, DictConfig):
            if not isinstance(value, DictConfig):
                raise DinoforgeError(f"config key {full!r} in {source} must be a mapping, got {_kind(value)} {value!r}")
            _check_types(value, ref, source, full + ".")
            continue
        nullable = _NULLABLE_TYPES.get(full)
        if nullable is not None and value is None:
            continue
        if ref is None and nullable is not None:
            ok = isinstance(value, nullable) and not isinstance(value, bool)
            problem = None if ok else f"{'an' if nullable is int else 'a'} {nullable.__name__} or null"
        else:
            problem = _type_problem(value, ref)
        if problem:
            shown = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
            raise DinoforgeError(
                f"config key {full!r} in {source} must be {problem}, got {_kind(value)} {shown!r} (default: {ref!r})"
            )


def _load_file(config: str | Path) -> DictConfig:
    if str(config) in PRESETS:
        return _package_yaml(str(config))
    path = Path(config)
    if not path.is_file():
        raise DinoforgeError(f"config not found: {config} (a YAML file or a preset: {', '.join(PRESETS)})")
    return read_yaml(path, "config")


def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults ← preset or YAML file ← `key=value` overrides; an unknown key fails naming close matches."""
    cfg = defaults = default_config()
    if config:
        user = _load_file(config)
        _check_keys(user, defaults, str(config))
        _check_types(user, defaults, str(config))
        cfg = OmegaConf.merge(defaults, user)
    if overrides:
        dot = parse_overrides(overrides)
        _check_keys(dot, cfg, "command-line overrides")
        _check_types(dot, defaults, "command-line overrides")  # against the defaults, not the file's values
        cfg = OmegaConf.merge(cfg, dot)
    try:  # a `${...}` interpolation that points nowhere fails now, not mid-run
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        raise DinoforgeError(f"bad config interpolation: {first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise DinoforgeError(f"bad config: {first_line(e)}") from None
    OmegaConf.set_struct(cfg, True)
    return cfg
