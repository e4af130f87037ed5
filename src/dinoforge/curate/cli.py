"""`dinoforge curate ...`: embed, dedup, cluster, sample, retrieve, and `run` to chain them from one
config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from dinoforge.cli_common import BatchOpt, DeviceOpt, OutOpt, RandomInitOpt, WeightsOpt
from dinoforge.data.cli import MaxImagesOpt, MaxMbOpt, pack_to
from dinoforge.utils import DinoforgeError, write_json

app = typer.Typer(
    help="Data curation (DINOv2 §3): embed, de-duplicate, retrieve, cluster, sample.", no_args_is_help=True
)

EmbOpt = Annotated[Path, typer.Option("--emb", "-e", help="Embedding folder written by `curate embed`.")]
ThresholdOpt = Annotated[
    float,
    typer.Option(
        "--threshold",
        "-t",
        help="Cosine at or above which two images are near duplicates (0.93 is measured for the pixel descriptor).",
    ),
]


def _ints(text: str | None, what: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise DinoforgeError(f"{what}: expected comma-separated integers, got {text!r}") from None


@app.command("embed")
def embed_cmd(
    data: Annotated[
        str,
        typer.Option("--data", "-d", help="Image folder, .txt/.csv/.jsonl list, shards (s/{0..9}.tar), bundled."),
    ],
    out: OutOpt,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="'pixel' (copy-detection thumbnail descriptor) or a backbone name / weights file.",
        ),
    ] = "pixel",
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per shard file.")] = 10000,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
) -> None:
    """Embed images into float16 shards (resumable; under torchrun each rank embeds its own shards)."""
    from dinoforge.curate.embed import embed_images
    from dinoforge.distributed import init_from_env

    init_from_env()
    stats = embed_images(data, out, model, weights, shard_size, batch_size, device, random_init)
    typer.echo(
        f"embedded {stats['embedded']} images, skipped {stats['skipped']} unreadable, "
        f"resumed {stats['resumed_shards']} finished shard(s) -> {out}"
    )


@app.command("dedup")
def dedup_cmd(
    emb: EmbOpt,
    out: OutOpt,
    threshold: ThresholdOpt = 0.93,
    test_emb: Annotated[
        list[Path] | None,
        typer.Option(
            "--test-emb",
            help="Embeddings of an evaluation/test set: pool images near it are removed (repeatable).",
        ),
    ] = None,
    index: Annotated[
        str,
        typer.Option(
            "--index",
            help="auto (exact up to 50k images, else IVF stored as float16 (a matrix-product join), SQ8 or PQ, "
            "whichever fits the memory), flat, ivf, ivfsq8 or ivfpq.",
        ),
    ] = "auto",
    nlist: Annotated[
        int | None,
        typer.Option("--nlist", min=1, help="IVF lists (default: ~2 sqrt(n) for ivf, ~4 sqrt(n) for SQ8/PQ)."),
    ] = None,
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", min=1, help="IVF lists probed per query (default 4).")
    ] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option("--memory-gb", min=0.001, help="Memory per process (default: half the RAM over its processes)."),
    ] = None,
    recall_queries: Annotated[
        int,
        typer.Option(
            "--recall-queries",
            min=0,
            help="Queries checked against exact search (approximate index): half from rows found duplicated.",
        ),
    ] = 1000,
) -> None:
    """De-duplicate a pool: keep one image per near-duplicate component, drop copies of test images (sharded over
    ranks under torchrun)."""
    import time

    from dinoforge.curate.dedup import dedup, measure_recall, near_reference, plan_index
    from dinoforge.curate.pipeline import write_manifest
    from dinoforge.curate.store import EmbeddingStore, dim
    from dinoforge.distributed import init_from_env, is_main_process
    from dinoforge.viz.montage import montage

    init_from_env()
    pool = EmbeddingStore.open(emb)
    if len(pool) == 0:
        raise DinoforgeError(f"pool {emb} has no embedded image")
    memory = None if memory_gb is None else int(memory_gb * 2**30)
    plan = plan_index(len(pool), dim(pool.shards), index, memory, nlist, nprobe)
    typer.echo(f"index: {plan.as_dict()}")
    t0 = time.perf_counter()
    res = dedup(pool.shards, threshold, plan)
    search_s = time.perf_counter() - t0
    keep = res.keep
    near = np.zeros(len(keep), bool)
    for t in test_emb or []:
        near |= near_reference(pool.shards, EmbeddingStore.open(t).shards, threshold)[0][keep]
    recall = None
    if plan.index != "flat" and recall_queries and is_main_process():
        recall = measure_recall(pool.shards, res.pairs, threshold, recall_queries)
    if not is_main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(
        out / "manifest.jsonl",
        [{"path": pool.paths[i], "step": "dedup", "source": "pool", "similarity": None} for i in keep[~near].tolist()],
    )
    first = {int(c): i for i, c in reversed(list(enumerate(res.component.tolist())))}
    write_manifest(
        out / "removed.jsonl",
        [
            {"path": pool.paths[i], "duplicate_of": pool.paths[first[int(res.component[i])]]}
            for i in res.removed.tolist()
        ],
    )
    groups: dict[int, list[str]] = {}
    for i in res.removed.tolist()[:200]:
        groups.setdefault(first[int(res.component[i])], []).append(pool.paths[i])
    montage(
        [[pool.paths[k0], *v[:7]] for k0, v in list(groups.items())[:16]],
        out / "duplicates.png",
        "kept image | removed near duplicates",
    )
    write_json(
        out / "dedup.json",
        {
            "images": len(pool),
            "pairs": len(res.pairs),
            "removed_duplicates": len(res.removed),
            "removed_near_test": int(near.sum()),
            "kept": int((~near).sum()),
            "threshold": threshold,
            "index": plan.as_dict(),
            "search_s": round(search_s, 3),
            "recall_vs_exact": recall if plan.index != "flat" else "exact search",
        },
    )
    typer.echo(f"kept {int((~near).sum())} of {len(pool)} images -> {out}")


@app.command("cluster")
def cluster_cmd(
    emb: EmbOpt,
    out: OutOpt,
    levels: Annotated[str, typer.Option("--levels", help="Clusters per level, e.g. 1000,100,10.")] = "100,10",
    niter: Annotated[int, typer.Option("--niter", min=1, help="Lloyd iterations per k-means.")] = 20,
    resample_steps: Annotated[str, typer.Option("--resample-steps", help="Resampling steps per level.")] = "0",
    sample_sizes: Annotated[
        str, typer.Option("--sample-sizes", help="Points per cluster in resampling, per level.")
    ] = "0",
    engine: Annotated[str, typer.Option("--engine", help="auto, faiss or lloyd (streaming/distributed).")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Hierarchical k-means with resampling over pool embeddings (distributed under torchrun)."""
    from dinoforge.curate.kmeans import hierarchical_kmeans
    from dinoforge.curate.sample import size_entropy
    from dinoforge.curate.store import EmbeddingStore
    from dinoforge.distributed import init_from_env
    from dinoforge.viz.montage import montage

    init_from_env()
    pool = EmbeddingStore.open(emb)
    ks = _ints(levels, "--levels")
    steps, sizes = _ints(resample_steps, "--resample-steps"), _ints(sample_sizes, "--sample-sizes")
    steps = steps * len(ks) if len(steps) == 1 else steps
    sizes = sizes * len(ks) if len(sizes) == 1 else sizes
    h = hierarchical_kmeans(pool.shards, ks, niter, steps, sizes, seed, engine)
    out.mkdir(parents=True, exist_ok=True)
    h.save(out / "hierarchy.npz")
    ids = h.point_clusters()
    leaf = ids[:, 0]
    rows = [[pool.paths[i] for i in np.nonzero(leaf == c)[0][:8]] for c in np.unique(leaf)[:6]]
    montage(rows, out / "clusters.png", "one level-0 cluster per row")
    write_json(
        out / "clusters.json",
        {
            "levels": ks,
            "inertia_level0": h.levels[0].inertia,
            "size_entropy": [size_entropy(ids[:, i]) for i in range(len(ks))],
        },
    )
    typer.echo(f"clustered {len(pool)} images into levels {ks} -> {out}")


