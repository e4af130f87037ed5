"""`curate run`: embed → de-duplicate → drop test-set near copies → cluster → retrieve → balanced sample,
then a
`.jsonl` manifest (readable by `dinoforge train --data`) and a report (JSON stats, PNG montages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from dinoforge import distributed
from dinoforge.curate.dedup import dedup, near_reference
from dinoforge.curate.embed import embed_images
from dinoforge.curate.kmeans import Hierarchy, hierarchical_kmeans
from dinoforge.curate.retrieve import retrieve
from dinoforge.curate.sample import balanced_sample, size_entropy
from dinoforge.curate.store import EmbeddingStore, absolute_name, take_rows
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
