"""Feature extraction vs a direct forward of the official dinov2 backbone; corrupt files; the embed CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from typer.testing import CliRunner

from dinoforge.data.datasets import BundledDataset, ImageFolderDataset
from dinoforge.data.transforms import eval_transform_size, normalize_transform
from dinoforge.features import extract_features
from dinoforge.models import DinoVisionTransformer
from dinoforge.utils import DinoforgeError


def _official_tiny(patch=4, img_size=32):
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    m = DinoVisionTransformer(
        img_size=img_size,
        patch_size=patch,
        embed_dim=64,
        depth=2,
        num_heads=2,
        init_values=0.5,
        block_chunks=0,
    )
    with torch.no_grad():
        m.cls_token.normal_()
        m.pos_embed.normal_(std=0.1)
    return m.eval()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "img3.png").write_bytes(b"garbage")  # corrupt, sorted between img2 and img4
    (root / "readme.md").write_text("not an image")
    return root


def test_extract_features_matches_direct_forward():
    model = _official_tiny()
    ds = Subset(BundledDataset("val", transform=normalize_transform()), range(37))
    out = extract_features(model, ds, batch_size=8, patch_tokens=True)
    x = torch.stack([ds[i][0] for i in range(37)])
    with torch.no_grad():
        ref = model.forward_features(x)
    assert out["cls"].dtype == np.float32 and out["cls"].shape == (37, 64)
    np.testing.assert_allclose(out["cls"], ref["x_norm_clstoken"].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["patch"], ref["x_norm_patchtokens"].numpy(), atol=1e-5, rtol=0)
    assert out["patch"].shape == (37, 64, 64)
    assert out["labels"].tolist() == [ds[i][1] for i in range(37)]
    assert out["indices"].tolist() == list(range(37)) and len(out["skipped"]) == 0
    assert not model.training


def test_extract_features_skips_corrupt_and_batches_mixed_shapes(folder):
    model = _official_tiny()
    ds = ImageFolderDataset(folder, transform=eval_transform_size(32, 4))
    out = extract_features(model, ds, batch_size=3)
    assert out["indices"].tolist() == [0, 1, 2, 4, 5, 6]
    assert out["skipped"].tolist() == [3] and out["skipped_names"] == [str(folder / "img3.png")]
    for row, i in zip(out["cls"], out["indices"], strict=True):
        with torch.no_grad():
            ref = model.forward_features(ds[int(i)][0][None])["x_norm_clstoken"][0].numpy()
        np.testing.assert_allclose(row, ref, atol=1e-5, rtol=0)
    parallel = extract_features(model, ds, batch_size=3, num_workers=2)
    np.testing.assert_array_equal(parallel["cls"], out["cls"])
    assert parallel["skipped"].tolist() == [3]
    with pytest.raises(DinoforgeError, match="equal token grids"):
        extract_features(model, ds, batch_size=3, patch_tokens=True)


def test_extract_features_needs_tensors_and_readable_images(folder):
    model = _official_tiny()
    with pytest.raises(DinoforgeError, match="transform"):
        extract_features(model, ImageFolderDataset(folder), batch_size=4)
    (folder / "bad").mkdir()
    (folder / "bad" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DinoforgeError, match="no readable image"):
        extract_features(model, ImageFolderDataset(folder / "bad", transform=normalize_transform()))


def test_embed_cli_writes_outputs(folder, tmp_path):
    """End to end from saved weights; features compared with the official model on the same weights."""
    from dinoforge.cli import app
    from dinoforge.models.weights import save_backbone

    official = _official_tiny()
    ours = DinoVisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=0.5, block_chunks=0
    )
    ours.load_state_dict(official.state_dict())
    weights = save_backbone(ours, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    args = [
        "embed",
        "--weights",
        str(weights),
        "--data",
        str(folder),
        "--out",
        str(out),
        "--size",
        "32",
        "-b",
        "4",
    ]
    res = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output and "skipped 2" in res.output
    feats = np.load(out / "features.npy")
    files = (out / "files.txt").read_text().splitlines()
    assert feats.shape == (6, 64) and len(files) == 6 and files[0].endswith("img0.png")
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert skipped == [str(folder / "img3.png"), str(folder / "readme.md")]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 6 and meta["skipped_images"] == 1 and meta["dim"] == 64
    with torch.no_grad():
        ref = official(eval_transform_size(32, 4)(Image.open(folder / "img5.png").convert("RGB"))[None])
    np.testing.assert_allclose(feats[4], ref[0].numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_embed_cli_bundled_with_patch_tokens(tmp_path):
    """The bundled path of the CLI: native 32 px canvas (rounded to the patch), labels and item names kept."""
    from dinoforge.cli import app
    from dinoforge.models.weights import save_backbone

    ours = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, block_chunks=0)
    weights = save_backbone(ours, tmp_path / "tiny.safetensors")
    out2 = tmp_path / "out2"
    res = CliRunner().invoke(
        app, ["embed", "-w", str(weights), "--data", "bundled:val", "--out", str(out2), "--patch-tokens"]
    )
    assert res.exit_code == 0, res.output
    assert np.load(out2 / "patch_tokens.npy").shape == (2000, 64, 64)
    assert np.array_equal(np.load(out2 / "labels.npy"), BundledDataset("val").labels)
    assert (out2 / "files.txt").read_text().splitlines()[:2] == ["bundled:val/0", "bundled:val/1"]


def test_embed_cli_errors(tmp_path):
    from dinoforge.cli import app

    res = CliRunner().invoke(app, ["embed", "--data", "bundled", "--out", str(tmp_path)])
    assert isinstance(res.exception, DinoforgeError) and "--model" in str(res.exception)
    res = CliRunner().invoke(
        app, ["embed", "-m", "dinov2_vits14", "--random-init", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]
    )
    assert isinstance(res.exception, DinoforgeError) and "nope" in str(res.exception)
