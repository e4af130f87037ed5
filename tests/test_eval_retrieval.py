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
