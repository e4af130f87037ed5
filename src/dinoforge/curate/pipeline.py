"""`curate run`: embed → de-duplicate → drop test-set near copies → cluster → retrieve → balanced sample,
then a
`.jsonl` manifest (readable by `dinoforge train --data`) and a report (JSON stats, PNG montages)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from dinoforge import distributed
from dinoforge.curate.dedup import DedupResult, dedup, near_reference, plan_index
from dinoforge.curate.embed import embed_images
from dinoforge.curate.kmeans import Hierarchy, auto_levels, hierarchical_kmeans
from dinoforge.curate.retrieve import retrieve
from dinoforge.curate.sample import balanced_sample, size_entropy
from dinoforge.curate.store import EmbeddingStore, absolute_name, dim, take_rows
from dinoforge.utils import DinoforgeError, atomic_write, eprint, write_json


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
    embed_images(spec, out, cfg.model, cfg.weights, cfg.shard_size, cfg.batch_size, cfg.device, cfg.random_init)
    store = EmbeddingStore.open(out)
    if len(store) == 0:
        raise DinoforgeError(f"no readable image in {spec} ({len(store.skipped)} unreadable)")
    return store


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


def run_pipeline(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run every curation step from one config; rank 0 writes manifest.jsonl, report.json and montages.

    Under torchrun, embedding is split over ranks by shard, the duplicate and near-test searches by query rows and
    level-0 k-means by rows; every other step is deterministic and repeated on each rank, so the manifest does not
    depend on the number of ranks. Each finished stage is saved under `stages/`, so a rerun resumes."""
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

    d = cfg.dedup
    memory = None if d.memory_gb is None else int(d.memory_gb * 2**30)
    plan = plan_index(len(pool), dim(pool.shards), d.index, memory, d.nlist, d.nprobe)
    eprint(f"dedup index: {plan.as_dict()}")
    pool_key = {"pool": pool.paths, "shards": [int(s.shape[0]) for s in pool.shards], "embedder": pool.embedder}
    dedup_key = {**pool_key, "threshold": d.threshold, "plan": plan.as_dict(), "seed": cfg.seed}

    def run_dedup() -> dict[str, np.ndarray]:
        dd = dedup(pool.shards, d.threshold, plan, cfg.gpu, cfg.seed)
        return {"keep": dd.keep, "component": dd.component, "pairs": dd.pairs, "similarity": dd.similarity}

    dd = DedupResult(**_stage(out, "dedup", dedup_key, run_dedup), plan=plan)
    keep = dd.keep
    report["dedup"] = {
        "threshold": d.threshold,
        "index": plan.as_dict(),
        "pairs": len(dd.pairs),
        "removed": len(dd.removed),
        "kept": len(keep),
    }

    def run_near_test() -> dict[str, np.ndarray]:
        near = np.zeros(len(pool), bool)
        for t in tests:
            near |= near_reference(pool.shards, t.shards, d.test_threshold, gpu=cfg.gpu)[0]
        return {"near": near}

    test_key = {**pool_key, "tests": [(t.paths, t.embedder) for t in tests], "threshold": d.test_threshold}
    near_test = _stage(out, "near_test", test_key, run_near_test)["near"][keep]
    report["test_near_duplicates_removed"] = int(near_test.sum())
    clean = keep[~near_test]
    if len(clean) == 0:
        raise DinoforgeError("nothing left in the pool after de-duplication")
    x = take_rows(pool.shards, clean)

    hier: Hierarchy | None = None
    settings = cluster_settings(cfg, len(clean))
    if settings["levels"]:
        report["cluster"] = settings
        eprint(f"hierarchical k-means on {len(clean)} images: {settings}")
        cluster_key = {"dedup": dedup_key, "near_test": test_key, **settings, "engine": cfg.cluster.engine}

        def run_kmeans() -> dict[str, np.ndarray]:
            s = settings
            h = hierarchical_kmeans(
                x,
                s["levels"],
                s["niter"],
                s["resample_steps"],
                s["sample_sizes"],
                cfg.seed,
                cfg.cluster.engine,
                cfg.gpu,
            )
            return h.arrays()

        hier = Hierarchy.from_arrays(_stage(out, "kmeans", cluster_key, run_kmeans))
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
