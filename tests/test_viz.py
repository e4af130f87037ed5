"""Visualisation: PCA vs sklearn, foreground split on planted data, mutual NN vs brute force, attention vs the
official code's attention probabilities, figure files and the `viz` CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA
from typer.testing import CliRunner

from dinoforge.models import DinoVisionTransformer
from dinoforge.viz.attention import attention_entropy, attention_figure, cls_attention
from dinoforge.viz.common import PatchFeatures, patch_features, pca
from dinoforge.viz.matching import compute_matches, match_figure, mutual_nearest_neighbors
from dinoforge.viz.pca import compute_pca, draw_pca, foreground_masks, pca_figure, pca_rgb


def _tiny(registers=0):
    torch.manual_seed(0)
    m = DinoVisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=2,
        init_values=0.5,
        num_register_tokens=registers,
        block_chunks=0,
    )
    with torch.no_grad():
        for t in (m.cls_token, m.pos_embed, m.register_tokens):
            if t is not None:
                t.normal_(std=0.5)
    return m.eval()


def _photo(seed, hw=(40, 48)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((hw[1], hw[0]), Image.NEAREST)


def _png_ok(path, min_side=100):
    a = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert min(a.shape[:2]) >= min_side and a.std() > 10  # a real picture, not a blank canvas
    return a


def test_pca_matches_sklearn():
    x = np.random.default_rng(0).normal(size=(200, 12)) @ np.diag(np.linspace(3, 0.2, 12))
    scores, comps, var = pca(x, 3)
    ref = PCA(3, svd_solver="full").fit(x)
    signs = np.sign((comps * ref.components_).sum(1))
    np.testing.assert_allclose(comps * signs[:, None], ref.components_, atol=1e-8)
    np.testing.assert_allclose(scores * signs, ref.transform(x), atol=1e-8)
    np.testing.assert_allclose(var, ref.explained_variance_, rtol=1e-10)
    assert np.all(np.abs(comps).max(1) == comps[np.arange(3), np.abs(comps).argmax(1)])  # sign rule


def _planted(sign=1.0, seed=0):
    """Two 6x6 grids: foreground = centre 2x2 (image 0) / 3x3 block (image 1) offset along one direction."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=16)
    feats, truth = [], []
    for block in (slice(2, 4), slice(1, 4)):
        m = np.zeros((6, 6), dtype=bool)
        m[block, block] = True
        tok = rng.normal(scale=0.3, size=(6, 6, 16)) + sign * np.where(m[..., None], 2.0, -1.0) * d
        feats.append(PatchFeatures(np.zeros((24, 24, 3)), tok))
        truth.append(m)
    return feats, truth


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_foreground_masks_recover_planted_foreground(sign):
    feats, truth = _planted(sign)
    masks = foreground_masks(feats)
    for m, t in zip(masks, truth, strict=True):
        assert np.array_equal(m, t)


def test_pca_rgb_against_sklearn_on_foreground():
    feats, truth = _planted()
    maps, ratio = pca_rgb(feats, truth)
    sel = np.concatenate([f.tokens[m] for f, m in zip(feats, truth, strict=True)])
    ref = PCA(3, svd_solver="full").fit(sel)
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-8)
    s = ref.transform(sel)
    got = np.concatenate([mp[m] for mp, m in zip(maps, truth, strict=True)])
    for c in range(3):
        expect = (s[:, c] - s[:, c].min()) / np.ptp(s[:, c])
        assert np.allclose(got[:, c], expect, atol=1e-8) or np.allclose(got[:, c], 1 - expect, atol=1e-8)
    for mp, m in zip(maps, truth, strict=True):
        assert mp[~m].max() == 0 and mp.min() >= 0 and mp.max() <= 1


