"""Segmentation probe: metrics vs scikit-learn, a probe that must solve linear masks, chance on noise, e2e."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from dinoforge.eval.dense import IGNORE_INDEX, dense_features, list_pairs
from dinoforge.eval.segmentation import confusion_matrix, evaluate_seg, miou_from_confusion, train_seg_probe
from dinoforge.utils import DinoforgeError


def tiny_official_vit():
    """The official dinov2 ViT at toy size: an independent backbone with the reference layer outputs."""
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, init_values=1.0).eval()


def test_confusion_and_miou_match_sklearn():
    rng = np.random.default_rng(1)
    k = 6
    gt = rng.integers(0, k, size=(4, 20, 20))
    gt[rng.random(gt.shape) < 0.1] = IGNORE_INDEX
    gt[gt == 5] = 0  # class 5 never appears in GT...
    pred = rng.integers(0, k - 1, size=gt.shape)  # ...nor in predictions: it must be excluded from the mean
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k)
    keep = gt != IGNORE_INDEX
    ref = sk_confusion(gt[keep], pred[keep], labels=list(range(k)))
    np.testing.assert_array_equal(conf.numpy(), ref)
    miou, iou = miou_from_confusion(conf)
    assert np.isnan(iou[5])
    ref_iou = jaccard_score(gt[keep], pred[keep], labels=list(range(5)), average=None)
    np.testing.assert_allclose(iou[:5], ref_iou, rtol=1e-12)
    assert miou == pytest.approx(ref_iou.mean(), rel=1e-12)


def test_miou_hand_worked():
    # GT class 0: 3 px, class 1: 1 px; prediction gets two of class 0 right and calls one class-0 pixel 1.
    conf = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 3)
    miou, iou = miou_from_confusion(conf)
    np.testing.assert_allclose(iou[:2], [2 / 3, 1 / 2])
    assert np.isnan(iou[2]) and miou == pytest.approx((2 / 3 + 1 / 2) / 2)


def _linear_masks(feats: torch.Tensor, w: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    logits = torch.einsum("kc,nchw->nkhw", w, feats) + b[None, :, None, None]
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).argmax(1)


def test_probe_solves_masks_linear_in_features():
    g = torch.Generator().manual_seed(0)
    k, c = 4, 16
    w, b = torch.randn(k, c, generator=g), 0.3 * torch.randn(k, generator=g)
    train_f, test_f = torch.randn(64, c, 6, 6, generator=g), torch.randn(32, c, 6, 6, generator=g)
    train_m, test_m = _linear_masks(train_f, w, b, 24), _linear_masks(test_f, w, b, 24)
    head = train_seg_probe(train_f, train_m, k, epochs=30, lr=5e-2, batch_size=16)
    res = evaluate_seg(head, test_f, test_m, k)
    assert res["miou"] > 0.95, res
    assert res["pixel_acc"] > 0.97


def test_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    k = 4
    train_f, test_f = torch.randn(64, 16, 8, 8, generator=g), torch.randn(32, 16, 8, 8, generator=g)
    train_m = torch.randint(0, k, (64, 8, 8), generator=g)
    test_m = torch.randint(0, k, (32, 8, 8), generator=g)
    head = train_seg_probe(train_f, train_m, k, epochs=10, lr=1e-2)
    res = evaluate_seg(head, test_f, test_m, k)
    assert abs(res["pixel_acc"] - 1 / k) < 0.05, res
    assert res["miou"] < 0.2


def test_ignore_pixels_do_not_count():
    k = 3
    feats = torch.randn(2, 8, 4, 4)
    masks = torch.full((2, 8, 8), IGNORE_INDEX)
    masks[:, :2] = 1
    head = train_seg_probe(feats, masks, k, epochs=2)
    res = evaluate_seg(head, feats, masks, k)
    assert res["num_pixels"] == 2 * 2 * 8


def test_dense_features_match_official_layers():
    vit = tiny_official_vit()
    x = torch.randn(2, 3, 32, 32)
    out = dense_features(vit, x, 2, with_cls=True)
    ref = vit.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=True)
    assert out.shape == (2, 4 * 64, 8, 8)
    torch.testing.assert_close(out[:, :64], ref[0][0])
    torch.testing.assert_close(out[:, 64:128, 3, 5], ref[0][1])
    torch.testing.assert_close(out[:, 128:192], ref[1][0])


def test_list_pairs_reports_missing_masks(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "b.png")
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DinoforgeError, match="b"):
        list_pairs(tmp_path, "masks", (".png",))
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "b.png")
    assert [p[0].name for p in list_pairs(tmp_path, "masks", (".png",))] == ["a.jpg", "b.png"]


def make_seg_folder(root: Path, n: int, size: int, seed: int) -> None:
    """Images split at a random column: red-ish left = class 1, blue-ish right = class 0; top row ignored."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        cut = int(rng.integers(size // 4, 3 * size // 4))
        img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
        img[:, :cut, 0] = rng.integers(170, 255, size=(size, cut))
        img[:, cut:, 2] = rng.integers(170, 255, size=(size, size - cut))
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[:, :cut] = 1
        mask[0] = IGNORE_INDEX
        Image.fromarray(img).save(root / "images" / f"im{i}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")


