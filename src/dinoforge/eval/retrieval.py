"""Instance retrieval: revisited Oxford/Paris mAP (Easy/Medium/Hard) and generic retrieval on labelled images.

Ground truth: the official revisitop file (`gnd_roxford5k.pkl`, `gnd_rparis6k.pkl`), or the same data as
plain JSON. The official pickle is a dict with `imlist` (database image names without extension), `qimlist`
(query names) and `gnd` (per query: `bbx` [x1, y1, x2, y2] and `easy`/`hard`/`junk` database indices); its
images are `<images>/<name>.jpg`. The JSON form::

    {"query": ["q0.jpg", ...],           # query image paths, relative to the images root
     "db":    ["d0.jpg", ...],           # database image paths, relative to the images root
     "gnd":   [{"easy": [0, 5], "hard": [7], "junk": [2], "bbx": [10, 20, 300, 400]}, ...]}

Each query with a `bbx` (optional in JSON) is cropped to that box of the original image before the eval
transform, as revisitop does (`img.crop(bbx)`); database images are not cropped.

Protocols (Radenović et al., CVPR 2018): Easy ranks easy positives and ignores hard + junk; Medium ranks
easy + hard positives and ignores junk; Hard ranks hard positives and ignores easy + junk. Ignored images
are removed from the ranking before AP is computed; queries with no positive are skipped. AP uses the
revisitop trapezoidal rule: sum over positives j (0-based, at rank r after removal) of
(j / r + (j + 1) / (r + 1)) / 2 / n_positives, with j / r taken as 1 when r = 0.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoforge.data.datasets import skipped_summary
from dinoforge.eval.features import labelled_features, path_list_features
from dinoforge.utils import DinoforgeError, read_json, require_file, write_json

PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def rank_database(query_feats: torch.Tensor, db_feats: torch.Tensor, chunk_size: int = 1024) -> np.ndarray:
    """Database indices sorted by decreasing cosine similarity, one row per query."""
    db = F.normalize(db_feats.float(), dim=1)
    rows = []
    for start in range(0, len(query_feats), chunk_size):
        q = F.normalize(query_feats[start : start + chunk_size].float(), dim=1)
        rows.append(torch.argsort(q @ db.T, dim=1, descending=True, stable=True).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, len(db_feats)), dtype=np.int64)


def revisitop_ap(ranking: np.ndarray, positives: Sequence[int], junk: Sequence[int]) -> float:
    """Average precision of one ranked database list, positives scored, junk removed (trapezoidal rule)."""
    pos = np.isin(ranking, np.asarray(positives, dtype=np.int64))
    keep = ~np.isin(ranking, np.asarray(junk, dtype=np.int64))
    ranks = np.flatnonzero(pos[keep])
    n = len(positives)
    j = np.arange(len(ranks))
    prec0 = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    prec1 = (j + 1) / (ranks + 1)
    return float(((prec0 + prec1) / 2).sum() / n)


def revisitop_map(
    ranks: np.ndarray, gnd: Sequence[dict], protocols: Sequence[str] = ("easy", "medium", "hard")
) -> dict:
    """mAP (percent) and per-query AP under each revisited protocol; queries without positives are skipped."""
    if len(ranks) != len(gnd):
        raise DinoforgeError(f"{len(ranks)} ranked queries but {len(gnd)} ground-truth entries")
    out = {}
    for name in protocols:
        ok_keys, junk_keys = PROTOCOLS[name]
        aps = []
        for row, g in zip(ranks, gnd, strict=True):
            ok = [i for key in ok_keys for i in g.get(key, [])]
            if not ok:
                aps.append(None)
                continue
            aps.append(revisitop_ap(row, ok, [i for key in junk_keys for i in g.get(key, [])]))
        valid = [a for a in aps if a is not None]
        out[name] = {"mAP": 100.0 * float(np.mean(valid)) if valid else float("nan"), "ap": aps}
    return out


def _ranked_rows(feats: torch.Tensor, chunk_size: int = 256):
    """(query index, database ranking) for every row of `feats` against all rows, a chunk at a time."""
    for start in range(0, len(feats), chunk_size):
        ranks = rank_database(feats[start : start + chunk_size], feats, chunk_size)
        yield from enumerate(ranks, start)


def labelled_retrieval(feats: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Each image queries all others: mAP (standard AP), recall@k (a same-label image in the top k), %."""
    labels = labels.cpu().numpy()
    aps, hits = [], {k: [] for k in ks}
    for i, row in _ranked_rows(feats):
        row = row[row != i]
        rel = labels[row] == labels[i]
        if not rel.any():
            continue
        cum = np.cumsum(rel)
        aps.append(float((cum[rel] / (np.flatnonzero(rel) + 1)).mean()))
        for k in ks:
            hits[k].append(bool(rel[:k].any()))
    if not aps:
        raise DinoforgeError("no query has another image with the same label")
    res = {"mAP": 100.0 * float(np.mean(aps)), "n_queries": len(aps)}
    res.update({f"recall@{k}": 100.0 * float(np.mean(hits[k])) for k in ks})
    return res


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) and math.isfinite(x)


