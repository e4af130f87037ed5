"""Depth probe: metrics vs hand-worked values and numpy, a probe that must fit linear depth, data loading."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoforge.eval.depth import (
    LinearDepthHead,
    depth_errors,
    depth_layer_indices,
    evaluate_depth,
    load_depth,
    sig_loss,
    train_depth_probe,
)
from dinoforge.utils import DinoforgeError


def test_depth_errors_hand_worked():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    gt = torch.tensor([[1.0, 2.5], [0.0, 4.0]])  # the 0 is invalid: three pixels count
    e = depth_errors(pred, gt)
    # errors: 0, -0.5, +1 -> squared 0, 0.25, 1
    assert e["rmse"] == pytest.approx(np.sqrt(1.25 / 3))
    assert e["abs_rel"] == pytest.approx((0 + 0.5 / 2.5 + 1 / 4) / 3)
    assert e["sq_rel"] == pytest.approx((0 + 0.25 / 2.5 + 1 / 4) / 3)
    # ratios max(p/g, g/p): 1, 1.25, 1.25 -> strictly below 1.25 only the first
    assert e["delta1"] == pytest.approx(1 / 3)
    assert e["delta2"] == pytest.approx(1.0)
    assert depth_errors(pred, torch.zeros(2, 2)) is None


def test_depth_errors_match_numpy():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 10, size=(30, 40))
    gt[rng.random(gt.shape) < 0.2] = 0
    pred = gt * rng.uniform(0.7, 1.4, size=gt.shape) + (gt == 0) * 3.0
    m = gt > 0
    p, g = pred[m], gt[m]
    thresh = np.maximum(p / g, g / p)
    ref = {
        "rmse": np.sqrt(np.mean((p - g) ** 2)),
        "abs_rel": np.mean(np.abs(p - g) / g),
        "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
        "delta1": np.mean(thresh < 1.25),
        "delta3": np.mean(thresh < 1.25**3),
    }
    e = depth_errors(torch.from_numpy(pred), torch.from_numpy(gt))
    for k, v in ref.items():
        assert e[k] == pytest.approx(v, rel=1e-10), k


def test_head_output_is_expected_bin_centre():
    head = LinearDepthHead(4, n_bins=8, min_depth=1.0, max_depth=8.0, upsample=2)
    feats = torch.randn(1, 4, 3, 3)
    up = F.interpolate(feats, scale_factor=2, mode="bilinear", align_corners=False)
    logits = torch.einsum("kc,chw->khw", head.conv.weight[:, :, 0, 0], up[0]) + head.conv.bias[:, None, None]
    p = logits.clamp_min(0) + 0.1
    p = p / p.sum(0)
    expected = (p * torch.arange(1.0, 9.0)[:, None, None]).sum(0)
    torch.testing.assert_close(head(feats)[0], expected, rtol=1e-5, atol=1e-5)
    assert head(feats, size=(12, 12)).shape == (1, 12, 12)


def test_sig_loss_is_scale_invariant_up_to_its_mean_term():
    gt = torch.rand(2, 8, 8) + 0.5
    assert sig_loss(gt, gt) == pytest.approx(0.0, abs=1e-6)
    # a global scale s only leaves sqrt(lam) * |log s|
    assert float(sig_loss(2 * gt, gt, eps=0.0)) == pytest.approx(np.sqrt(0.15) * np.log(2), rel=1e-4)
    assert sig_loss(gt, torch.zeros_like(gt)) is None


def _linear_depth(feats: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    d = 3.0 + 0.5 * torch.einsum("c,nchw->nhw", w, feats) / w.norm()
    return F.interpolate(d[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0.5, 9)


def test_probe_fits_depth_linear_in_features():
    g = torch.Generator().manual_seed(0)
    c = 16
    w = torch.randn(c, generator=g)
    train_f, test_f = torch.randn(48, c, 4, 4, generator=g), torch.randn(24, c, 4, 4, generator=g)
    train_d, test_d = _linear_depth(train_f, w, 16), _linear_depth(test_f, w, 16)
    head = train_depth_probe(train_f, train_d, n_bins=256, epochs=20, lr=3e-2, batch_size=16, max_depth=10.0)
    res = evaluate_depth(head, test_f, test_d)
    const = depth_errors(torch.full_like(test_d, float(train_d.median())), test_d)
    assert res["abs_rel"] < 0.03, res
    assert res["delta1"] > 0.98, res
    assert res["rmse"] < 0.15 * const["rmse"], (res, const)


def test_depth_layer_indices_follow_official_choice():
    assert depth_layer_indices(12, 1) == [11]
    assert depth_layer_indices(12, 4) == [2, 5, 8, 11]
    assert depth_layer_indices(24, 4) == [4, 11, 17, 23]
    assert depth_layer_indices(8, 4) == [1, 3, 5, 7]
    with pytest.raises(DinoforgeError):
        depth_layer_indices(12, 2)


def test_load_depth_png_mm_and_npy_metres(tmp_path: Path):
    mm = np.array([[0, 1500], [65535, 250]], dtype=np.uint16)
    Image.fromarray(mm).save(tmp_path / "a.png")
    np.testing.assert_allclose(load_depth(tmp_path / "a.png").numpy(), mm / 1000.0, rtol=1e-6)
    m = np.array([[0.0, 1.25], [np.nan, 3.5]], dtype=np.float32)
    np.save(tmp_path / "b.npy", m)
    np.testing.assert_allclose(load_depth(tmp_path / "b.npy").numpy(), [[0, 1.25], [0, 3.5]])
    Image.new("RGB", (2, 2)).save(tmp_path / "c.png")
    with pytest.raises(DinoforgeError, match="16-bit"):
        load_depth(tmp_path / "c.png")


def make_depth_folder(root: Path, n: int, size: int, seed: int, fmt: str) -> None:
    """Depth rising from 1 m (top) to 4 m (bottom) with a random per-image offset; brighter rows are nearer."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    rows = np.linspace(0, 1, size)[:, None].repeat(size, 1)
    for i in range(n):
        depth = 1.0 + 3.0 * rows + rng.uniform(0, 0.5)
        depth[0, :5] = 0  # invalid pixels
        img = np.clip(255 - 50 * depth[..., None] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"d{i}.png")
        if fmt == "png":
            Image.fromarray((depth * 1000).round().astype(np.uint16)).save(root / "depth" / f"d{i}.png")
        else:
            np.save(root / "depth" / f"d{i}.npy", depth.astype(np.float32))


@pytest.mark.slow
def test_depth_command_end_to_end(tmp_path: Path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from dinoforge.cli import app
    from dinoforge.models.vision_transformer import DinoVisionTransformer
    from dinoforge.models.weights import save_backbone

    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, init_values=1.0)
    weights = save_backbone(vit, tmp_path / "tiny.safetensors")
    make_depth_folder(tmp_path / "train", 24, 32, seed=0, fmt="png")
    make_depth_folder(tmp_path / "val", 6, 36, seed=1, fmt="npy")
    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, [
        "eval", "depth", "--weights", str(weights), "--train-data", str(tmp_path / "train"),
        "--val-data", str(tmp_path / "val"), "--out", str(tmp_path / "out"), "--size", "32", "--layers", "4",
        "--epochs", "12", "--lr", "5e-2", "--batch-size", "2", "--max-depth", "10", "--device", "cpu",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "out") in res.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["blocks"] == [0, 1, 2, 3] and m["num_images"] == 6
    assert m["abs_rel"] < 0.06 and m["delta1"] > 0.97, m
    with Image.open(tmp_path / "out" / "predictions.png") as fig:
        assert fig.format == "PNG" and fig.height > fig.width