def test_multiscale_flip_is_mirror_equivariant():
    from dinoforge.eval.segmentation import LinearSegHead, predict_seg_multiscale

    vit = tiny_official_vit()
    head = LinearSegHead(64, 3).eval()
    img = torch.randn(3, 30, 30)
    kw = dict(out_size=(30, 30), layers=1, side=32, scales=(1.0, 1.5), flip=True)
    p = predict_seg_multiscale(vit, head, img, **kw)
    p_mirror = predict_seg_multiscale(vit, head, img.flip(-1), **kw)
    assert p.shape == (3, 30, 30)
    torch.testing.assert_close(p.sum(0), torch.ones(30, 30))
    torch.testing.assert_close(p_mirror, p.flip(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_seg_command_end_to_end(tmp_path: Path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from dinoforge.cli import app
    from dinoforge.models.vision_transformer import DinoVisionTransformer
    from dinoforge.models.weights import save_backbone

    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1.0)
    weights = save_backbone(vit, tmp_path / "tiny.safetensors")
    make_seg_folder(tmp_path / "train", 24, 32, seed=0)
    make_seg_folder(tmp_path / "val", 6, 40, seed=1)
    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    args = ["eval", "seg", "--weights", str(weights), "--train-data", str(tmp_path / "train"),
            "--val-data", str(tmp_path / "val"), "--size", "32", "--epochs", "30", "--lr", "1e-2",
            "--batch-size", "8", "--device", "cpu"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "o1") in res.output
    m1 = json.loads((tmp_path / "o1" / "metrics.json").read_text())
    assert m1["num_classes"] == 2 and m1["num_pixels"] == 6 * 39 * 40  # original val size, top row ignored
    assert m1["miou"] > 0.9, m1
    with Image.open(tmp_path / "o1" / "predictions.png") as fig:  # 4 preview rows of 3 panels
        assert fig.height > fig.width
    assert len(list((tmp_path / "cache").glob("dense_*.pt"))) == 2  # train and val features cached
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["miou"] == m1["miou"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o3"), "--ms-scales", "1.0,1.5", "--flip"])
    assert res.exit_code == 0, res.output
    m3 = json.loads((tmp_path / "o3" / "metrics.json").read_text())
    assert m3["scales"] == [1.0, 1.5] and m3["miou"] > 0.9


def test_val_class_outside_the_train_classes_is_an_error(tmp_path: Path):
    from dinoforge.eval.segmentation import run_seg_eval

    make_seg_folder(tmp_path / "train", 4, 16, seed=0)
    make_seg_folder(tmp_path / "val", 2, 16, seed=1)
    mask = np.array(Image.open(tmp_path / "val" / "masks" / "im1.png"))
    mask[5, 5] = 2
    Image.fromarray(mask).save(tmp_path / "val" / "masks" / "im1.png")
    with pytest.raises(DinoforgeError, match="im1.png"):
        run_seg_eval(tiny_official_vit(), tmp_path / "train", tmp_path / "val", tmp_path / "out", size=16, epochs=1)
