"""Sequence packing: the packed student (one token sequence per block, attention inside each crop) equals the
per-crop path, its reference, in outputs and gradients, with registers, iBOT masks and both stochastic depths."""

from __future__ import annotations

import pytest
import torch

from dinoforge.config.config import load_config
from dinoforge.models.layers import packing as packing_mod
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.train.meta_arch import SSLMetaArch, packing_backend
from dinoforge.utils import DinoforgeError

B = 3  # images: 2·B global crops of 16 px (16 patches), 4·B local crops of 8 px (4 patches)


def _student(drop_path: float = 0.0, ffn_layer: str = "mlp") -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, init_values=0.5, num_register_tokens=2,
        drop_path_rate=drop_path, drop_path_uniform=True, ffn_layer=ffn_layer,
    )  # fmt: skip
    with torch.no_grad():  # tokens that differ from each other, so that a leak across crops would show
        for p in (model.cls_token, model.register_tokens, model.mask_token):
            p.normal_()
    return model.train()


def _crops() -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(2 * B, 3, 16, 16, generator=gen), torch.randn(4 * B, 3, 8, 8, generator=gen)]
    masks = torch.rand(2 * B, 16, generator=gen) < 0.4
    masks[0] = False  # a crop without masked patches
    return x, [masks, None]


def _run(model: DinoVisionTransformer, packing: str | None):
    """Outputs and parameter gradients of a loss on every output of every crop (the RNG seeded the same)."""
    x, masks = _crops()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    out = model.forward_features(x, masks, packing=packing)
    gen = torch.Generator().manual_seed(3)
    loss = sum(
        (o[k] * torch.randn(o[k].shape, generator=gen)).sum() / o[k].numel()
        for o in out
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens")
    )
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to 1e-5 of the reference's scale (fp32 summation order differs between the paths)."""
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize(
    ("drop_path", "ffn_layer"),
    [(0.0, "mlp"), (0.1, "swiglu"), (0.3, "mlp")],
    ids=["no-drop-path", "droppath-0.1", "efficient-stochastic-depth-0.3"],
)
def test_packed_student_equals_per_crop(drop_path, ffn_layer):
    """CLS, register, patch and masked-patch tokens and every parameter gradient agree ≤ 1e-5 (fp32); with stochastic
    depth the packed path draws its random numbers in the per-crop order, so the same crops are dropped."""
    model = _student(drop_path, ffn_layer)
    ref, ref_grads = _run(model, None)
    got, got_grads = _run(model, "njt")
    _, masks = _crops()
    for r, g, m in zip(ref, got, masks, strict=True):
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert g[k].shape == r[k].shape
            _assert_close(g[k], r[k])
        if m is not None:
            assert torch.equal(g["masks"], m)
            _assert_close(g["x_norm_patchtokens"][m], r["x_norm_patchtokens"][m])
    assert set(got_grads) == set(ref_grads) and "mask_token" in ref_grads and "register_tokens" in ref_grads
    for name, grad in ref_grads.items():
        _assert_close(got_grads[name], grad)
    if drop_path:  # the draws matter: another seed gives other outputs
        torch.manual_seed(5)
        other = model.forward_features(*_crops(), packing="njt")
        assert not torch.allclose(other[0]["x_prenorm"], got[0]["x_prenorm"])


def test_flex_packing_forward_on_cpu_and_its_refused_backward():
    """flex_attention with a block mask gives the per-crop features; on CPU it has no backward, which is one error."""
    model = _student().eval()
    x, masks = _crops()
    with torch.no_grad():
        ref = model.forward_features(x, masks)
        got = model.forward_features(x, masks, packing="flex")
    for r, g in zip(ref, got, strict=True):
        _assert_close(g["x_prenorm"], r["x_prenorm"])
    with pytest.raises(DinoforgeError, match="no backward on CPU"):
        model.forward_features(x, masks, packing="flex")
    with pytest.raises(DinoforgeError, match="unknown packing backend 'dense'"):
        model.forward_features(x, masks, packing="dense")


def test_packing_backend_rule_and_config_key():
    """train.sequence_packing: true/false force it; null is on for CUDA and off on CPU; anything else is an error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packing_backend(None, cpu) is None and packing_backend(None, cuda) == "njt"
    assert packing_backend(True, cpu) == "njt" and packing_backend(False, cuda) is None
    assert load_config("demo").train.sequence_packing is None
    assert load_config("demo", ["train.sequence_packing=true"]).train.sequence_packing is True
    with pytest.raises(DinoforgeError, match="train.sequence_packing.*a bool or null"):
        load_config("demo", ["train.sequence_packing=maybe"])


TINY = [
    "train.recipe=official",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "student.num_register_tokens=1",
    "student.drop_path_rate=0.2",
    "student.layerscale=1.0",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
]


def _batch(cfg, n: int = 4) -> dict:
    from dinoforge.data.collate import collate_data_and_cast
    from dinoforge.data.masking import MaskingGenerator

    g, loc, p = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    gen = torch.Generator().manual_seed(0)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, loc, loc, generator=gen) for _ in range(cfg.crops.local_crops_number)],
            },
            (),
        )
        for _ in range(n)
    ]
    side = g // p
    return collate_data_and_cast(
        samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=side**2,
        mask_generator=MaskingGenerator((side, side), max_num_patches=0.5 * side**2),
    )  # fmt: skip


@pytest.mark.parametrize(("separate_head", "n_local"), [(False, 2), (True, 0)])
def test_training_step_is_the_same_packed_or_not(monkeypatch, separate_head, n_local):
    """forward_backward's losses and the student's gradients agree ≤ 1e-5 with train.sequence_packing true or
    false (drop path 0.2, a register, iBOT masks; no local crops too); the packed run does pack, and the DINO head
    takes every crop's CLS (and, shared, the masked patches) in one call."""
    layouts = []
    real = packing_mod.PackedLayout.__init__
    monkeypatch.setattr(packing_mod.PackedLayout, "__init__", lambda s, *a, **k: layouts.append(1) or real(s, *a, **k))
    extra = [f"ibot.separate_head={separate_head}", f"crops.local_crops_number={n_local}"]
    results, batch = {}, _batch(load_config("demo", [*TINY, *extra]))
    for packed in (False, True):
        cfg = load_config("demo", [*TINY, *extra, f"train.sequence_packing={packed}"])
        torch.manual_seed(0)
        model = SSLMetaArch(cfg).train()
        calls = []
        model.student.dino_head.register_forward_hook(lambda m, args, out, calls=calls: calls.append(len(args[0])))
        torch.manual_seed(1)
        losses = model.forward_backward(batch, teacher_temp=0.05)
        grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
        results[packed] = losses, grads
        assert bool(layouts) == packed
        n_cls = 4 * (2 + cfg.crops.local_crops_number)
        assert calls == [n_cls if separate_head else n_cls + len(batch["mask_indices_list"])]
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    assert set(got) == set(ref) and {"dino_global_crops_loss", "ibot_loss", "koleo_loss"} <= set(ref)
    for k, v in ref.items():
        _assert_close(got[k], v)
    assert set(got_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        _assert_close(got_grads[name], grad)
