"""Mixed precision and memory: fp32 losses under autocast, the chunked cross-entropy, activation checkpointing,
FSDP2's MixedPrecisionPolicy."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinoforge.config.config import load_config
from dinoforge.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp, softmax_center
from dinoforge.losses.cross_entropy import soft_cross_entropy
from dinoforge.models import DinoVisionTransformer

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def _reference_ce(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """The unchunked formula in float64: −Σ_k t·log_softmax(s/T)."""
    return -(targets.double() * F.log_softmax(logits.double() / temp, dim=-1)).sum(-1)


@pytest.mark.parametrize("k, chunk_rows", [(65536, None), (131072, 3), (64, 1), (64, 5)])
def test_chunked_cross_entropy_equals_unchunked_loss_and_gradients(k, chunk_rows):
    logits = (3 * torch.randn(7, k)).requires_grad_()
    targets = torch.softmax(torch.randn(7, k) / 0.05, -1) * torch.tensor([[1.0], [2.0], [1], [1], [2], [1], [0.5]])
    weights = torch.rand(7)
    got = soft_cross_entropy(logits, targets, 0.1, chunk_rows=chunk_rows)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_()
    ref = _reference_ce(ref_logits, targets, 0.1)
    (g_ref,) = torch.autograd.grad((ref * weights.double()).sum(), ref_logits)
    assert got.dtype == torch.float32 and g_got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-4, atol=1e-6)


FP32_ULP = torch.finfo(torch.float32).eps  # 2^-23: one unit in the last place of fp32, relative


def test_chunked_cross_entropy_of_bf16_logits_is_fp32_with_bf16_gradients():
    """The loss is computed in fp32 and compared in fp32: each row is a sum of K = 1000 terms t·(−log p) of one
    sign (no cancellation), each a few fp32 roundings off, added in about log2(K) = 10 stages whose order depends on
    the CPU's vector width. 16 ulps relative bounds that on any kernel (measured: at most 1.6 ulps over 50 seeds on
    an AMD EPYC with AVX2 under ATEN_CPU_CAPABILITY=avx2 and =default; 1.0 ulp on an Intel Xeon under avx512, issue
    25); a row built from another row's targets or temperature, or left out of every chunk, is off by whole units.
    The gradient is fp32 rounded to bf16: within one bf16 ulp (2^-7 relative) of the exact one (rounding to nearest
    costs half of it, measured up to 0.5 ulp), atol for the entries where softmax·Σt − t cancels."""
    logits = torch.randn(6, 1000).bfloat16().requires_grad_()
    targets = torch.softmax(torch.randn(6, 1000), -1)
    with BF16:
        got = soft_cross_entropy(logits, targets, 0.1, chunk_rows=4)
    got.sum().backward()
    assert got.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    exact = logits.detach().double().requires_grad_()
    ref = _reference_ce(exact, targets, 0.1)
    (g_ref,) = torch.autograd.grad(ref.sum(), exact)
    torch.testing.assert_close(got, ref.float(), rtol=16 * FP32_ULP, atol=0)
    torch.testing.assert_close(logits.grad.float(), g_ref.float(), rtol=2**-7, atol=1e-5)


def test_losses_and_centering_compute_in_fp32_under_bf16_autocast():
    """Every loss and centring result under CPU bf16 autocast equals the fp32 computation on the same inputs."""
    s = [torch.randn(4, 256) for _ in range(3)]
    logits = torch.randn(8, 256) * 4
    t = [softmax_center(c, torch.zeros(1, 256), 0.04) for c in logits.chunk(2)]
    masks = torch.rand(2, 10) < 0.5
    masked = torch.randn(int(masks.sum()), 256)
    tm = torch.softmax(torch.randn(int(masks.sum()), 256) / 0.05, -1)
    # KoLeo: point 0's two neighbours differ by 1e-4 in cosine, below what bf16 dot products resolve
    base = F.normalize(torch.randn(64), dim=0)
    other = F.normalize(torch.randn(64) - base * (torch.randn(64) @ base), dim=0)
    pts = torch.stack([base, base * 0.9999 + other * 0.01414, base * 0.9998 + other * 0.02])
    pts = torch.cat([pts, 5 * torch.randn(3, 64)])
    koleo_x = pts.flip(0)  # the true neighbour of `base` has the lower index
    center = torch.randn(1, 256)

    def compute():
        return [
            DINOLoss(256)(s, t),
            iBOTPatchLoss(256).forward_masked(masked, tm, masks),
            KoLeoLoss()(koleo_x),
            sinkhorn_knopp(logits, 0.07),
            softmax_center(logits, center, 0.07),
        ]

    fp32 = compute()
    with BF16:
        assert torch.mm(s[0], s[0].t()).dtype == torch.bfloat16  # autocast is on
        low = compute()
    for a, b in zip(low, fp32, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _tiny_backbone(**kw) -> DinoVisionTransformer:
    arch = dict(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1.0)
    return DinoVisionTransformer(**arch, **kw)


@pytest.mark.parametrize("drop_path", [0.0, 0.05, 0.5])
def test_activation_checkpointing_keeps_outputs_and_gradients(drop_path):
    """fp32, list input (global + local crops, masks), stochastic depth in both forms: identical results."""
    torch.manual_seed(0)
    plain = _tiny_backbone(drop_path_rate=drop_path, num_register_tokens=2).train()
    ckpt = _tiny_backbone(drop_path_rate=drop_path, num_register_tokens=2).train()
    ckpt.load_state_dict(plain.state_dict())
    for b in ckpt.blocks:
        b.activation_checkpointing = True
    x, loc, masks = torch.randn(4, 3, 28, 28), torch.randn(6, 3, 14, 14), torch.rand(4, 4) < 0.5

    saved: dict[int, int] = {}  # elements autograd kept for backward, per model

    def run(model):
        torch.manual_seed(1)
        saved[id(model)] = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[id(model)] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.forward_features([x, loc], [masks, None])
        loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sin().sum() for o in out)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    (la, ga), (lb, gb) = run(plain), run(ckpt)
    assert saved[id(ckpt)] < saved[id(plain)] / 2  # the blocks' activations were not kept
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=0, msg=k)


def test_activation_checkpointing_config_key_reaches_the_student_blocks():
    from dinoforge.train.meta_arch import SSLMetaArch

    model = SSLMetaArch(load_config("demo", ["train.activation_checkpointing=true"]))
    assert all(b.activation_checkpointing for b in model.student.backbone.blocks)
    assert not any(b.activation_checkpointing for b in model.teacher.backbone.blocks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_mixed_precision_policy_bf16_params_fp32_master_and_gradients():
    """Single-process FSDP2 (gloo) with compute_precision.fsdp_param_dtype=bf16: the sharded master weights and
    their gradients stay fp32, the blocks compute with bf16 copies (outputs equal a bf16 model's), and the gradients
    follow the fp32 model's within bf16 accuracy."""
    from dinoforge.train.distributed import fully_shard_model
    from dinoforge.train.meta_arch import SSLMetaArch
    from dinoforge.train.precision import fsdp_param_dtype

    cfg = load_config("demo", ["compute_precision.fsdp_param_dtype=bf16", "student.drop_path_rate=0"])
    assert fsdp_param_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    assert fsdp_param_dtype(load_config("demo"), torch.device("cpu")) is None  # auto follows autocast: fp32 on CPU
    torch.manual_seed(0)
    ref = SSLMetaArch(cfg).student.backbone
    low = SSLMetaArch(cfg).student.backbone.to(torch.bfloat16)
    low.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
    x = torch.randn(2, 3, *(2 * [cfg.crops.global_crops_size]))
    w = torch.randn(ref.embed_dim)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = SSLMetaArch(cfg)
        model.student.backbone.load_state_dict(ref.state_dict())
        fully_shard_model(model, fsdp_param_dtype(cfg, torch.device("cpu")))
        out = model.student.backbone.forward_features(x)["x_norm_clstoken"]
        (out.float() * w).sum().backward()
        params = {k: p for k, p in model.student.backbone.named_parameters() if p.grad is not None}
        assert "blocks.0.attn.qkv.weight" in params
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params.values())
        grads = {k: p.grad.full_tensor() for k, p in params.items()}
    finally:
        dist.destroy_process_group()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, low.forward_features(x.bfloat16())["x_norm_clstoken"], rtol=0, atol=0)
    (ref.forward_features(x)["x_norm_clstoken"] * w).sum().backward()
    for k, p in ref.named_parameters():
        if k in grads and p.grad.abs().max() > 0:
            rel = (grads[k] - p.grad).norm() / p.grad.norm()
            assert rel < 0.05, (k, rel)  # measured ≤ 0.91 %: AMD EPYC (AVX2), avx2 and default kernels
