"""Retrieval metrics: revisited-protocol AP with junk vs hand-worked cases, labelled retrieval vs sklearn."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from dinoforge.eval.retrieval import (
    labelled_retrieval,
    load_ground_truth,
    rank_database,
    revisitop_ap,
    revisitop_map,
)
from dinoforge.utils import DinoforgeError


def test_ap_with_junk_hand_worked():
    # ranking 3,0,2,1,4; positives {0,4}; junk {2} -> list 3,0,1,4: positives at ranks 1 and 3.
    # AP = [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = (1/4 + 5/12) / 2 = 1/3
    assert revisitop_ap(np.array([3, 0, 2, 1, 4]), [0, 4], [2]) == pytest.approx(1 / 3)
    # perfect ranking gives 1; a positive that is never retrieved still counts in the denominator
    assert revisitop_ap(np.array([0, 1, 2]), [0, 1], []) == pytest.approx(1.0)
    assert revisitop_ap(np.array([0, 1]), [0, 9], []) == pytest.approx(0.5)


def test_protocols_hand_worked():
    ranks = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    gnd = [{"easy": [1], "hard": [3], "junk": [0]}, {"easy": [0], "hard": [], "junk": []}]
    res = revisitop_map(ranks, gnd)
    # query 0 -- easy: list 1,2,4,5 -> AP 1. medium: list 1,2,3,4,5 -> (1 + (1/2 + 2/3)/2)/2 = 19/24.
    # hard: list 2,3,4,5 -> (0 + 1/2)/2 = 1/4.  query 1 -- easy/medium: positive last of 6 -> (0/5 + 1/6)/2.
    q1 = (0 / 5 + 1 / 6) / 2
    assert res["easy"]["ap"] == pytest.approx([1.0, q1])
    assert res["medium"]["ap"] == pytest.approx([19 / 24, q1])
    assert res["hard"]["ap"][0] == pytest.approx(0.25)
    assert res["hard"]["ap"][1] is None  # no hard positive: skipped
    assert res["hard"]["mAP"] == pytest.approx(25.0)
    assert res["easy"]["mAP"] == pytest.approx(100 * (1 + q1) / 2)


def test_rank_database_cosine_order():
    db = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[10.0, 1.0]])
    assert rank_database(q, db).tolist() == [[0, 2, 1]]


def test_labelled_retrieval_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (60,), generator=g)
    feats = torch.randn(4, 8, generator=g)[labels] + 1.5 * torch.randn(60, 8, generator=g)
    res = labelled_retrieval(feats, labels, ks=(1, 5))
    x = torch.nn.functional.normalize(feats, dim=1).numpy()
    sims = x @ x.T
    aps, r1, r5 = [], [], []
    for i in range(60):
        others = np.arange(60) != i
        y = (labels.numpy()[others] == labels[i].item()).astype(int)
        s = sims[i, others]
        aps.append(average_precision_score(y, s))
        order = np.argsort(-s)
        r1.append(y[order[:1]].any())
        r5.append(y[order[:5]].any())
    assert res["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-6)
    assert res["recall@1"] == pytest.approx(100 * np.mean(r1))
    assert res["recall@5"] == pytest.approx(100 * np.mean(r5))


def test_separable_and_random():
    labels = torch.arange(5).repeat_interleave(10)
    feats = torch.eye(5)[labels] + 0.01 * torch.randn(50, 5)
    assert labelled_retrieval(feats, labels)["mAP"] == pytest.approx(100.0)
    rnd = labelled_retrieval(torch.randn(400, 32), torch.randint(0, 4, (400,)))
    assert 20 < rnd["mAP"] < 32  # chance: about a quarter of the others are relevant


def test_ground_truth_validation(tmp_path):
    good = {"query": ["a.png"], "db": ["b.png", "c.png"], "gnd": [{"easy": [0], "hard": [], "junk": [1]}]}
    (tmp_path / "gt.json").write_text(json.dumps(good))
    assert load_ground_truth(tmp_path / "gt.json")["db"] == ["b.png", "c.png"]
    bad = dict(good, gnd=[{"easy": [2]}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DinoforgeError, match="out of range"):
        load_ground_truth(tmp_path / "bad.json")


def test_retrieval_command_with_ground_truth(tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from dinoforge.cli import app
    from dinoforge.models.vision_transformer import DinoVisionTransformer
    from dinoforge.models.weights import save_backbone

    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, block_chunks=0)
    w = save_backbone(net, tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    bases = [rng.integers(0, 255, (32, 32, 3)) for _ in range(2)]
    names = []
    for i in range(6):  # db: 3 noisy copies of each of two base images
        arr = np.clip(bases[i % 2] + rng.normal(0, 5, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(imgs / f"d{i}.png")
        names.append(f"d{i}.png")
    for q in range(2):
        Image.fromarray(bases[q].astype(np.uint8)).save(imgs / f"q{q}.png")
    gt = {
        "query": ["q0.png", "q1.png"],
        "db": names,
        "gnd": [{"easy": [0, 2], "hard": [4], "junk": []}, {"easy": [1], "hard": [3], "junk": [5]}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    args = ["eval", "retrieval", "-w", str(w), "--gnd", str(tmp_path / "gt.json"), "--images", str(imgs)]
    r = CliRunner().invoke(app, [*args, "--out", str(out), "--image-size", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert str(out) in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["mAP"]) == {"easy", "medium", "hard"}
    # near-duplicates of the query rank first even with a random backbone
    assert m["mAP"]["medium"] == pytest.approx(100.0)


def _write_pkl(path, data):
    import pickle

    path.write_bytes(pickle.dumps(data))
    return path


def _revisitop_compute_map(ranks, gnd):
    """The revisitop reference (cirtorch/revisitop `compute_map`, `compute_ap`) transcribed: `ranks` is db × query."""
    aps = []
    for i, g in enumerate(gnd):
        qgnd, qgndj = np.array(g["ok"]), np.array(g["junk"])
        if qgnd.shape[0] == 0:
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij, ip = 0, 0, 0
        if len(junk):
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            ap += (p0 + (j + 1) / (rank + 1)) / len(qgnd) / 2
        aps.append(ap)
    return 100 * float(np.mean(aps))


def test_official_pickle_map_hand_worked(tmp_path):
    gnd = [
        {"bbx": [1.0, 2.0, 30.5, 40.0], "easy": [0, 2], "hard": [1], "junk": [5]},
        {"bbx": [0, 0, 10, 10], "easy": [1], "hard": [], "junk": []},
        {"bbx": [3, 3, 9, 9], "easy": [], "hard": [4, 0], "junk": [6]},
    ]
    data = {"imlist": [f"db{i}" for i in range(8)], "qimlist": ["qa", "qb", "qc"], "gnd": gnd}
    gt = load_ground_truth(_write_pkl(tmp_path / "gnd_rtest.pkl", data))
    assert gt["query"] == ["qa.jpg", "qb.jpg", "qc.jpg"] and gt["db"][7] == "db7.jpg"
    assert gt["gnd"][0]["bbx"] == [1.0, 2.0, 30.5, 40.0] and gt["gnd"][2]["hard"] == [4, 0]
    ranks = np.array([[3, 0, 5, 1, 7, 2, 6, 4], [1, 2, 3, 4, 5, 6, 7, 0], [7, 6, 5, 4, 3, 2, 1, 0]])
    res = revisitop_map(ranks, gt["gnd"])
    # AP = sum over positives j (0-based) at rank r after junk removal of (j/r [1 if r=0] + (j+1)/(r+1)) / 2 / n.
    # q0  easy: pos {0,2}, junk {5,1} -> 3,0,7,2,6,4: ranks 1,3 -> [(0+1/2)/2 + (1/3+2/4)/2]/2 = (1/4+5/12)/2 = 1/3
    #     medium: pos {0,2,1}, junk {5} -> 3,0,1,7,2,6,4: ranks 1,2,4
    #             -> [(0+1/2)/2 + (1/2+2/3)/2 + (2/4+3/5)/2]/3 = (15/60 + 35/60 + 33/60)/3 = 83/180
    #     hard: pos {1}, junk {5,0,2} -> 3,1,7,6,4: rank 1 -> (0+1/2)/2 = 1/4
    # q1  easy = medium: pos {1} first -> (1+1)/2 = 1; hard: no positive, skipped
    # q2  easy: no positive, skipped; medium = hard: pos {4,0}, junk {6} -> 7,5,4,3,2,1,0: ranks 2,6
    #             -> [(0+1/3)/2 + (1/6+2/7)/2]/2 = (1/6 + 19/84)/2 = 11/56
    assert res["easy"]["ap"] == pytest.approx([1 / 3, 1.0, None])
    assert res["medium"]["ap"] == pytest.approx([83 / 180, 1.0, 11 / 56])
    assert res["hard"]["ap"] == pytest.approx([1 / 4, None, 11 / 56])
    assert res["easy"]["mAP"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert res["medium"]["mAP"] == pytest.approx(100 * (83 / 180 + 1 + 11 / 56) / 3)
    assert res["hard"]["mAP"] == pytest.approx(100 * (1 / 4 + 11 / 56) / 2)
    # and the revisitop reference computation agrees on every protocol
    for name, ok, junk in [("easy", ["easy"], ["junk", "hard"]), ("medium", ["easy", "hard"], ["junk"])]:
        ref = [{"ok": sum((g[k] for k in ok), []), "junk": sum((g[k] for k in junk), [])} for g in gnd]
        assert res[name]["mAP"] == pytest.approx(_revisitop_compute_map(ranks.T, ref))
    ref = [{"ok": g["hard"], "junk": g["junk"] + g["easy"]} for g in gnd]
    assert res["hard"]["mAP"] == pytest.approx(_revisitop_compute_map(ranks.T, ref))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"qimlist": None}, "missing key 'qimlist'"),
        ({"gnd": []}, "1 queries but 0 gnd entries"),
        ({"gnd": [{"bbx": [0, 0, 5], "easy": [0], "hard": [], "junk": []}]}, "'bbx' must be 4 numbers"),
    ],
)
def test_malformed_pickle_is_one_line(tmp_path, change, problem):
    data = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 5, 5], "easy": [0], "hard": [], "junk": []}]}
    data = {k: v for k, v in {**data, **change}.items() if v is not None}
    p = _write_pkl(tmp_path / "gnd.pkl", data)
    with pytest.raises(DinoforgeError, match=problem) as e:
        load_ground_truth(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _tiny_net():
    from dinoforge.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, block_chunks=0)


def test_query_box_crops_before_the_transform(tmp_path, monkeypatch):
    from PIL import Image

    from dinoforge.eval.features import path_list_features

    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    net = _tiny_net()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(tmp_path / "q.jpg")
    box = [5.0, 7.0, 37.0, 41.0]
    with Image.open(tmp_path / "q.jpg") as im:
        im.convert("RGB").crop(tuple(box)).save(tmp_path / "manual.png")  # lossless: the same pixels
    lists = [[tmp_path / "q.jpg"], [tmp_path / "manual.png", tmp_path / "q.jpg"]]
    q, db = path_list_features(net, "tiny", lists, tmp_path / "out", 8, 32, True, boxes=[[box], None])
    assert np.allclose(q[0], db[0], atol=1e-6)  # the query is cropped ...
    assert not np.allclose(q[0], db[1], atol=1e-3)  # ... and the database image is not
    (q_full,) = path_list_features(net, "tiny", lists[:1], tmp_path / "out", 8, 32, True)
    assert np.allclose(q_full[0], db[1], atol=1e-6)  # no box, no crop (and not the cropped cache entry)


def test_retrieval_command_with_official_pickle(tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from dinoforge.cli import app
    from dinoforge.models.weights import save_backbone

    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    w = save_backbone(_tiny_net(), tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(1)
    imgs = tmp_path / "jpg"
    imgs.mkdir()
    full = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full.save(imgs / "q.jpg", quality=95)
    box = [8.0, 16.0, 40.0, 48.0]
    with Image.open(imgs / "q.jpg") as im:
        im.convert("RGB").crop(tuple(box)).save(imgs / "crop.jpg", quality=95)
    full.save(imgs / "whole.jpg", quality=95)
    # the database holds the query's box (the positive) and the whole query image: only a cropped query
    # ranks the box first; an uncropped one finds its own image first (AP 1/4)
    data = {"imlist": ["crop", "whole"], "qimlist": ["q"], "gnd": [{"bbx": box, "easy": [0], "hard": [], "junk": []}]}
    gnd = _write_pkl(tmp_path / "gnd_rtest.pkl", data)
    out = tmp_path / "out"
    args = ["eval", "retrieval", "-w", str(w), "--gnd", str(gnd), "--images", str(imgs), "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--image-size", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["mAP"]["easy"] == pytest.approx(100.0)
    assert m["n_queries"] == 1 and m["n_db"] == 2
