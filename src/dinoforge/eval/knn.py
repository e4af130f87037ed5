"""k-NN classification on frozen features: cosine similarity, temperature-weighted vote (DINOv2 §7).

The vote follows the official protocol: the `max(ks)` nearest train features (cosine on L2-normalised
features) vote for their class with weight exp(sim / T); the first k of them give the scores for k.
Work is chunked over test and train rows so memory stays bounded (1M train features fit), and under
torch.distributed each rank holds a shard of the train features: local top-k, all_gather, merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinoforge import distributed as dist_utils
from dinoforge.data.datasets import skipped_summary
from dinoforge.eval.features import labelled_features
from dinoforge.utils import DinoforgeError, write_json


def _merge_topk(
    sims: torch.Tensor, labels: torch.Tensor, new_sims: torch.Tensor, new_labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest similarities (and their labels) out of two candidate sets."""
    all_sims = torch.cat([sims, new_sims], dim=1)
    all_labels = torch.cat([labels, new_labels], dim=1)
    top, idx = all_sims.topk(min(k, all_sims.shape[1]), dim=1, largest=True, sorted=True)
    return top, all_labels.gather(1, idx)


def knn_neighbours(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    train_chunk: int = 65536,
    distributed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and neighbour labels of test rows among (this rank's) train rows.

    Features are L2-normalised here. Train rows are scanned in chunks of `train_chunk` and merged;
    when `distributed` (default: torch.distributed is initialised with >1 rank) the per-rank top-k
    lists are all-gathered and merged, so every rank gets the global answer for its test rows.
    """
    q = F.normalize(test_feats.float(), dim=1)
    device = q.device
    sims = torch.empty(len(q), 0, device=device)
    labels = torch.empty(len(q), 0, dtype=torch.long, device=device)
    for start in range(0, len(train_feats), train_chunk):
        t = F.normalize(train_feats[start : start + train_chunk].to(device).float(), dim=1)
        s = q @ t.T
        top, idx = s.topk(min(k, s.shape[1]), dim=1, largest=True, sorted=True)
        lab = train_labels[start : start + train_chunk].to(device).long()[idx]
        sims, labels = _merge_topk(sims, labels, top, lab, k)
    if distributed is None:
        distributed = dist_utils.world_size() > 1
    if distributed:
        sims, labels = _gather_merge(sims, labels, k)
    return sims, labels


def _gather_merge(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's local top-k (padded to k with -inf) and keep the global top-k."""
    pad = k - sims.shape[1]
    if pad > 0:
        sims = F.pad(sims, (0, pad), value=float("-inf"))
        labels = F.pad(labels, (0, pad), value=0)
    world = dist_utils.world_size()
    all_sims = [torch.empty_like(sims) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_sims, sims.contiguous())
    dist.all_gather(all_labels, labels.contiguous())
    return _merge_topk(torch.cat(all_sims, 1), torch.cat(all_labels, 1), sims[:, :0], labels[:, :0], k)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    T: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 4096,
    train_chunk: int = 65536,
    distributed: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Class scores (test × classes, each row sums to 1 over the max(ks) vote) for every k in `ks`.

    Scores for k are sum over the k nearest neighbours of softmax(sims / T) one-hot labels, computed on
    chunks of `chunk_size` test rows (and `train_chunk` train rows) so memory stays bounded.
    """
    if len(train_feats) == 0:
        raise DinoforgeError("k-NN needs at least one train feature")
    if num_classes is None:
        n_local = int(train_labels.max()) + 1
        if distributed or (distributed is None and dist_utils.is_enabled()):
            t = torch.tensor([n_local], device=train_labels.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n_local = int(t)
        num_classes = n_local
    max_k = max(ks)
    out = {k: torch.empty(len(test_feats), num_classes) for k in ks}
    for start in range(0, len(test_feats), chunk_size):
        sims, labels = knn_neighbours(
            train_feats, train_labels, test_feats[start : start + chunk_size], max_k, train_chunk, distributed
        )
        weights = torch.softmax(sims / T, dim=1)
        for k in ks:
            scores = torch.zeros(len(sims), num_classes, device=sims.device)
            scores.scatter_add_(1, labels[:, :k], weights[:, :k])
            out[k][start : start + len(sims)] = scores.cpu()
    return out


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (k clipped to the number of classes)."""
    labels = labels.to(scores.device).long()
    res = {}
    for k in topk:
        pred = scores.topk(min(k, scores.shape[1]), dim=1).indices
        res[f"top{k}"] = 100.0 * (pred == labels[:, None]).any(dim=1).float().mean().item()
    return res


def few_shot_indices(labels: torch.Tensor, n_per_class: int, seed: int) -> torch.Tensor:
    """Indices of `n_per_class` random rows per class (all of a smaller class), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picks = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:n_per_class]])
    return torch.cat(picks).sort().values


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    T: float = 0.07,
    n_per_class: Sequence[int] = (),
    n_tries: int = 1,
    chunk_size: int = 4096,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Top-1/top-5 for every k on the full train set and on few-shot subsets (mean and per-seed).

    With `shard=(rank, world)` under torch.distributed the full-set vote uses this rank's slice of the
    train rows and merges the top-k across ranks; few-shot subsets are small and run locally."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    result: dict = {"full": {}}
    rows = torch.arange(len(train_feats))
    if shard is not None:
        rows = rows.tensor_split(shard[1])[shard[0]]
    scores = knn_classify(
        train_feats[rows],
        train_labels[rows],
        test_feats,
        ks,
        T,
        num_classes,
        chunk_size,
        distributed=shard is not None,
    )
    for k in ks:
        result["full"][f"k={k}"] = topk_accuracy(scores[k], test_labels)
    for npc in n_per_class:
        k_list = sorted({k for k in ks if k <= npc} | {npc})
        tries = []
        for seed in range(n_tries):
            sub = few_shot_indices(train_labels, npc, seed)
            s = knn_classify(
                train_feats[sub],
                train_labels[sub],
                test_feats,
                k_list,
                T,
                num_classes,
                chunk_size,
                distributed=False,
            )
            tries.append({f"k={k}": topk_accuracy(s[k], test_labels) for k in k_list})
        mean = {kk: {m: sum(t[kk][m] for t in tries) / len(tries) for m in tries[0][kk]} for kk in tries[0]}
        result[f"{npc}_per_class"] = {"mean": mean, "tries": tries}
    return result


def torchrun_shard(device: str) -> tuple[int, int] | None:
    """(rank, world) under torchrun (WORLD_SIZE > 1), starting the process group if needed; else None."""
    if dist_utils.launched_world_size() <= 1:
        return None
    dist_utils.init_from_env(device)
    return dist_utils.rank(), dist_utils.world_size()


def run_knn_eval(
    net: torch.nn.Module,
    fingerprint: str,
    train_data: str,
    val_data: str,
    out: Path,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_per_class: Sequence[int] = (),
    n_tries: int = 1,
    image_size: int | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict | None:
    """k-NN evaluation of a backbone, train → val data specs; writes metrics.json into `out` and returns the
    metrics. Under torchrun (`shard=(rank, world)`) rank 0 extracts the features first, every rank votes with
    its slice of the train features, and only rank 0 writes and returns the metrics (the others None)."""
    if shard is not None and shard[0] != 0:
        dist.barrier()  # rank 0 extracts (or loads) the features first; the others then read its cache
    tr, te = labelled_features(net, fingerprint, [train_data, val_data], out, batch_size, image_size, use_cache)
    if shard is not None and shard[0] == 0:
        dist.barrier()
    metrics = knn_evaluate(
        torch.from_numpy(tr["cls"][:, -1]),
        torch.from_numpy(tr["labels"]),
        torch.from_numpy(te["cls"][:, -1]),
        torch.from_numpy(te["labels"]),
        ks=ks,
        T=temperature,
        n_per_class=n_per_class,
        n_tries=n_tries,
        shard=shard,
    )
    if shard is not None and shard[0] != 0:
        return None
    metrics.update(
        train_data=train_data,
        val_data=val_data,
        temperature=temperature,
        n_train=len(tr["labels"]),
        n_test=len(te["labels"]),
        **skipped_summary(tr["skipped_names"] + te["skipped_names"]),
    )
    write_json(Path(out) / "metrics.json", metrics)
    return metrics


def backbone_knn_top1(
    backbone: torch.nn.Module,
    train_spec: str = "bundled:train",
    val_spec: str = "bundled:val",
    k: int = 20,
    T: float = 0.07,
    batch_size: int = 256,
    image_size: int | None = None,
) -> dict[str, float]:
    """k-NN top-1 (%) of a backbone, train → val, on CLS features ("cls") and on CLS ⊕ mean patch token, each
    L2-normalised ("cls+avgpool"), from one feature pass. Used by the demo and by periodic evaluation, which
    pass the training's global crop size as `image_size` (the bundled set is drawn on a canvas of that size)."""
    from dinoforge.eval.features import dataset_features

    tr, va = (
        dataset_features(backbone, "", spec, batch_size, image_size, use_cache=False, split=split)
        for spec, split in ((train_spec, "train"), (val_spec, "val"))
    )
    out = {}
    for name in ("cls", "cls+avgpool"):
        x_tr, x_va = (F.normalize(torch.from_numpy(f["cls"][:, -1]).float(), dim=-1) for f in (tr, va))
        if name == "cls+avgpool":
            x_tr, x_va = (
                torch.cat([x, F.normalize(torch.from_numpy(f["patch_avg"]).float(), dim=-1)], dim=1)
                for x, f in ((x_tr, tr), (x_va, va))
            )
        res = knn_evaluate(
            x_tr, torch.from_numpy(tr["labels"]).long(), x_va, torch.from_numpy(va["labels"]).long(), (k,), T
        )
        out[name] = res["full"][f"k={k}"]["top1"]
    return out


def knn_callback(
    train_spec: str, val_spec: str, k: int = 20, image_size: int | None = None
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A periodic-evaluation callback for training: k-NN top-1 (%) of a backbone as `knn_top1_<features>`."""

    def evaluate(backbone: torch.nn.Module) -> dict[str, float]:
        top1 = backbone_knn_top1(backbone, train_spec, val_spec, k=k, image_size=image_size)
        return {f"knn_top1_{name}": v for name, v in top1.items()}

    return evaluate