def _as_list(x: Any) -> Any:
    """numpy arrays (as the official pickles may hold) as lists; anything else unchanged."""
    return x.tolist() if isinstance(x, np.ndarray) else x


def _read_official_pickle(p: Path) -> dict:
    """The revisitop `gnd_*.pkl` layout (imlist, qimlist, gnd) in this module's JSON form, names + `.jpg`."""
    try:
        with open(p, "rb") as f:
            raw = pickle.load(f)  # the user's own file: pickle is for trusted files only
    except Exception as e:  # any unpickling failure: one line naming the file
        raise DinoforgeError(f"{p}: cannot read the ground-truth pickle: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise DinoforgeError(f"{p}: the ground-truth pickle must hold a dict with imlist, qimlist, gnd")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in raw:
            raise DinoforgeError(f"{p}: missing key {key!r} (expected imlist, qimlist, gnd)")
    names = {}
    for key in ("imlist", "qimlist"):
        value = _as_list(raw[key])
        if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
            raise DinoforgeError(f"{p}: {key!r} must be a list of image names (strings)")
        names[key] = [f"{x}.jpg" for x in value]
    gnd = _as_list(raw["gnd"])
    if isinstance(gnd, list | tuple):
        gnd = [{k: _as_list(v) for k, v in g.items()} if isinstance(g, dict) else g for g in gnd]
    return {"query": names["qimlist"], "db": names["imlist"], "gnd": gnd}


def load_ground_truth(path: str | Path) -> dict:
    """Read and check a ground truth, normalised to the JSON form of this module's docstring: the official
    revisitop `.pkl` (read with `pickle`, which runs code from the file: use it for trusted files only, such as
    the published gnd_roxford5k.pkl / gnd_rparis6k.pkl) or JSON. Any defect is a one-line DinoforgeError naming
    the file and the problem."""
    p = require_file(path, "ground-truth file")
    if p.suffix.lower() in (".pkl", ".pickle"):
        data = _read_official_pickle(p)
    else:
        data = read_json(p, "ground-truth file")
        if not isinstance(data, dict):
            raise DinoforgeError(f"{path}: the ground truth must be a JSON object with query, db, gnd")
        for key in ("query", "db", "gnd"):
            if key not in data:
                raise DinoforgeError(f"{path}: missing key {key!r} (expected query, db, gnd)")
    for key in ("query", "db"):
        if not isinstance(data[key], list) or not all(isinstance(x, str) for x in data[key]):
            raise DinoforgeError(f"{path}: {key!r} must be a list of image paths (strings)")
    if not isinstance(data["gnd"], list | tuple):
        raise DinoforgeError(f"{path}: 'gnd' must be a list with one entry per query")
    if len(data["gnd"]) != len(data["query"]):
        raise DinoforgeError(f"{path}: {len(data['query'])} queries but {len(data['gnd'])} gnd entries")
    n_db = len(data["db"])
    gnd = []
    for q, g in enumerate(data["gnd"]):
        if not isinstance(g, dict):
            raise DinoforgeError(f"{path}: gnd entry {q} must be an object with easy/hard/junk index lists")
        entry: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            idx = g.get(key, [])
            if not isinstance(idx, list | tuple) or not all(_is_int(i) for i in idx):
                raise DinoforgeError(f"{path}: query {q} {key!r} must be a list of integer database indices")
            bad = [int(i) for i in idx if not 0 <= i < n_db]
            if bad:
                raise DinoforgeError(f"{path}: query {q} {key} indices out of range: {bad[:5]}")
            entry[key] = [int(i) for i in idx]
        box = g.get("bbx")
        if box is not None:
            if not isinstance(box, list | tuple) or len(box) != 4 or not all(_is_number(x) for x in box):
                raise DinoforgeError(f"{path}: query {q} 'bbx' must be 4 numbers [x1, y1, x2, y2], got {box!r}")
            box = [float(x) for x in box]
            if not (box[0] < box[2] and box[1] < box[3]):
                raise DinoforgeError(f"{path}: query {q} 'bbx' {box} is empty (need x1 < x2 and y1 < y2)")
            entry["bbx"] = box
        gnd.append(entry)
    return {"query": list(data["query"]), "db": list(data["db"]), "gnd": gnd}


def ground_truth_images(gnd: Path, images: Path | None = None) -> tuple[dict, list[list[Path]]]:
    """A ground-truth file (checked) and its query and database image paths under `images` (default: the
    file's folder); a missing image is an error."""
    gt = load_ground_truth(gnd)
    root = require_file(images or Path(gnd).parent, "images folder")
    path_lists = [[root / p for p in gt["query"]], [root / p for p in gt["db"]]]
    missing = [str(p) for paths in path_lists for p in paths if not Path(p).is_file()]
    if missing:
        raise DinoforgeError(f"{len(missing)} image(s) not found, e.g. {missing[0]}")
    return gt, path_lists


def run_revisitop_eval(
    net: torch.nn.Module,
    fingerprint: str,
    gt: dict,
    path_lists: list[list[Path]],
    out: Path,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
) -> dict:
    """Easy/Medium/Hard mAP of a backbone's CLS features on a ground truth and its (query, database) image
    paths (`ground_truth_images`), each query cropped to its `bbx` when it has one; writes metrics.json into
    `out` and returns the metrics."""
    query_boxes = [g.get("bbx") for g in gt["gnd"]]
    boxes = [query_boxes if any(b is not None for b in query_boxes) else None, None]
    q, db = path_list_features(net, fingerprint, path_lists, out, batch_size, image_size, use_cache, boxes)
    metrics = revisitop_map(rank_database(torch.from_numpy(q), torch.from_numpy(db)), gt["gnd"])
    summary = {k: v["mAP"] for k, v in metrics.items()}
    metrics = {"protocols": metrics, "mAP": summary, "n_queries": len(gt["query"]), "n_db": len(gt["db"])}
    write_json(Path(out) / "metrics.json", metrics)
    return metrics


def run_labelled_retrieval_eval(
    net: torch.nn.Module,
    fingerprint: str,
    data: str,
    out: Path,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
) -> dict:
    """mAP and recall@k of a backbone's CLS features on labelled data, every image querying the others;
    writes metrics.json into `out` and returns the metrics."""
    (feats,) = labelled_features(net, fingerprint, [data], out, batch_size, image_size, use_cache)
    metrics = labelled_retrieval(torch.from_numpy(feats["cls"][:, -1]), torch.from_numpy(feats["labels"]))
    metrics.update(data=data, **skipped_summary(feats["skipped_names"]))
    write_json(Path(out) / "metrics.json", metrics)
    return metrics
