"""Training configuration: the official DINOv2 YAML layout, presets, `key=value` overrides, strict keys."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, GrammarParseError

from dinoforge.utils import DinoforgeError

PRESETS = ("demo", "vits14", "vitb14", "vitl14", "vitl16_short", "vitg14")


def _package_yaml(name: str) -> DictConfig:
    return OmegaConf.create(resources.files("dinoforge.config").joinpath(f"{name}.yaml").read_text())


def default_config() -> DictConfig:
    """The full default configuration (every accepted key)."""
    return _package_yaml("ssl_default")


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _flat_keys(v, full + ".")
    return keys


def _unknown_keys(user: DictConfig, default: DictConfig, prefix: str = "") -> list[str]:
    bad = []
    for k, v in user.items():
        full = f"{prefix}{k}"
        if k not in default:
            bad.append(full)
        elif isinstance(v, DictConfig) and isinstance(default[k], DictConfig):
            bad += _unknown_keys(v, default[k], full + ".")
    return bad


def _check_keys(user: DictConfig, default: DictConfig, source: str) -> None:
    bad = _unknown_keys(user, default)
    if not bad:
        return
    known = _flat_keys(default)
    parts = []
    for key in bad:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        leaf = key.rsplit(".", 1)[-1]
        close += [k for k in known if k.rsplit(".", 1)[-1] == leaf and k not in close][:3]
        parts.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise DinoforgeError(f"unknown config key in {source}: {'; '.join(parts)}")


def _load_file(config: str | Path) -> DictConfig:
    if str(config) in PRESETS:
        return _package_yaml(str(config))
    path = Path(config)
    if not path.is_file():
        raise DinoforgeError(f"config not found: {config} (a YAML file or a preset: {', '.join(PRESETS)})")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, GrammarParseError) as e:
        raise DinoforgeError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise DinoforgeError(f"config {path} must be a YAML mapping")
    return loaded


def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults ← preset or YAML file ← `key=value` overrides; an unknown key fails naming close matches."""
    cfg = default_config()
    if config:
        user = _load_file(config)
        _check_keys(user, cfg, str(config))
        cfg = OmegaConf.merge(cfg, user)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise DinoforgeError(f"overrides must be key=value, got: {' '.join(bad)}")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except (GrammarParseError, ConfigKeyError, ConfigAttributeError) as e:
            raise DinoforgeError(f"bad override: {str(e).splitlines()[0]}") from None
        _check_keys(dot, cfg, "command-line overrides")
        cfg = OmegaConf.merge(cfg, dot)
    OmegaConf.set_struct(cfg, True)
    return cfg
