"""Cached multi-layer features: values vs a direct forward, cache hits do not recompute, key sensitivity."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dinoforge.data.datasets import build_dataset
from dinoforge.data.transforms import normalize_transform
from dinoforge.eval import features as F
from dinoforge.features import extract_features
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weights import save_backbone


def _tiny(seed=0):
    torch.manual_seed(seed)
    return DinoVisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, init_values=1.0, block_chunks=0
    ).eval()


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))


def test_multilayer_features_match_direct_forward():
    model = _tiny()
    ds = build_dataset("bundled:val", transform=normalize_transform(), size=32)
    sub = torch.utils.data.Subset(ds, range(10))
    feats = extract_features(model, sub, batch_size=4, layers=2, patch_mean=True)
    assert feats["cls"].shape == (10, 2, 64)
    x = torch.stack([ds[i][0] for i in range(10)])
    with torch.no_grad():
        out = model.forward_features(x)
        block0 = model.norm(model.blocks[0](model.prepare_tokens_with_masks(x)))
    np.testing.assert_allclose(feats["cls"][:, -1], out["x_norm_clstoken"].numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["patch_avg"], out["x_norm_patchtokens"].mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["cls"][:, 0], block0[:, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(feats["labels"], ds.labels[:10])
    np.testing.assert_array_equal(feats["indices"], np.arange(10))


def test_cache_hit_does_not_recompute(tmp_path):
    calls = []

    def compute(n_blocks):
        def run():
            calls.append(n_blocks)
            return {
                "cls": np.random.rand(5, n_blocks, 3).astype(np.float32),
                "patch_avg": np.random.rand(5, 3).astype(np.float32),
                "labels": np.arange(5),
                "indices": np.arange(5),
            }

        return run

    first = F.cached("k1", compute(4), n_last_blocks=4)
    second = F.cached("k1", compute(4), n_last_blocks=4)
    one_block = F.cached("k1", compute(1), n_last_blocks=1)  # served from the 4-block entry
    assert calls == [4]
    np.testing.assert_array_equal(first["cls"], second["cls"])
    np.testing.assert_array_equal(one_block["cls"][:, 0], first["cls"][:, -1])
    F.cached("k2", compute(1), n_last_blocks=1)
    F.cached("k2", compute(4), n_last_blocks=4)  # needs more blocks than stored: recompute
    assert calls == [4, 1, 4]


def test_fingerprint_and_key_sensitivity(tmp_path):
    a, b = _tiny(0), _tiny(1)
    assert F.model_fingerprint(a) == F.model_fingerprint(_tiny(0))
    assert F.model_fingerprint(a) != F.model_fingerprint(b)
    w = save_backbone(a, tmp_path / "w.safetensors")
    fp = F.model_fingerprint(a, w)
    assert fp.startswith("file:") and fp == F.model_fingerprint(b, w)
    assert F.feature_key("m", "d", "t") != F.feature_key("m", "d", "t2")
    assert F.feature_key("m", "d", "t") == F.feature_key("m", "d", "t")


def test_dataset_features_cached_across_calls(monkeypatch, tmp_path):
    model = _tiny()
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    calls = []
    real = F.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "extract_features", counting)
    fp = F.model_fingerprint(model)
    one = F.dataset_features(model, fp, str(root), 4, 32, True)
    two = F.dataset_features(model, fp, str(root), 4, 32, True)
    assert len(calls) == 1
    np.testing.assert_array_equal(one["cls"], two["cls"])
    assert one["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    F.dataset_features(model, fp, str(root), 4, 16, True)  # other transform: recompute
    F.dataset_features(model, fp, str(root), 4, 32, False)  # cache off: recompute
    assert len(calls) == 3
    deep = F.dataset_features(model, fp, str(root), 4, 32, True, n_last_blocks=4)  # 2 blocks: recompute
    again = F.dataset_features(model, fp, str(root), 4, 32, True, n_last_blocks=4)  # clipped to depth: hit
    assert len(calls) == 4 and deep["cls"].shape[1] == again["cls"].shape[1] == 2


def test_cache_sees_replaced_images(tmp_path):
    """Same folder, same image count, one image rewritten: the cached features are not reused."""
    import os

    model = _tiny()
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    fp = F.model_fingerprint(model)
    before = F.dataset_features(model, fp, str(root.parent), 4, 32, True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "1.png")
    os.utime(root / "1.png", ns=(1, 1))  # a different mtime whatever the file system's clock resolution
    after = F.dataset_features(model, fp, str(root.parent), 4, 32, True)
    fresh = F.dataset_features(model, fp, str(root.parent), 4, 32, False)
    np.testing.assert_array_equal(after["cls"], fresh["cls"])
    assert not np.allclose(before["cls"][1], after["cls"][1])
    np.testing.assert_array_equal(before["cls"][[0, 2]], after["cls"][[0, 2]])


def test_eval_commands_align_classes_and_refuse_unlabelled_data(tmp_path):
    from dinoforge.cli import app

    w = save_backbone(_tiny(), tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(0)
    for split, classes in (("train", "abc"), ("val", "bc")):
        for c in classes:
            for i in range(2):
                img = np.full((32, 32, 3), 40 + 80 * "abc".index(c), dtype=np.uint8)
                img += rng.integers(0, 8, img.shape, dtype=np.uint8)
                Image.fromarray(img).save(_mkdir(tmp_path / split / c) / f"{i}.png")
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(_mkdir(tmp_path / "flat") / f"{i}.png")
    runner = CliRunner()
    common = ["--weights", str(w), "--train-data", str(tmp_path / "train"), "--device", "cpu", "--k", "1"]
    r = runner.invoke(app, ["eval", "knn", *common, "--val-data", str(tmp_path / "val"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    # classes are constant colours: with labels aligned by name every val image finds its own class
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["full"]["k=1"]["top1"] == 100.0
    r = runner.invoke(app, ["eval", "knn", *common, "--val-data", str(tmp_path / "flat"), "--out", str(tmp_path / "f")])
    assert r.exit_code != 0 and "unlabelled images" in str(r.exception or r.output)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_knn_and_logreg_commands_share_cache(tmp_path, monkeypatch):
    from dinoforge.cli import app

    w = save_backbone(_tiny(), tmp_path / "tiny.safetensors")
    calls = []
    real = F.extract_features
    monkeypatch.setattr(F, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    root = tmp_path / "imgs"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            img = np.full((32, 32, 3), 40 + 80 * c, dtype=np.uint8)
            img[i::4] = 0
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    runner = CliRunner()
    common = ["--weights", str(w), "--train-data", str(root), "--val-data", str(root), "--device", "cpu"]
    r = runner.invoke(app, ["eval", "knn", *common, "--out", str(tmp_path / "knn"), "--k", "3"])
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "knn") in r.output
    metrics = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert metrics["full"]["k=3"]["top1"] == 100.0  # test images are the train images
    assert len(calls) == 1  # train and val are the same folder + transform: one extraction
    r = runner.invoke(app, ["eval", "logreg", *common, "--out", str(tmp_path / "lr"), "--n-c", "3"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    assert "top1" in json.loads((tmp_path / "lr" / "metrics.json").read_text())


def test_eval_transform_sizes():
    tf, canvas = F.eval_transform_for("bundled:train", None, 14)
    assert canvas == 42  # 32 px rounded up to the 14 px patch
    tf, canvas = F.eval_transform_for("some/folder", 100, 14)
    x = tf(Image.fromarray(np.zeros((90, 160, 3), dtype=np.uint8)))
    assert canvas == 0 and x.shape == (3, 98, 98)
