"""`curate run`: embed → de-duplicate → drop test-set near copies → cluster → retrieve → balanced sample,
then a
`.jsonl` manifest (readable by `dinoforge train --data`) and a report (JSON stats, PNG montages)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinoforge import distributed
from dinoforge.curate.dedup import DEFAULT_THRESHOLD, dedup, near_reference
from dinoforge.curate.embed import embed_images
from dinoforge.curate.kmeans import Hierarchy, hierarchical_kmeans
from dinoforge.curate.retrieve import retrieve
from dinoforge.curate.sample import balanced_sample, size_entropy
from dinoforge.curate.store import EmbeddingStore, absolute_name, take_rows
from dinoforge.utils import (
    DinoforgeError,
    atomic_write,
    eprint,
    first_line,
    parse_overrides,
    read_yaml,
    unknown_keys_error,
    write_json,
)

DEFAULTS: dict[str, Any] = {
    "pool": None,
    "curated": {},
    "test": [],
    "model": "pixel",
    "weights": None,
    "device": "auto",
    "batch_size": 64,
    "shard_size": 10000,
    "seed": 0,
    "gpu": False,
    "dedup": {
        "threshold": DEFAULT_THRESHOLD,
        "test_threshold": DEFAULT_THRESHOLD,
        "index": "flat",
        "k": None,
    },
    "retrieve": {"k": 4, "m": 100, "sample_min_size": 1_000_000},
    "cluster": {"levels": [], "niter": 20, "resample_steps": 0, "sample_sizes": None, "engine": "auto"},
    "sample": {"target_size": None, "strategy": "random"},
    "montage": {"clusters": 6, "per_cluster": 8, "duplicates": 16},
}


def _check_keys(user: dict[Any, Any], source: str) -> dict[str, Any]:
    """Fail on keys that are not in DEFAULTS (at any depth; `curated` names are free), naming close matches.
    A section left empty (`dedup:` with nothing under it) keeps its defaults."""
    bad: list[str] = []

    def walk(part: dict[Any, Any], defaults: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in part.items():
            key = f"{prefix}{k}"
            if not isinstance(k, str) or k not in defaults:
                bad.append(key)
                continue
            d = defaults[k]
            if isinstance(d, dict) and d:  # a section with fixed keys
                if v is None:
                    continue
                if not isinstance(v, dict):
                    raise DinoforgeError(
                        f"curation config key {key!r} ({source}) must be a mapping with keys {', '.join(d)}, got {v!r}"
                    )
                out[k] = walk(v, d, key + ".")
            else:
                out[k] = v
        return out

    checked = walk(user, DEFAULTS, "")
    if bad:
        raise unknown_keys_error("curation config", source, bad, DEFAULTS)
    return checked


def _load_yaml(path: str | Path) -> dict[Any, Any]:
    from dinoforge.utils import require_file

    p = require_file(path, "curation config")
    if not p.is_file():
        raise DinoforgeError(f"curation config {p} is not a file")
    loaded = read_yaml(p, "curation config")
    return _to_container(loaded, f"curation config {p}")


def _to_container(cfg: DictConfig, source: str, resolve: bool = False) -> dict[Any, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=resolve)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise DinoforgeError(f"{source}: {first_line(e) or type(e).__name__}") from None


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in part.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
    """Type- and range-check every value (so a typo such as `dedup.threshold=abc` fails here, in one line)."""
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
    if not isinstance(c["gpu"], bool):
        raise _fail("gpu", "true or false", c["gpu"])
    d = c["dedup"]
    d["threshold"] = _float("dedup.threshold", d["threshold"], -1.0, 1.0)
    d["test_threshold"] = _float("dedup.test_threshold", d["test_threshold"], -1.0, 1.0)
    _choice("dedup.index", d["index"], ("flat", "ivf", "ivfpq"))
    _int("dedup.k", d["k"], 1, optional=True)
    r = c["retrieve"]
    _int("retrieve.k", r["k"], 1)
    _int("retrieve.m", r["m"], 1)
    _int("retrieve.sample_min_size", r["sample_min_size"], 0)
    k = c["cluster"]
    k["levels"] = _ints("cluster.levels", k["levels"], 1, scalar_ok=True)
    if isinstance(k["levels"], int):
        k["levels"] = [k["levels"]]
    _int("cluster.niter", k["niter"], 1)
    _ints("cluster.resample_steps", k["resample_steps"], 0, scalar_ok=True)
    _ints("cluster.sample_sizes", k["sample_sizes"], 0, scalar_ok=True, optional=True)
    _choice("cluster.engine", k["engine"], ("auto", "faiss", "lloyd"))
    _int("sample.target_size", c["sample"]["target_size"], 1, optional=True)
    _choice("sample.strategy", c["sample"]["strategy"], ("random", "closest"))
    for key in ("clusters", "per_cluster", "duplicates"):
        _int(f"montage.{key}", c["montage"][key], 0)
    return c


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults merged with a YAML file and `key=value` overrides. Unknown keys (at any depth, named with
    close matches), values of the wrong type or range, invalid YAML and bad overrides are one-line
    DinoforgeErrors."""
    merged: dict[str, Any] = copy.deepcopy(DEFAULTS)
    if path is not None:
        merged = _merge(merged, _check_keys(_load_yaml(path), str(path)))
    if overrides:
        dot = _to_container(parse_overrides(overrides, "curation override"), "curation overrides")
        merged = _merge(merged, _check_keys(dot, "command-line overrides"))
    resolved = _to_container(OmegaConf.create(merged), "curation config", resolve=True)
    return OmegaConf.create(_check_values(resolved))


