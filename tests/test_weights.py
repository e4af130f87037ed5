"""Weights I/O: every format round-trips to identical features; mismatches and bad files are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_models import randomize_, tiny

from dinoforge import load_backbone
from dinoforge.models import DinoVisionTransformer, save_backbone
from dinoforge.models.weights import HUB_ARCHS, infer_arch, read_weights
from dinoforge.utils import DinoforgeError

X = torch.randn(2, 3, 56, 84, generator=torch.Generator().manual_seed(5))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        fa, fb = a.eval().forward_features(X), b.eval().forward_features(X)
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert torch.equal(fa[k], fb[k]), k


@pytest.fixture(scope="module")
def model():
    return tiny(embed_dim=128, num_heads=2, depth=2, img_size=56)


@pytest.fixture(scope="module")
def reg_model():
    return tiny(embed_dim=128, num_heads=2, depth=2, img_size=56, num_register_tokens=4,
                interpolate_antialias=True, interpolate_offset=0.0)  # fmt: skip


def test_hub_names_build_official_configs():
    with torch.device("meta"):
        m = load_backbone("dinov2_vits14_reg", device="meta", random_init=True)
    assert not m.training
    assert (m.num_register_tokens, m.interpolate_antialias, m.interpolate_offset) == (4, True, 0.0)
    assert m.pos_embed.shape == (1, 37 * 37 + 1, 384) and m.blocks[0].ls1.init_values == 1.0
    assert HUB_ARCHS["dinov2_vitg14"]["ffn_layer"] == "swiglufused" and HUB_ARCHS["dinov2_vitl14"]["depth"] == 24
    assert HUB_ARCHS["dinov2_vitb14"]["interpolate_offset"] == 0.1
    with pytest.raises(DinoforgeError, match="unknown backbone 'dinov2_vitx14'"):
        load_backbone("dinov2_vitx14")


def test_random_init_by_hub_name_is_the_same_in_every_call():
    """Ranks embedding shards of one curation run (or two runs of a random-init baseline) get the same weights."""
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    a = load_backbone("dinov2_vits14", random_init=True)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched
    b = load_backbone("dinov2_vits14", random_init=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["blocks.0.attn.qkv.weight"].std() > 0.01  # a real (truncated normal) init, not zeros


def test_safetensors_roundtrip_keeps_arch(model, tmp_path):
    odd = randomize_(DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                                           mlp_ratio=3.0, qkv_bias=False, init_values=None))  # fmt: skip
    for m in (model, odd):
        path = save_backbone(m, tmp_path / "w.safetensors")
        back = load_backbone(path)
        assert back.arch == m.arch
        _same(back, m)


def test_official_pth_infers_architecture(model, reg_model, tmp_path):
    for m in (model, reg_model):
        torch.save(m.state_dict(), tmp_path / "official.pth")
        arch = infer_arch(read_weights(tmp_path / "official.pth")[0])
        keys = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "num_register_tokens")
        expect = {k: m.arch[k] for k in (*keys, "interpolate_antialias", "interpolate_offset")}
        assert {k: arch[k] for k in expect} == expect
        _same(load_backbone(tmp_path / "official.pth"), m)


def test_training_checkpoints_prefer_teacher(model, tmp_path):
    student = randomize_(DinoVisionTransformer(**model.arch), seed=9)
    sd_t, sd_s = model.state_dict(), student.state_dict()
    head = {"dino_head.mlp.0.weight": torch.zeros(3, 3)}
    layouts = {
        "teacher.pth": {"teacher": {**{f"backbone.{k}": v for k, v in sd_t.items()}, **head}, "iteration": 7},
        "model.pth": {
            "model": {
                **{f"student.backbone.{k}": v for k, v in sd_s.items()},
                **{f"teacher.backbone.{k}": v for k, v in sd_t.items()},
            }
        },  # fmt: skip
        "module.pth": {"state_dict": {f"module.backbone.{k}": v for k, v in sd_t.items()}},
        "arch.pth": {"model": {f"teacher.backbone.{k}": v for k, v in sd_t.items()}, "arch": model.arch},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        _same(load_backbone(tmp_path / name, num_heads=2), model)
    assert load_backbone(tmp_path / "arch.pth").arch == model.arch
    torch.save({"model": {f"student.backbone.{k}": v for k, v in sd_s.items()}}, tmp_path / "s.pth")
    _same(load_backbone(tmp_path / "s.pth", num_heads=2), student)


def test_mismatches_are_listed(model, tmp_path):
    sd = dict(model.state_dict())
    sd.pop("norm.bias")
    sd["bogus.weight"] = torch.zeros(1)
    torch.save({"model": sd, "arch": model.arch}, tmp_path / "bad.pth")
    with pytest.raises(DinoforgeError) as e:
        load_backbone(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys (1): norm.bias" in msg and "unexpected keys (1): bogus.weight" in msg
    assert "\n" not in msg
    torch.save(model.state_dict(), tmp_path / "small.pth")
    with pytest.raises(DinoforgeError) as e:
        load_backbone("dinov2_vits14", weights=tmp_path / "small.pth")
    assert "shape mismatches" in str(e.value) and "cls_token (1, 1, 128) vs model (1, 1, 384)" in str(e.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_files_give_one_line_errors(model, tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), good)
    else:
        save_backbone(model, good)
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    text = tmp_path / f"text{suffix}"
    text.write_text("hello, not weights\n")
    for bad in (cut, text):
        with pytest.raises(DinoforgeError) as e:
            load_backbone(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(DinoforgeError, match="not a state dict"):
        load_backbone(tmp_path / "list.pth")
    with pytest.raises(DinoforgeError, match="not found"):
        load_backbone("dinov2_vits14", weights=tmp_path / "missing.pth")


def test_hf_folder_roundtrip_and_both_name_sets(model, reg_model, tmp_path):
    from transformers import AutoModel

    from dinoforge.export.hf import export_hf
    from dinoforge.models.formats.hf import hf_to_official

    for i, m in enumerate((model, reg_model)):
        folder = export_hf(m, tmp_path / f"hf{i}")
        names = json.loads((folder / "config.json").read_text())["architectures"]
        assert names == ["Dinov2WithRegistersModel" if i else "Dinov2Model"]
        _same(load_backbone(folder), m)  # hub (4.x) names on disk
        hf = AutoModel.from_pretrained(folder).eval()
        assert any(".q_proj." in k for k in hf.state_dict())  # transformers 5.x in-memory names
        fresh = DinoVisionTransformer(**m.arch)
        fresh.load_state_dict(hf_to_official(hf.state_dict()), strict=True)
        _same(fresh, m)
        with torch.no_grad():
            out = hf(pixel_values=torch.randn(1, 3, 56, 56)).last_hidden_state
        assert out.shape == (1, 1 + 4 * i + 16, 128)
        torch.save({f"dinov2.{k}": v for k, v in hf.state_dict().items()}, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        _same(load_backbone(folder), m)


def test_timm_state_dict_loads_into_timm(reg_model, tmp_path):
    import timm

    from dinoforge.export.timm import export_timm

    path = export_timm(reg_model, tmp_path / "timm.pth")
    tm = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, embed_dim=128,
                           num_heads=2, depth=2)  # fmt: skip
    tm.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, o = tm.eval().forward_features(x), reg_model.forward_features(x)
    ref = torch.cat([o["x_norm_clstoken"][:, None], o["x_norm_regtokens"], o["x_norm_patchtokens"]], dim=1)
    assert (a - ref).abs().max().item() <= 1e-5
    back = load_backbone(path, num_heads=2)
    assert back.num_register_tokens == 4 and back.interpolate_offset == 0.0
    _same(back, reg_model)


def test_timm_giant_swiglu_layout(tmp_path):
    import timm

    from dinoforge.models.formats.timm import official_to_timm, timm_to_official

    m = randomize_(DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=1536, depth=1, num_heads=24,
                                         init_values=1.0, ffn_layer="swiglufused"), scale=0.01)  # fmt: skip
    tm = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, img_size=28, depth=1)
    tm.load_state_dict(official_to_timm(m.state_dict()), strict=True)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a, o = tm.eval().forward_features(x), m.forward_features(x)
    assert (a[:, 0] - o["x_norm_clstoken"]).abs().max().item() <= 1e-5
    back = DinoVisionTransformer(**m.arch)
    back.load_state_dict(timm_to_official(tm.state_dict(), swiglu=True), strict=True)
    torch.save(tm.state_dict(), tmp_path / "timm_g.pth")
    assert load_backbone(tmp_path / "timm_g.pth").arch["ffn_layer"] == "swiglufused"
