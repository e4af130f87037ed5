"""Hub names load the released weights from the caches users already fill (torch.hub, Hugging Face), never a silent
random init: fake caches in the official layouts, the one-line error when both are empty, and --random-init."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_errors import assert_one_line_error, run_cli

from dinoforge import load_backbone
from dinoforge.models import vit_small
from dinoforge.models.hub import HF_REPOS, TORCH_HUB_FILES, find_hub_weights
from dinoforge.utils import DinoforgeError


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches under tmp_path: (TORCH_HOME, HF_HOME)."""
    torch_home, hf_home = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return torch_home, hf_home


@pytest.fixture(scope="module")
def released():
    """A ViT-S/14 in the released layout, with weights unlike the seeded random init of a hub name."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _hf_snapshot(hf_home, repo: str, rev: str):
    return hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / rev


def test_every_hub_name_has_its_official_file_and_repo():
    assert TORCH_HUB_FILES["dinov2_vits14"] == "dinov2_vits14_pretrain.pth"
    assert TORCH_HUB_FILES["dinov2_vitg14_reg"] == "dinov2_vitg14_reg4_pretrain.pth"
    assert HF_REPOS["dinov2_vitb14"] == "facebook/dinov2-base" and HF_REPOS["dinov2_vitg14"] == "facebook/dinov2-giant"
    assert HF_REPOS["dinov2_vitl14_reg"] == "facebook/dinov2-with-registers-large"
    assert len(TORCH_HUB_FILES) == len(HF_REPOS) == 8


def test_hub_name_loads_torch_hub_checkpoint(caches, released):
    torch_home, _ = caches
    ckpt = torch_home / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(released.state_dict(), ckpt)
    assert find_hub_weights("dinov2_vits14") == ckpt
    _assert_same_weights(load_backbone("dinov2_vits14"), released)


def test_hub_name_loads_newest_hugging_face_snapshot(caches, released):
    from dinoforge.export.hf import export_hf

    _, hf_home = caches
    repo = "facebook/dinov2-small"
    snapshot = export_hf(released, _hf_snapshot(hf_home, repo, "abc123"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        older = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    export_hf(older, _hf_snapshot(hf_home, repo, "old000"))
    os.utime(_hf_snapshot(hf_home, repo, "old000"), (1_000_000, 1_000_000))
    _hf_snapshot(hf_home, repo, "zzz999").mkdir()  # newest, but an interrupted download: no weights
    assert find_hub_weights("dinov2_vits14") == snapshot
    _assert_same_weights(load_backbone("dinov2_vits14"), released)


def test_cache_locations_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # torch.hub's fallback when TORCH_HOME is unset
    ckpt = tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_reg4_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    assert find_hub_weights("dinov2_vitb14_reg") == ckpt
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hfcache"))
    folder = tmp_path / "hfcache" / "models--facebook--dinov2-with-registers-giant" / "snapshots" / "r1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").touch()
    assert find_hub_weights("dinov2_vitg14_reg") == folder


def test_empty_caches_are_one_line_error_naming_both_places(caches):
    torch_home, hf_home = caches
    with pytest.raises(DinoforgeError) as e:
        load_backbone("dinov2_vits14")
    msg = str(e.value)
    assert "\n" not in msg
    for needle in (
        str(torch_home / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"),
        str(hf_home / "hub" / "models--facebook--dinov2-small" / "snapshots"),
        "facebook/dinov2-small",
        "--random-init",
    ):
        assert needle in msg, (needle, msg)
    with pytest.raises(DinoforgeError, match="takes no weights"):
        load_backbone("dinov2_vits14", weights="w.pth", random_init=True)


def test_cli_hub_name_without_weights_fails_and_random_init_runs(tmp_path):
    """conftest points the CLI subprocesses at empty caches."""
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((28, 28, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
    args = ["embed", "-m", "dinov2_vits14", "--data", str(data), "--size", "28", "--device", "cpu"]
    r = run_cli(*args, "--out", str(tmp_path / "no"))
    assert_one_line_error(r, "dinov2_vits14_pretrain.pth", "models--facebook--dinov2-small", "--random-init")
    assert not (tmp_path / "no").exists()
    r = run_cli(*args, "--random-init", "--out", str(tmp_path / "rand"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "rand" / "features.npy").shape == (2, 384)
