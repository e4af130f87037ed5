"""Configuration: defaults <- YAML file or preset <- `key=value` overrides, with strict keys and types.

One mechanism for every config: training's (the official DINOv2 YAML layout and its presets, `TRAINING`) and
curation's (`dinoforge.curate.config.CURATION`) differ only in their `ConfigSchema`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from dinoforge.utils import DinoforgeError, first_line, parse_overrides, read_yaml, unknown_keys_error

PRESETS = ("demo", "vits14", "vitb14", "vitl14", "vitl16_short", "vitg14", "vitl14_highres", "vitg14_highres")


def _package_yaml(name: str) -> DictConfig:
    return OmegaConf.create(resources.files("dinoforge.config").joinpath(f"{name}.yaml").read_text())


def default_config() -> DictConfig:
    """The full default configuration (every accepted key)."""
    return _package_yaml("ssl_default")


Rule = Callable[[object, object], str | None]  # (value, default) -> what the value must be, or None when it fits


@dataclass(frozen=True)
class ConfigSchema:
    """One kind of config for `load_config`: its defaults, how a file is found, the exceptions to the key and type
    rules, and what becomes of the merged result."""

    name: str  # in messages: "config", "curation config"
    defaults: Callable[[], DictConfig]  # every accepted key with its default value
    read: Callable[[str | Path], DictConfig]  # a preset name or a YAML file -> its contents
    finish: Callable[[DictConfig], DictConfig]  # the merged config -> the one returned (range checks, struct mode)
    override_name: str = "override"  # in messages about a malformed `key=value`
    free_sections: frozenset[str] = frozenset()  # dotted sections whose keys the user names (curation's `curated`)
    rules: Mapping[str, Rule] = field(default_factory=dict)  # dotted key -> its type rule, instead of the default's
    empty_sections_keep_defaults: bool = False  # a section given as null (`dedup:` alone) changes nothing


def _unknown_keys(user: DictConfig, default: DictConfig, free: frozenset[str], prefix: str = "") -> list[str]:
    bad = []
    for k in user:  # nodes, not values: an interpolation is not resolved here (its target may be elsewhere)
        full = f"{prefix}{k}"
        if k not in default:
            bad.append(full)
            continue
        v, ref = user._get_node(k), default._get_node(k)
        if isinstance(v, DictConfig) and isinstance(ref, DictConfig) and full not in free:
            bad += _unknown_keys(v, ref, free, full + ".")
    return bad


def _check_keys(user: DictConfig, default: DictConfig, source: str, schema: ConfigSchema) -> None:
    bad = _unknown_keys(user, default, schema.free_sections)
    if bad:
        raise unknown_keys_error(schema.name, source, bad, default)


def _drop_empty_sections(user: DictConfig, default: DictConfig) -> None:
    """Remove the keys of `user` that are null where the default is a section, at any depth."""
    for k in list(user):
        if k not in default or OmegaConf.is_interpolation(user, k) or not isinstance(default._get_node(k), DictConfig):
            continue
        value = _raw(user, k)
        if value is None:
            del user[k]
        elif isinstance(value, DictConfig):
            _drop_empty_sections(value, default._get_node(k))


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


def _check_types(user: DictConfig, default: DictConfig, source: str, schema: ConfigSchema, prefix: str = "") -> None:
    """Each value of `user` must have the type of the default it replaces (or pass the key's rule): `optim.epochs=abc`
    fails here, naming the key, rather than deep inside training."""
    for k in user:
        full = f"{prefix}{k}"
        if k not in default or OmegaConf.is_missing(user, k) or OmegaConf.is_interpolation(user, k):
            continue
        value, ref = _raw(user, k), _raw(default, k)
        if isinstance(ref, DictConfig):
            if not isinstance(value, DictConfig):
                raise DinoforgeError(
                    f"{schema.name} key {full!r} in {source} must be a mapping, got {_kind(value)} {value!r}"
                )
            _check_types(value, ref, source, schema, full + ".")
            continue
        rule = schema.rules.get(full)
        problem = rule(value, ref) if rule is not None else _type_problem(value, ref)
        if problem:
            shown = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
            raise DinoforgeError(
                f"{schema.name} key {full!r} must be {problem}, got {_kind(value)} {shown!r} (default: {ref!r}; in "
                f"{source})"
            )


def _check(user: DictConfig, default: DictConfig, source: str, schema: ConfigSchema) -> None:
    """Unknown keys, then types, of one layer (a file or the overrides) against the defaults."""
    if schema.empty_sections_keep_defaults:
        _drop_empty_sections(user, default)
    _check_keys(user, default, source, schema)
    _check_types(user, default, source, schema)


def nullable(kind: type) -> Rule:
    """The rule of a key that takes null besides a value: of type `kind` where the default is null, else of the
    default's type."""

    def rule(value: object, default: object) -> str | None:
        if value is None:
            return None
        if default is None:
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            return None if ok else f"{'an' if kind is int else 'a'} {kind.__name__} or null"
        return _type_problem(value, default)

    return rule


def _load_file(config: str | Path) -> DictConfig:
    if str(config) in PRESETS:
        return _package_yaml(str(config))
    path = Path(config)
    if not path.is_file():
        raise DinoforgeError(f"config not found: {config} (a YAML file or a preset: {', '.join(PRESETS)})")
    return read_yaml(path, "config")


def _struct(cfg: DictConfig) -> DictConfig:
    OmegaConf.set_struct(cfg, True)
    return cfg


# Keys that take null besides a value of a fixed type: a null default means "use the preset" (embed_dim, depth,
# num_heads); `student.layerscale: null` builds blocks without LayerScale; `train.sequence_packing: null` decides by
# device.
TRAINING = ConfigSchema(
    name="config",
    defaults=default_config,
    read=_load_file,
    finish=_struct,
    rules={
        "student.embed_dim": nullable(int),
        "student.depth": nullable(int),
        "student.num_heads": nullable(int),
        "student.layerscale": nullable(float),
        "train.sequence_packing": nullable(bool),
    },
)


def load_config(
    config: str | Path | None = None, overrides: Sequence[str] | None = (), schema: ConfigSchema = TRAINING
) -> DictConfig:
    """Defaults ← preset or YAML file ← `key=value` overrides (training's config unless `schema` says another); an
    unknown key fails naming close matches, a value of the wrong type names its key, all as one-line errors."""
    cfg = defaults = schema.defaults()
    if config:
        user = schema.read(config)
        _check(user, defaults, str(config), schema)
        cfg = OmegaConf.merge(defaults, user)
    if overrides:
        dot = parse_overrides(overrides, schema.override_name)
        _check(dot, defaults, "command-line overrides", schema)  # against the defaults, not the file's values
        cfg = OmegaConf.merge(cfg, dot)
    try:  # a `${...}` interpolation that points nowhere fails now, not mid-run
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        raise DinoforgeError(f"bad {schema.name} interpolation: {first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise DinoforgeError(f"bad {schema.name}: {first_line(e)}") from None
    return schema.finish(cfg)
