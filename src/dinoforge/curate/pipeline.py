"""`curate run`: embed → de-duplicate → drop test-set near copies → cluster → retrieve → balanced sample,
then a
`.jsonl` manifest (readable by `dinoforge train --data`) and a report (JSON stats, PNG montages)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from dinoforge import distributed
from dinoforge.curate.dedup import DedupResult, dedup, near_reference, plan_index
from dinoforge.curate.embed import embed_set, embedder, embedder_identity
from dinoforge.curate.kmeans import Hierarchy, auto_levels, hierarchical_kmeans
from dinoforge.curate.retrieve import retrieve
from dinoforge.curate.sample import balanced_sample, size_entropy
from dinoforge.curate.store import EmbeddingStore, absolute_name, dim, take_rows
from dinoforge.utils import DinoforgeError, atomic_write, eprint, resolve_device, write_json


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


def cluster_settings(cfg: DictConfig, n: int) -> dict[str, Any]:
    """Hierarchical k-means settings for n images: the config's, with `auto` levels and iterations from the pool
    size (`kmeans.auto_levels`); per-level lists shorter than the levels repeat their last value."""
    c = cfg.cluster
    levels, niter = auto_levels(n)
    levels = levels if c.levels == "auto" else [min(int(k), n) for k in c.levels]
    niter = niter if c.niter == "auto" else int(c.niter)

    def per_level(v: Any) -> list[int]:
        v = [0] if v is None else list(v) if not isinstance(v, int) else [v]
        return (v + v[-1:] * len(levels))[: len(levels)]

    return {
        "levels": levels,
        "niter": niter,
        "resample_steps": per_level(c.resample_steps),
        "sample_sizes": per_level(c.sample_sizes),
        "rule": "config" if c.levels != "auto" and c.niter != "auto" else "auto (Vo et al. 2024 proportions)",
    }


def _stage(out: Path, name: str, key: dict[str, Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict:
    """A pipeline stage's arrays: read back from `stages/<name>.npz` when a run with the same inputs (`key`)
    finished it, else computed (on every rank) and saved by rank 0. A killed run, rerun, skips finished stages."""
    path = out / "stages" / f"{name}.npz"
    tag = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    if path.exists():
        with np.load(path) as z:
            if str(z["key"]) == tag:
                eprint(f"{name}: finished by an earlier run, read from {path}")
                return {k: z[k] for k in z.files if k != "key"}
    arrays = compute()
    if distributed.rank() == 0:
        atomic_write(path, lambda f: np.savez(f, key=np.array(tag), **arrays))
    distributed.barrier()
    return arrays


Draw = Callable[[list[list[str]], Path, str], Any]
"""Draws a thumbnail sheet (rows of image names, PNG path, title): `viz.montage.montage`, given by the caller."""


@dataclass
class Embedder:
    """The curation embedding model, loaded once on its device for every set of a run, and its identity (which
    keys the finished stages, so embeddings of another model never reuse them)."""

    net: torch.nn.Module
    transform: Any
    device: torch.device
    identity: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Embedder:
        device = resolve_device(cfg.device)
        net, transform = embedder(cfg.model, cfg.weights, str(device), cfg.random_init)
        return cls(net, transform, device, embedder_identity(cfg.model, cfg.weights, cfg.random_init))

    def embed(self, spec: str, out: Path, cfg: DictConfig) -> EmbeddingStore:
        """Embed one set into `out` (resuming finished shards) and open it; a set with no readable image is an error."""
        embed_set(spec, out, self.net, self.transform, self.device, self.identity, cfg.shard_size, cfg.batch_size)
        store = EmbeddingStore.open(out)
        if len(store) == 0:
            raise DinoforgeError(f"no readable image in {spec} ({len(store.skipped)} unreadable)")
        return store


@dataclass
class EmbeddedSets:
    """The pool, the curated sets to retrieve for (by name) and the test sets to keep out, embedded."""

    pool: EmbeddingStore
    curated: dict[str, EmbeddingStore]
    tests: list[EmbeddingStore]


def embed_sets(cfg: DictConfig, out: Path, model: Embedder) -> EmbeddedSets:
    """Stage 1: embed every set of the config under `out/embeddings`."""
    root = out / "embeddings"
    return EmbeddedSets(
        model.embed(str(cfg.pool), root / "pool", cfg),
        {name: model.embed(str(spec), root / "curated" / name, cfg) for name, spec in cfg.curated.items()},
        [model.embed(str(spec), root / "test" / str(i), cfg) for i, spec in enumerate(cfg.test)],
    )


def pool_key(pool: EmbeddingStore) -> dict[str, Any]:
    """What identifies the embedded pool in stage keys: its images, shard sizes and the model that embedded it."""
    return {"pool": pool.paths, "shards": [int(s.shape[0]) for s in pool.shards], "embedder": pool.embedder}


def deduplicate_pool(cfg: DictConfig, out: Path, pool: EmbeddingStore) -> tuple[DedupResult, dict[str, Any]]:
    """Stage 2: near-duplicate components of the pool, one image kept per component; and the stage's key."""
    d = cfg.dedup
    memory = None if d.memory_gb is None else int(d.memory_gb * 2**30)
    plan = plan_index(len(pool), dim(pool.shards), d.index, memory, d.nlist, d.nprobe)
    eprint(f"dedup index: {plan.as_dict()}")
    key = {**pool_key(pool), "threshold": d.threshold, "plan": plan.as_dict(), "seed": cfg.seed}

    def compute() -> dict[str, np.ndarray]:
        found = dedup(pool.shards, d.threshold, plan, cfg.gpu, cfg.seed)
        return {"keep": found.keep, "component": found.component, "pairs": found.pairs, "similarity": found.similarity}

    return DedupResult(**_stage(out, "dedup", key, compute), plan=plan), key


