"""The top-level Python API (`dinoforge.load_backbone`, `transform_for`, `embed`, `pretrain`, `curate_pool`): one call
per job with the command line's defaults, checked against a hand-built torchvision pipeline and the CLI's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_train import TINY
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import dinoforge
from dinoforge.data.datasets import load_sample_photos
from dinoforge.models import vit_small
from dinoforge.utils import DinoforgeError


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> tuple[Path, torch.nn.Module]:
    """A torch.hub cache holding a ViT-S/14 in the released layout (seeded weights): (its file, the model)."""
    torch_home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()
    path = torch_home / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    """Five photo crops of different sizes and aspects, in sorted order, one in a sub-folder."""
    photo = load_sample_photos(["chelsea"])["chelsea"]
    boxes = [(0, 0, 300, 200), (50, 40, 170, 300), (100, 0, 451, 300), (10, 10, 90, 90), (200, 100, 440, 260)]
    paths = [tmp_path / "images" / name for name in ("a.jpg", "b.png", "c.jpg", "d/e.png", "d/f.jpg")]
    for box, path in zip(boxes, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.crop(box).save(path)
    return paths


def _reference_transform() -> transforms.Compose:
    """The official eval preprocessing, written out with torchvision (not dinoforge's code)."""
    return transforms.Compose(
        [
            transforms.Resize(256, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


def test_transform_for_is_the_official_eval_transform_and_keeps_aspect_with_a_size():
    img = load_sample_photos(["coffee"])["coffee"]
    model = dinoforge.load_backbone("dinov2_vits14", random_init=True)
    assert torch.equal(dinoforge.transform_for(model)(img), _reference_transform()(img))
    x = dinoforge.transform_for(model, size=100)(img)  # 400x600 photo: shorter side 100, cropped to patch multiples
    assert x.shape == (3, 98, 140)


def test_embed_hub_name_file_and_path_list_match_the_hand_pipeline_and_the_cli(tmp_path, hub_cache, photos):
    ckpt, model = hub_cache
    feats = dinoforge.embed(tmp_path / "images")  # the default model: dinov2_vits14 from the torch.hub cache
    with torch.inference_mode():
        expected = model(torch.stack([_reference_transform()(Image.open(p).convert("RGB")) for p in photos]))
    assert feats.shape == (5, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected.numpy(), atol=2e-5)  # fp32, batch of 5 vs the same batch

    listed = dinoforge.embed([str(p) for p in reversed(photos)], weights=ckpt)  # a local file; the list's order
    np.testing.assert_allclose(listed, feats[::-1], atol=2e-5)
    env = {**os.environ, "DINOFORGE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "dinoforge", "embed", "--model", "dinov2_vits14", "--data", str(tmp_path / "images")]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "cli")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "cli" / "features.npy"), feats, atol=2e-5)
    assert (tmp_path / "cli" / "files.txt").read_text().split() == [str(p) for p in photos]

    (tmp_path / "images" / "z.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DinoforgeError, match="1 unreadable image.*z.jpg"):
        dinoforge.embed(tmp_path / "images", model=model)


def test_pretrain_chooses_saves_its_reasons_and_lets_key_value_win(tmp_path, photos):
    summary = dinoforge.pretrain(
        tmp_path / "images", tmp_path / "run", overrides=[*TINY, "train.max_iterations=8", "train.batch_size_per_gpu=4"]
    )
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    reasons = list(cfg.train.auto_choice)
    assert reasons[0] == "auto (no -c): preset demo" and any("patch 8" in r for r in reasons)  # 200 px photos
    assert cfg.student.patch_size == 4 and cfg.crops.global_crops_size == 16  # the overrides beat the choice
    assert summary["iterations"] == 8
    assert dinoforge.load_backbone(summary["teacher"]).embed_dim == 32


def test_curate_pool_removes_copies_and_returns_the_manifest(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    photo = load_sample_photos(["astronaut"])["astronaut"]
    for i in range(6):
        photo.crop((80 * i, 0, 80 * i + 64, 64 + 60 * i)).save(pool / f"o{i}.png")
    for i in (1, 4):  # exact copies under other names
        Image.open(pool / f"o{i}.png").save(pool / f"copy{i}.png")
    manifest = dinoforge.curate_pool(pool, tmp_path / "out", overrides={"cluster.levels": "[]", "device": "cpu"})
    kept = [Path(json.loads(line)["path"]).stem for line in manifest.read_text().splitlines()]
    assert len(kept) == 6 and {k.removeprefix("copy").removeprefix("o") for k in kept} == {str(i) for i in range(6)}