def write_manifest(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write one JSON object per line (atomic): the format FileListDataset reads. Image paths ("path",
    "duplicate_of") are written absolute: FileListDataset resolves a relative path against the manifest's
    folder, not against the folder the images were found from."""
    keys = ("path", "duplicate_of")
    lines = []
    for r in records:
        r = {k: absolute_name(v) if k in keys and isinstance(v, str) else v for k, v in r.items()}
        lines.append(json.dumps(r) + "\n")
    data = "".join(lines).encode()
    atomic_write(Path(path), lambda f: f.write(data))
    return Path(path)


def montage(paths: list[list[str]], out_png: str | Path, title: str, thumb: int = 64) -> Path | None:
    """Save a grid of image thumbnails, one row per group (a cluster, or a kept image with its duplicates)."""
    from PIL import Image, ImageDraw

    from dinoforge.data.datasets import CorruptImageError, load_item

    rows = [r for r in paths if r]
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (thumb + 2), len(rows) * (thumb + 2) + 16), "white")
    ImageDraw.Draw(sheet).text((2, 2), title, fill="black")
    for i, row in enumerate(rows):
        for j, p in enumerate(row):
            try:
                im = load_item(p).resize((thumb, thumb))
            except CorruptImageError:
                continue
            sheet.paste(im, (j * (thumb + 2), 16 + i * (thumb + 2)))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return Path(out_png)


def _embed(spec: str, out: Path, cfg: DictConfig) -> EmbeddingStore:
    embed_images(spec, out, cfg.model, cfg.weights, cfg.shard_size, cfg.batch_size, cfg.device)
    store = EmbeddingStore.open(out)
    if len(store) == 0:
        raise DinoforgeError(f"no readable image in {spec} ({len(store.skipped)} unreadable)")
    return store


def run_pipeline(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run every curation step from one config; rank 0 writes manifest.jsonl, report.json and montages.

    Under torchrun, embedding is split over ranks by shard and level-0 k-means over ranks by rows; every other
    step is deterministic and repeated on each rank, so the manifest does not depend on the number of
    ranks."""
    out = Path(out_dir)
    rank, _ = distributed.rank_world_or_env()
    pool = _embed(str(cfg.pool), out / "embeddings" / "pool", cfg)
    curated = {
        name: _embed(str(spec), out / "embeddings" / "curated" / name, cfg) for name, spec in cfg.curated.items()
    }
    tests = [_embed(str(spec), out / "embeddings" / "test" / str(i), cfg) for i, spec in enumerate(cfg.test)]
    report: dict[str, Any] = {
        "pool_images": len(pool) + len(pool.skipped),
        "pool_unreadable": len(pool.skipped),
    }
    report["curated_unreadable"] = {n: len(s.skipped) for n, s in curated.items()}

    dd = dedup(pool.shards, cfg.dedup.threshold, cfg.dedup.k, cfg.dedup.index, cfg.gpu)
    keep = dd.keep
    report["dedup"] = {
        "threshold": cfg.dedup.threshold,
        "pairs": len(dd.pairs),
        "removed": len(dd.removed),
        "kept": len(keep),
    }
    near_test = np.zeros(len(keep), bool)
    kept_vectors = take_rows(pool.shards, keep) if tests else None
    for t in tests:
        near_test |= near_reference(kept_vectors, t.shards, cfg.dedup.test_threshold, gpu=cfg.gpu)[0]
    report["test_near_duplicates_removed"] = int(near_test.sum())
    clean = keep[~near_test]
    if len(clean) == 0:
        raise DinoforgeError("nothing left in the pool after de-duplication")
    x = take_rows(pool.shards, clean)

    hier: Hierarchy | None = None
    if cfg.cluster.levels:
        levels = [min(int(k), len(clean)) for k in cfg.cluster.levels]
        hier = hierarchical_kmeans(
            x,
            levels,
            cfg.cluster.niter,
            cfg.cluster.resample_steps,
            cfg.cluster.sample_sizes,
            cfg.seed,
            cfg.cluster.engine,
            cfg.gpu,
        )
    cluster_ids = hier.point_clusters() if hier is not None else None

    records: dict[int, dict[str, Any]] = {}
    if curated:
        got = retrieve(
            x,
            {n: s.shards for n, s in curated.items()},
            cfg.retrieve.k,
            cfg.retrieve.m,
            cfg.retrieve.sample_min_size,
            pool_clusters=hier.levels[0] if hier else None,
            seed=cfg.seed,
            gpu=cfg.gpu,
        )
        report["retrieve"] = {}
        for name, r in got.items():
            report["retrieve"][name] = {"method": r.method, "images": len(r.rows)}
            for row, sim in zip(r.rows.tolist(), r.similarity.tolist(), strict=True):
                if row not in records or records[row]["similarity"] < sim:
                    records[row] = {"step": "retrieve", "source": name, "method": r.method, "similarity": sim}
    if cfg.sample.target_size:
        if hier is None:
            raise DinoforgeError("sample.target_size needs cluster.levels (hierarchical k-means) to sample from")
        picked = balanced_sample(hier, int(cfg.sample.target_size), cfg.sample.strategy, cfg.seed)
        top = cluster_ids[:, -1]
        report["sample"] = {
            "target_size": int(cfg.sample.target_size),
            "picked": len(picked),
            "top_cluster_entropy_before": size_entropy(top),
            "top_cluster_entropy_after": size_entropy(top[picked]),
        }
        for row in picked.tolist():
            records.setdefault(row, {"step": "sample", "source": "pool", "similarity": None})
    if not curated and not cfg.sample.target_size:
        records = {row: {"step": "dedup", "source": "pool", "similarity": None} for row in range(len(clean))}

    manifest = []
    for row in sorted(records):
        rec = {"path": pool.paths[int(clean[row])], **records[row]}
        if cluster_ids is not None:
            rec["cluster"] = cluster_ids[row].tolist()
        manifest.append(rec)
    report["manifest_images"] = len(manifest)
    if rank == 0:
        write_manifest(out / "manifest.jsonl", manifest)
        _montages(out, cfg, pool, dd, clean, cluster_ids)
        write_json(out / "report.json", report)
    distributed.barrier()
    eprint(f"curated {len(manifest)} images -> {out / 'manifest.jsonl'}")
    return report


def _montages(out: Path, cfg: DictConfig, pool: EmbeddingStore, dd, clean: np.ndarray, cluster_ids) -> None:
    groups: dict[int, list[int]] = {}
    for i in dd.removed.tolist():
        groups.setdefault(int(dd.component[i]), []).append(i)
    rows = []
    for comp, removed in list(groups.items())[: cfg.montage.duplicates]:
        kept = int(np.nonzero(dd.component == comp)[0][0])
        rows.append([pool.paths[kept]] + [pool.paths[i] for i in removed[:7]])
    montage(rows, out / "duplicates.png", "kept image | removed near duplicates")
    if cluster_ids is not None:
        rng = np.random.default_rng(cfg.seed)
        leaf = cluster_ids[:, 0]
        ids = rng.permutation(np.unique(leaf))[: cfg.montage.clusters]
        rows = [[pool.paths[int(clean[i])] for i in np.nonzero(leaf == c)[0][: cfg.montage.per_cluster]] for c in ids]
        montage(rows, out / "clusters.png", "one level-0 cluster per row")
