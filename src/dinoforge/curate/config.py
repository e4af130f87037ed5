"""Curation's configuration (`curate run`): its defaults and value ranges, loaded by the same mechanism as training's
(dinoforge.config.config.load_config), where `curated.<name>` is a section of free names."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinoforge.config import config
from dinoforge.curate.dedup import DEFAULT_THRESHOLD, INDEX_TYPES
from dinoforge.utils import DinoforgeError, read_yaml, require_file

DEFAULTS: dict[str, Any] = {
    "pool": None,
    "curated": {},
    "test": [],
    "model": "pixel",
    "weights": None,
    "random_init": False,
    "device": "auto",
    "batch_size": 64,
    "shard_size": 10000,
    "seed": 0,
    "gpu": False,
    "dedup": {
        "threshold": DEFAULT_THRESHOLD,
        "test_threshold": DEFAULT_THRESHOLD,
        "index": "auto",
        "nlist": None,
        "nprobe": None,
        "memory_gb": None,
    },
    "retrieve": {"k": 4, "m": 100, "sample_min_size": 1_000_000},
    "cluster": {"levels": "auto", "niter": "auto", "resample_steps": 0, "sample_sizes": None, "engine": "auto"},
    "sample": {"target_size": None, "strategy": "random"},
    "montage": {"clusters": 6, "per_cluster": 8, "duplicates": 16},
}


def _fail(key: str, what: str, value: Any) -> DinoforgeError:
    return DinoforgeError(f"curation config key {key!r} must be {what}, got {value!r}")


def _int(key: str, v: Any, lo: int | None = None, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    what = "an integer" + ("" if lo is None else f" >= {lo}") + (" or null" if optional else "")
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise _fail(key, what, v)
    return v


def _ints(key: str, v: Any, lo: int, scalar_ok: bool, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if scalar_ok and isinstance(v, int) and not isinstance(v, bool) and v >= lo:
        return v
    what = f"a list of integers >= {lo}" + (" (or one integer)" if scalar_ok else "") + (" or null" if optional else "")
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < lo for x in v):
        raise _fail(key, what, v)
    return v


def _float(key: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise _fail(key, f"a number in [{lo:g}, {hi:g}]", v)
    return float(v)


def _choice(key: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise _fail(key, f"one of {', '.join(choices)}", v)
    return v


def _path(key: str, v: Any, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, str | int) or v == "":
        raise _fail(key, "a path" + (" or null" if optional else ""), v)
    return str(v)


def _check_values(c: dict[str, Any]) -> dict[str, Any]:
    """Range-check every value and make `test` and `cluster.levels` lists (a file or override may give one value)."""
    if not c.get("pool"):
        raise DinoforgeError("curation config needs `pool` (an image folder, file list or bundled[:split])")
    c["pool"] = _path("pool", c["pool"])
    curated = c["curated"] or {}
    if not isinstance(curated, dict):
        raise _fail("curated", "a mapping of source name -> image folder or file list", curated)
    c["curated"] = {str(name): _path(f"curated.{name}", spec) for name, spec in curated.items()}
    test = c["test"] or []
    c["test"] = [_path(f"test[{i}]", t) for i, t in enumerate(test if isinstance(test, list) else [test])]
    for key in ("model", "device"):
        if not isinstance(c[key], str) or not c[key]:
            raise _fail(key, "a non-empty string", c[key])
    c["weights"] = _path("weights", c["weights"], optional=True)
    for key in ("batch_size", "shard_size"):
        _int(key, c[key], 1)
    _int("seed", c["seed"], 0)
    for key in ("gpu", "random_init"):
        if not isinstance(c[key], bool):
            raise _fail(key, "true or false", c[key])
    d = c["dedup"]
    d["threshold"] = _float("dedup.threshold", d["threshold"], -1.0, 1.0)
    d["test_threshold"] = _float("dedup.test_threshold", d["test_threshold"], -1.0, 1.0)
    _choice("dedup.index", d["index"], INDEX_TYPES)
    _int("dedup.nlist", d["nlist"], 1, optional=True)
    _int("dedup.nprobe", d["nprobe"], 1, optional=True)
    if d["memory_gb"] is not None:
        d["memory_gb"] = _float("dedup.memory_gb", d["memory_gb"], 0.001, 1e6)
    r = c["retrieve"]
    _int("retrieve.k", r["k"], 1)
    _int("retrieve.m", r["m"], 1)
    _int("retrieve.sample_min_size", r["sample_min_size"], 0)
    k = c["cluster"]
    if k["levels"] != "auto":
        k["levels"] = _ints("cluster.levels", k["levels"], 1, scalar_ok=True)
        if isinstance(k["levels"], int):
            k["levels"] = [k["levels"]]
    if k["niter"] != "auto":
        _int("cluster.niter", k["niter"], 1)
    _ints("cluster.resample_steps", k["resample_steps"], 0, scalar_ok=True)
    _ints("cluster.sample_sizes", k["sample_sizes"], 0, scalar_ok=True, optional=True)
    _choice("cluster.engine", k["engine"], ("auto", "faiss", "lloyd"))
    _int("sample.target_size", c["sample"]["target_size"], 1, optional=True)
    _choice("sample.strategy", c["sample"]["strategy"], ("random", "closest"))
    for key in ("clusters", "per_cluster", "duplicates"):
        _int(f"montage.{key}", c["montage"][key], 0)
    return c


def _finish(cfg: DictConfig) -> DictConfig:
    return OmegaConf.create(_check_values(OmegaConf.to_container(cfg, resolve=True)))  # type: ignore[arg-type]


def _read(path: str | Path) -> DictConfig:
    p = require_file(path, "curation config")
    if not p.is_file():
        raise DinoforgeError(f"curation config {p} is not a file")
    return read_yaml(p, "curation config")


def _one_or_list(value: object, default: object) -> str | None:
    """The rule of keys that take one value or a list of them (checked in range after the merge)."""
    return "one value or a list" if isinstance(value, DictConfig) else None


def _auto_or_int(value: object, default: object) -> str | None:
    """The rule of `cluster.niter`: `auto` or an integer (checked in range after the merge)."""
    return None if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)) else "auto or an integer"


CURATION = config.ConfigSchema(
    name="curation config",
    defaults=lambda: OmegaConf.create(DEFAULTS),
    read=_read,
    finish=_finish,
    override_name="curation override",
    free_sections=frozenset({"curated"}),
    rules={
        **{key: _one_or_list for key in ("test", "cluster.levels", "cluster.resample_steps", "cluster.sample_sizes")},
        "cluster.niter": _auto_or_int,
    },
    empty_sections_keep_defaults=True,
)

load_config = partial(config.load_config, schema=CURATION)
"""`load_config(path=None, overrides=None)`: curation defaults <- YAML file <- `key=value` overrides. Unknown keys
(at any depth, named with close matches), values of the wrong type or range, invalid YAML and bad overrides are
one-line DinoforgeErrors."""