def _brute_mnn(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    pairs = set()
    for i in range(len(a)):
        j = max(range(len(b)), key=lambda j: float(a[i] @ b[j]))
        if max(range(len(a)), key=lambda k: float(a[k] @ b[j])) == i:
            pairs.add((i, j))
    return pairs


@pytest.mark.parametrize("na,nb", [(30, 45), (50, 20)])
def test_mutual_nearest_neighbors_vs_brute_force(na, nb):
    rng = np.random.default_rng(na)
    a, b = rng.normal(size=(na, 8)), rng.normal(size=(nb, 8))
    ia, ib, s = mutual_nearest_neighbors(a, b)
    assert set(zip(ia.tolist(), ib.tolist(), strict=True)) == _brute_mnn(a, b)
    assert len(ia) > 0 and np.all(np.diff(s) <= 0)
    an, bn = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(s, (an[ia] * bn[ib]).sum(1), atol=1e-6)


def test_patch_features_equal_forward_features():
    model = _tiny()
    img = _photo(0)
    (f,) = patch_features(model, [img], size=32)
    assert f.grid == (8, 9) and f.image.shape == (32, 36, 3)  # 40x48 → 32x38 → crop to 32x36
    from dinoforge.data.transforms import eval_transform_size

    with torch.no_grad():
        ref = model.forward_features(eval_transform_size(32, 4)(img)[None])["x_norm_patchtokens"][0]
    np.testing.assert_allclose(f.tokens.reshape(-1, 64), ref.numpy(), atol=1e-6)


def test_identical_images_match_every_patch_to_itself():
    model = _tiny()
    img = _photo(1)
    m = compute_matches(model, img, img, size=32)
    assert len(m.similarity) == 8 * 9
    order_a, order_b = np.lexsort(m.xy_a.T), np.lexsort(m.xy_b.T)
    np.testing.assert_allclose(m.xy_a[order_a], m.xy_b[order_b])
    np.testing.assert_allclose(m.similarity, 1.0, atol=1e-5)
    fg = compute_matches(model, img, img, size=32, foreground=True)
    (mask, _) = foreground_masks(list(m.feats))
    assert len(fg.similarity) == mask.sum() < 72
    rows, cols = (fg.xy_a[:, 1] / 4 - 0.5).astype(int), (fg.xy_a[:, 0] / 4 - 0.5).astype(int)
    assert mask[rows, cols].all()
    np.testing.assert_allclose(fg.xy_a, fg.xy_b)


def test_cls_attention_matches_official_attention_probabilities():
    from dinov2.models.vision_transformer import DinoVisionTransformer as Official

    ours = _tiny()
    official = Official(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=0.5, block_chunks=0
    ).eval()
    official.load_state_dict(ours.state_dict())
    captured = []
    official.blocks[-1].attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    img = _photo(2)
    _, maps = cls_attention(ours, img, size=32)
    from dinoforge.data.transforms import eval_transform_size

    with torch.no_grad():
        official.forward_features(eval_transform_size(32, 4)(img)[None])
    ref = captured[0][0, :, 0, 1:].reshape(2, 8, 9).numpy()
    np.testing.assert_allclose(maps, ref, atol=1e-5)


def test_cls_attention_skips_registers():
    model = _tiny(registers=4)
    img = _photo(3)
    _, maps = cls_attention(model, img, size=32)
    from dinoforge.data.transforms import eval_transform_size

    with torch.no_grad():
        full = model.get_last_selfattention(eval_transform_size(32, 4)(img)[None])[0, :, 0]
    assert full.shape[-1] == 1 + 4 + 72 and maps.shape == (2, 8, 9)
    np.testing.assert_allclose(maps.reshape(2, -1), full[:, 5:].numpy(), atol=1e-7)
    np.testing.assert_allclose(maps.reshape(2, -1).sum(1), 1 - full[:, :5].sum(1).numpy(), atol=1e-5)
    ent = attention_entropy(maps)
    assert np.all(ent > 0) and np.all(ent <= np.log(72) + 1e-9)


def test_figures_written(tmp_path):
    model = _tiny(registers=2)
    imgs = [_photo(i) for i in range(3)]
    p = pca_figure(model, imgs, tmp_path / "pca.png", size=32, titles=["a", "b", "c"])
    _png_ok(p)
    _png_ok(match_figure(model, imgs[0], imgs[1], tmp_path / "m.png", size=32))
    _png_ok(attention_figure(model, imgs[:2], tmp_path / "a.png", size=32))


def test_pca_figure_shows_each_patch_in_its_pca_colour(tmp_path):
    """The PNG holds every foreground patch's PCA colour as a block of pixels (matplotlib rounds to 8 bits), so the
    panel shows the computed map and not the input or the mask drawn again."""
    result = compute_pca(_tiny(registers=2), [_photo(i) for i in range(3)], size=32)
    png = np.asarray(Image.open(draw_pca(result, tmp_path / "pca.png")).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(png, axis=0, return_counts=True)
    shown = colours[counts >= 16].astype(int)  # a patch is drawn about 30 px wide; text edges are a few pixels
    for rgb, mask in zip(result.rgb, result.masks, strict=True):
        assert 3 <= mask.sum() < mask.size  # a split into foreground and background
        wanted = np.unique(np.round(rgb[mask] * 255).astype(int), axis=0)
        off = np.abs(wanted[:, None, :] - shown[None, :, :]).max(-1).min(1)
        assert off.max() <= 1, wanted[off > 1]


def test_viz_cli(tmp_path):
    from dinoforge.cli import app
    from dinoforge.models.weights import save_backbone

    weights = save_backbone(_tiny(), tmp_path / "tiny.safetensors")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        _photo(i).save(folder / f"im{i}.png")
    runner = CliRunner()
    out = tmp_path / "out"
    base = ["--weights", str(weights), "--out", str(out), "--size", "32", "--device", "cpu"]
    res = runner.invoke(app, ["viz", "pca", "--images", str(folder), *base])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "pca.json").read_text())
    assert meta["images"] == ["im0", "im1"] and len(meta["explained_variance_ratio"]) == 3
    _png_ok(out / "pca.png")
    img0 = str(folder / "im0.png")
    res = runner.invoke(app, ["viz", "match", "--images", img0, "--images", img0, *base])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "match.json").read_text())["num_matches"] == 72
    res = runner.invoke(app, ["viz", "attn", "-i", str(folder), *base])
    assert res.exit_code == 0, res.output
    _png_ok(out / "attention.png")
    assert set(json.loads((out / "attention.json").read_text())["entropy"]) == {"im0", "im1"}
    res = runner.invoke(app, ["viz", "match", "--images", str(folder / "nope.png"), *base])
    assert res.exit_code != 0 and "nope.png" in str(res.exception)


def test_default_size_never_upscales_and_grid_wraps(tmp_path):
    from dinoforge.data.datasets import BundledDataset

    model = _tiny()
    small = BundledDataset("val")[0][0]  # 32 px
    (fs,) = patch_features(model, [small])
    assert fs.grid == (8, 8)
    p16 = DinoVisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, block_chunks=0)
    (fb,) = patch_features(p16.eval(), [_photo(4, hw=(300, 400))])
    assert fb.image.shape[:2] == (224, 288) and fb.grid == (14, 18)  # 224 x 298 cropped to 16-multiples
    one_row = np.asarray(Image.open(pca_figure(model, [small] * 8, tmp_path / "8.png")))
    two_rows = np.asarray(Image.open(pca_figure(model, [small] * 10, tmp_path / "10.png")))
    assert abs(one_row.shape[1] - two_rows.shape[1]) < 20  # still 8 columns wide
    assert 1.8 < two_rows.shape[0] / one_row.shape[0] < 2.2  # a second block of rows


def test_viz_help():
    from dinoforge.cli import app

    for cmd in ("pca", "match", "attn"):
        res = CliRunner().invoke(app, ["viz", cmd, "--help"])
        assert res.exit_code == 0 and "--images" in res.output and "--size" in res.output