def remove_test_copies(
    cfg: DictConfig, out: Path, sets: EmbeddedSets, kept: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Stage 3: the kept rows that nearly copy a test image (a mask over `kept`), the rows left, and the key."""
    threshold = cfg.dedup.test_threshold
    key = {**pool_key(sets.pool), "tests": [(t.paths, t.embedder) for t in sets.tests], "threshold": threshold}

    def compute() -> dict[str, np.ndarray]:
        near = np.zeros(len(sets.pool), bool)
        for t in sets.tests:
            near |= near_reference(sets.pool.shards, t.shards, threshold, gpu=cfg.gpu)[0]
        return {"near": near}

    near_test = _stage(out, "near_test", key, compute)["near"][kept]
    clean = kept[~near_test]
    if len(clean) == 0:
        raise DinoforgeError("nothing left in the pool after de-duplication")
    return near_test, clean, key


def cluster_pool(cfg: DictConfig, out: Path, x: np.ndarray, inputs: dict[str, Any]) -> Hierarchy | None:
    """Stage 4: hierarchical k-means of the cleaned pool's vectors `x` (None when the config asks for no levels)."""
    settings = cluster_settings(cfg, len(x))
    if not settings["levels"]:
        return None
    eprint(f"hierarchical k-means on {len(x)} images: {settings}")
    key = {**inputs, **settings, "engine": cfg.cluster.engine}

    def compute() -> dict[str, np.ndarray]:
        s = settings
        levels = (s["levels"], s["niter"], s["resample_steps"], s["sample_sizes"])
        return hierarchical_kmeans(x, *levels, cfg.seed, cfg.cluster.engine, cfg.gpu).arrays()

    return Hierarchy.from_arrays(_stage(out, "kmeans", key, compute))


def select_images(
    cfg: DictConfig, x: np.ndarray, sets: EmbeddedSets, hier: Hierarchy | None, report: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """Stage 5: the cleaned pool's rows to keep (retrieved for a curated set, or drawn by the balanced sample), with
    how each was chosen; every cleaned row when the config asks for neither."""
    records: dict[int, dict[str, Any]] = {}
    if sets.curated:
        got = retrieve(
            x,
            {n: s.shards for n, s in sets.curated.items()},
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
        top = hier.point_clusters()[:, -1]
        report["sample"] = {
            "target_size": int(cfg.sample.target_size),
            "picked": len(picked),
            "top_cluster_entropy_before": size_entropy(top),
            "top_cluster_entropy_after": size_entropy(top[picked]),
        }
        for row in picked.tolist():
            records.setdefault(row, {"step": "sample", "source": "pool", "similarity": None})
    if not sets.curated and not cfg.sample.target_size:
        records = {row: {"step": "dedup", "source": "pool", "similarity": None} for row in range(len(x))}
    return records


def run_pipeline(cfg: DictConfig, out_dir: str | Path, draw: Draw | None = None) -> dict[str, Any]:
    """Run every curation stage from one config; rank 0 writes manifest.jsonl, report.json and (with `draw`) the
    duplicate and cluster montages.

    Under torchrun, embedding is split over ranks by shard, the duplicate and near-test searches by query rows and
    level-0 k-means by rows; every other step is deterministic and repeated on each rank, so the manifest does not
    depend on the number of ranks. Each finished stage is saved under `stages/`, so a rerun resumes."""
    out = Path(out_dir)
    sets = embed_sets(cfg, out, Embedder.from_config(cfg))
    pool = sets.pool
    report: dict[str, Any] = {
        "pool_images": len(pool) + len(pool.skipped),
        "pool_unreadable": len(pool.skipped),
        "curated_unreadable": {n: len(s.skipped) for n, s in sets.curated.items()},
    }
    duplicates, dedup_key = deduplicate_pool(cfg, out, pool)
    report["dedup"] = {
        "threshold": cfg.dedup.threshold,
        "index": duplicates.plan.as_dict(),
        "pairs": len(duplicates.pairs),
        "removed": len(duplicates.removed),
        "kept": len(duplicates.keep),
    }
    near_test, clean, test_key = remove_test_copies(cfg, out, sets, duplicates.keep)
    report["test_near_duplicates_removed"] = int(near_test.sum())
    x = take_rows(pool.shards, clean)
    hier = cluster_pool(cfg, out, x, {"dedup": dedup_key, "near_test": test_key})
    if hier is not None:
        report["cluster"] = cluster_settings(cfg, len(clean))
    cluster_ids = hier.point_clusters() if hier is not None else None
    records = select_images(cfg, x, sets, hier, report)
    manifest = []
    for row in sorted(records):
        rec = {"path": pool.paths[int(clean[row])], **records[row]}
        if cluster_ids is not None:
            rec["cluster"] = cluster_ids[row].tolist()
        manifest.append(rec)
    report["manifest_images"] = len(manifest)
    if distributed.rank_world_or_env()[0] == 0:
        write_manifest(out / "manifest.jsonl", manifest)
        if draw is not None:
            _montages(out, cfg, pool, duplicates, clean, cluster_ids, draw)
        write_json(out / "report.json", report)
    distributed.barrier()
    eprint(f"curated {len(manifest)} images -> {out / 'manifest.jsonl'}")
    return report


def _montages(
    out: Path, cfg: DictConfig, pool: EmbeddingStore, found: DedupResult, clean: np.ndarray, cluster_ids, draw: Draw
) -> None:
    """The duplicate sheet (a kept image and up to 7 removed copies per row) and the cluster sheet."""
    groups: dict[int, list[int]] = {}
    for i in found.removed.tolist():
        groups.setdefault(int(found.component[i]), []).append(i)
    rows = [[pool.paths[comp]] + [pool.paths[i] for i in removed[:7]] for comp, removed in groups.items()]
    draw(rows[: cfg.montage.duplicates], out / "duplicates.png", "kept image | removed near duplicates")
    if cluster_ids is not None:
        rng = np.random.default_rng(cfg.seed)
        leaf = cluster_ids[:, 0]
        ids = rng.permutation(np.unique(leaf))[: cfg.montage.clusters]
        rows = [[pool.paths[int(clean[i])] for i in np.nonzero(leaf == c)[0][: cfg.montage.per_cluster]] for c in ids]
        draw(rows, out / "clusters.png", "one level-0 cluster per row")
