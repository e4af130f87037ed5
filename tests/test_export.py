"""ONNX export (onnxruntime vs PyTorch at several shapes) and the `dinoforge export` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_models import tiny
from typer.testing import CliRunner

from dinoforge.export.onnx import bicubic_matrix
from dinoforge.models import save_backbone


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("n_out", [4, 7, 16, 37, 39, 43, 74])
def test_bicubic_matrix_equals_interpolate(antialias, n_out):
    grid = torch.randn(1, 5, 37, 37)
    for off in (0.0, 0.1):
        if antialias and off:
            continue
        scale = 37 / (n_out + off)
        kw = {"scale_factor": (1 / scale, 1 / scale)} if off else {"size": (n_out, n_out)}
        ref = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
        w = bicubic_matrix(37, n_out, torch.tensor(scale), antialias)
        ours = torch.einsum("im,cmn,jn->cij", w, grid[0], w)
        assert (ours - ref[0]).abs().max().item() < 1e-5


@pytest.mark.slow
def test_onnx_matches_pytorch_dynamic_shapes(tmp_path):
    """Register model (antialiased size mode); the CLI test below covers the offset mode."""
    import onnxruntime as ort

    from dinoforge.export.onnx import export_onnx

    m = tiny(depth=2, img_size=56, num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    path = export_onnx(m, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 56, 56), (3, 3, 98, 126), (2, 3, 224, 224), (1, 3, 14, 28)):
        x = torch.randn(*shape)
        cls, patches = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            o = m.forward_features(x)
        assert np.abs(cls - o["x_norm_clstoken"].numpy()).max() < 1e-4
        assert np.abs(patches - o["x_norm_patchtokens"].numpy()).max() < 1e-4
    assert "interpolate_pos_encoding" not in vars(m)  # the export-time override is removed again


def _cli(args):
    from dinoforge.cli import app

    return CliRunner().invoke(app, args)


def test_cli_export_hf_and_timm(tmp_path):
    m = tiny(depth=1, img_size=56, embed_dim=128, num_heads=2)
    w = save_backbone(m, tmp_path / "w.safetensors")
    r = _cli(["export", "timm", "--weights", str(w), "--out", str(tmp_path / "timm")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "timm" / "export.json").read_text())
    assert info["timm_model"] == "vit_custom_patch14_dinov2" and str(tmp_path / "timm") in r.output
    sd = torch.load(tmp_path / "timm" / "model.pth", weights_only=True)
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], m.state_dict()["blocks.0.attn.qkv.weight"])
    r = _cli(["export", "hf", "-w", str(w), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 128
    r = _cli(["export", "hf", "-w", str(tmp_path / "nothing.pth"), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "weights not found" in str(r.exception)


@pytest.mark.slow
def test_cli_export_onnx_checks_with_onnxruntime(tmp_path):
    m = tiny(depth=1, img_size=56, embed_dim=64, num_heads=2)
    w = save_backbone(m, tmp_path / "w.safetensors")
    r = _cli(["export", "onnx", "-w", str(w), "-o", str(tmp_path / "onnx"), "--img-size", "56"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["check"]["max_abs_diff"] < 1e-4 and (tmp_path / "onnx" / "model.onnx").exists()