@app.command("sample")
def sample_cmd(
    emb: EmbOpt,
    clusters: Annotated[Path, typer.Option("--clusters", "-c", help="Folder written by `curate cluster`.")],
    out: OutOpt,
    target_size: Annotated[int, typer.Option("--target-size", "-n", min=1, help="Images to keep.")],
    strategy: Annotated[str, typer.Option("--strategy", help="random or closest (to the centroid).")] = "random",
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Balanced hierarchical sampling of a clustered pool down to a target size."""
    from dinoforge.curate.kmeans import Hierarchy
    from dinoforge.curate.pipeline import write_manifest
    from dinoforge.curate.sample import balanced_sample, size_entropy
    from dinoforge.curate.store import EmbeddingStore
    from dinoforge.utils import require_file

    pool = EmbeddingStore.open(emb)
    h = Hierarchy.load(require_file(clusters / "hierarchy.npz", "cluster hierarchy"))
    if len(h.levels[0].assign) != len(pool):
        raise DinoforgeError(f"{clusters} clusters {len(h.levels[0].assign)} images but {emb} has {len(pool)}")
    picked = balanced_sample(h, target_size, strategy, seed)
    ids = h.point_clusters()
    write_manifest(
        out / "manifest.jsonl",
        [
            {
                "path": pool.paths[i],
                "step": "sample",
                "source": "pool",
                "similarity": None,
                "cluster": ids[i].tolist(),
            }
            for i in picked.tolist()
        ],
    )
    write_json(
        out / "sample.json",
        {
            "target_size": target_size,
            "picked": len(picked),
            "top_cluster_entropy_before": size_entropy(ids[:, -1]),
            "top_cluster_entropy_after": size_entropy(ids[picked, -1]),
        },
    )
    typer.echo(f"sampled {len(picked)} images -> {out}")


@app.command("retrieve")
def retrieve_cmd(
    pool_emb: Annotated[Path, typer.Option("--pool", help="Pool embedding folder.")],
    curated: Annotated[
        list[str], typer.Option("--curated", help="NAME=EMBEDDING_FOLDER of a curated source (repeatable).")
    ],
    out: OutOpt,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours per curated image (sample-based).")] = 4,
    m: Annotated[int, typer.Option("--m", min=1, help="Images per matched cluster (cluster-based).")] = 100,
    sample_min_size: Annotated[
        int,
        typer.Option("--sample-min-size", help="Sources with at least this many images use sample-based retrieval."),
    ] = 1_000_000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Retrieve pool images similar to curated sources (sample- or cluster-based by source size)."""
    from dinoforge.curate.pipeline import write_manifest
    from dinoforge.curate.retrieve import retrieve
    from dinoforge.curate.store import EmbeddingStore

    pool = EmbeddingStore.open(pool_emb)
    sources = {}
    for spec in curated:
        name, sep, folder = spec.partition("=")
        if not sep:
            raise DinoforgeError(f"--curated expects NAME=FOLDER, got {spec!r}")
        sources[name] = EmbeddingStore.open(folder).shards
    got = retrieve(pool.shards, sources, k, m, sample_min_size, seed=seed)
    recs = [
        {"path": pool.paths[row], "step": "retrieve", "source": name, "method": r.method, "similarity": s}
        for name, r in got.items()
        for row, s in zip(r.rows.tolist(), r.similarity.tolist(), strict=True)
    ]
    write_manifest(out / "manifest.jsonl", recs)
    write_json(out / "retrieve.json", {n: {"method": r.method, "images": len(r.rows)} for n, r in got.items()})
    typer.echo(f"retrieved {len(recs)} images -> {out}")


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="Curation YAML (see configs/curate_default.yaml).")],
    out: OutOpt,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. sample.target_size=500")
    ] = None,
    shards: Annotated[
        bool, typer.Option("--shards", help="Also pack the kept images into tar shards in OUT/shards (see data pack).")
    ] = False,
    max_images: MaxImagesOpt = 10000,
    max_mb: MaxMbOpt = 1000.0,
) -> None:
    """Run the whole pipeline from one config: manifest.jsonl (for `dinoforge train --data`) + report, and with
    --shards the kept set as tar shards (OUT/shards/pack.json names their pattern)."""
    from dinoforge.curate.config import load_config
    from dinoforge.curate.pipeline import run_pipeline
    from dinoforge.distributed import init_from_env, is_main_process
    from dinoforge.viz.montage import montage

    init_from_env()
    report = run_pipeline(load_config(config, overrides), out, draw=montage)
    typer.echo(f"manifest with {report['manifest_images']} images: {out / 'manifest.jsonl'}")
    if shards and is_main_process():
        pack_to(str(out / "manifest.jsonl"), out / "shards", max_images, max_mb)
