"""Training: config handling, the meta-architecture's losses, exact resume, NaN stop, 2 processes == 1 process."""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinoforge.config.config import load_config
from dinoforge.data.datasets import build_dataset
from dinoforge.utils import DinoforgeError

TINY = [  # the official recipe: these tests check the official machinery with the values given here
    "train.recipe=official",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=8",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=4",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "train.log_period_iterations=1",
    "train.checkpoint_period_iterations=2",
]


def tiny_cfg(*extra: str):
    return load_config("demo", TINY + list(extra))


def read_metrics(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- config


def test_unknown_key_fails_naming_close_matches():
    with pytest.raises(DinoforgeError) as e:
        load_config("demo", ["optim.base_lrr=0.1"])
    assert "optim.base_lrr" in str(e.value) and "optim.base_lr" in str(e.value)
    with pytest.raises(DinoforgeError, match="student.arch"):
        load_config(None, ["student.arh=vit_small"])


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: 3\n  wight_decay: 0.1\n")
    with pytest.raises(DinoforgeError, match="optim.weight_decay"):
        load_config(bad)
    with pytest.raises(DinoforgeError, match="config not found"):
        load_config(tmp_path / "missing.yaml")


def test_official_config_layout_loads_and_overrides_apply():
    import dinov2.configs

    official = Path(dinov2.configs.__file__).parent / "ssl_default_config.yaml"
    cfg = load_config(official, ["optim.epochs=7", "crops.local_crops_number=0"])
    assert cfg.optim.epochs == 7 and cfg.crops.local_crops_number == 0
    assert cfg.student.arch == "vit_large" and cfg.train.centering == "centering"
    for preset in ("demo", "vits14", "vitb14", "vitl14", "vitl16_short", "vitg14"):
        load_config(preset)


# ---------------------------------------------------------------- meta-architecture


def _batch(cfg, B=4, seed=0):
    from dinoforge.data.collate import collate_data_and_cast
    from dinoforge.data.masking import MaskingGenerator

    g, loc, p = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    gen = torch.Generator().manual_seed(seed)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, loc, loc, generator=gen) for _ in range(cfg.crops.local_crops_number)],
            },
            (),
        )
        for _ in range(B)
    ]
    n = (g // p) ** 2
    return collate_data_and_cast(
        samples,
        (0.1, 0.5),
        0.5,
        torch.float32,
        n_tokens=n,
        mask_generator=MaskingGenerator((g // p, g // p), max_num_patches=0.5 * n),
    )


@pytest.mark.parametrize("separate", [False, True])
def test_losses_match_independent_computation_with_official_loss_classes(separate):
    """forward_backward's parts equal the recipe assembled by hand from the official dinov2.loss classes."""
    from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss

    from dinoforge.train.meta_arch import SSLMetaArch

    cfg = tiny_cfg("train.centering=centering", f"ibot.separate_head={separate}", "student.layerscale=1.0")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    with torch.no_grad():  # a teacher that differs from the student
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(cfg)
    got = model.forward_backward(batch, teacher_temp=0.05)

    K, T = cfg.dino.head_n_prototypes, 0.05
    n_local = cfg.crops.local_crops_number
    with torch.no_grad():
        t = model.teacher.backbone.forward_features(batch["collated_global_crops"])
        a, b = t["x_norm_clstoken"].chunk(2)
        t_cls = model.teacher.dino_head(torch.cat([b, a]))
        t_patch = t["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
        t_patch = (model.teacher.ibot_head if separate else model.teacher.dino_head)(t_patch)
    s_g = model.student.backbone.forward_features(batch["collated_global_crops"], masks=batch["collated_masks"])
    s_l = model.student.backbone.forward_features(batch["collated_local_crops"])
    dl, il = DINOLoss(K), iBOTPatchLoss(K)
    t_probs = dl.softmax_center_teacher(t_cls, T).view(2, -1, K)
    t_patch_probs = il.softmax_center_teacher(t_patch.unsqueeze(0), T).squeeze(0)
    s_local = model.student.dino_head(s_l["x_norm_clstoken"])
    s_global = model.student.dino_head(s_g["x_norm_clstoken"])
    s_patch = s_g["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
    s_patch = (model.student.ibot_head if separate else model.student.dino_head)(s_patch)
    terms = 2 + 2 * n_local
    want_local = dl(list(s_local.chunk(n_local)), list(t_probs)) / terms
    want_global = dl([s_global], [t_probs.flatten(0, 1)]) * 2 / terms
    want_koleo = cfg.dino.koleo_loss_weight * sum(KoLeoLoss()(c) for c in s_g["x_norm_clstoken"].chunk(2))
    want_ibot = il.forward_masked(
        s_patch,
        t_patch_probs,
        student_masks_flat=batch["collated_masks"],
        n_masked_patches=len(batch["mask_indices_list"]),
        masks_weight=batch["masks_weight"],
    )
    for name, want in [
        ("dino_local_crops_loss", want_local),
        ("dino_global_crops_loss", want_global),
        ("koleo_loss", want_koleo),
        ("ibot_loss", want_ibot),
    ]:
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-6), name
    total = want_local + want_global + want_koleo + want_ibot
    assert torch.allclose(got["total_loss"], total, rtol=1e-5)
    # the student got gradients, the teacher none
    assert model.student.backbone.cls_token.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    # the centre moved towards the batch mean (EMA update happened)
    assert model.dino_loss.center.abs().sum() > 0


def test_teacher_ema_update():
    from dinoforge.train.meta_arch import SSLMetaArch

    model = SSLMetaArch(tiny_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t0, t1, s in zip(before, model.teacher.parameters(), model.student.parameters(), strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)


# ---------------------------------------------------------------- the loop


RESUME_VARIANTS = {  # each resumes bit-identically; the last two draw stochastic depth from the global RNG
    "pil": ["crops.batched_augmentation=false"],
    "batched": ["crops.batched_augmentation=true"],
    "drop_path": ["crops.batched_augmentation=false", "student.drop_path_rate=0.3"],  # > 0.1: batch subsets
    "drop_path_workers": ["student.drop_path_rate=0.05", "train.num_workers=2"],  # ≤ 0.1: per-sample DropPath
    "on_device": ["crops.batched_augmentation=true", "crops.augment_on_device=true", "train.num_workers=2"],
}


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders logged the same metrics.csv rows (every column but timing) and exported the same teacher,
    bit for bit."""
    from dinoforge.models.weights import load_backbone

    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["iteration"] for r in rb] == [r["iteration"] for r in ra]
    for r_a, r_b in zip(ra, rb, strict=True):
        diff = {k: (v, r_b.get(k)) for k, v in r_a.items() if not k.endswith("images_per_s") and r_b.get(k) != v}
        assert not diff, (r_a["iteration"], diff)
    ta = load_backbone(a / "teacher_backbone.safetensors").state_dict()
    tb = load_backbone(b / "teacher_backbone.safetensors").state_dict()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.gpu  # the loop trains on CUDA when present
@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_train_writes_outputs_and_resume_is_exact(tmp_path, monkeypatch, one_thread, variant):
    """Per-sample PIL augmentation and batched augmentation in the collate function (crops.batched_augmentation),
    stochastic depth in both of its forms, data-loading workers, and the batched augmentation in the training
    process (crops.augment_on_device, here on the CPU: bit-identical to the loader's): interrupted after the
    checkpoint of iteration 3 and resumed, the run is bit-identical to an uninterrupted one."""
    from dinoforge.models.weights import load_backbone
    from dinoforge.train import loop

    cfg = partial(tiny_cfg, *RESUME_VARIANTS[variant])
    batched = cfg().crops.batched_augmentation
    dataset = build_dataset("bundled:train", split="train")
    assert (loop._build_loader(cfg(), dataset, 0, 1, 0).collate_fn.augment is not None) == batched
    full = tmp_path / "full"
    summary = loop.train(cfg(), full, data="bundled:train", quiet=True)
    assert Path(summary["teacher"]).exists()
    backbone = load_backbone(summary["teacher"])
    assert backbone.embed_dim == 32
    ref = read_metrics(full)
    assert [int(r["iteration"]) for r in ref] == list(range(8))
    assert all(math.isfinite(float(r["total_loss"])) for r in ref)

    part = tmp_path / "part"
    interrupted_then_resumed(cfg, part, monkeypatch, crash_at=3)
    assert_same_run(full, part)
    if variant == "on_device":
        loader_made = tmp_path / "loader"
        loop.train(tiny_cfg(*RESUME_VARIANTS["batched"]), loader_made, data="bundled:train", quiet=True)
        assert_same_run(full, loader_made)


def interrupted_then_resumed(cfg, out: Path, monkeypatch, crash_at: int, data: str = "bundled:train") -> None:
    """Train `cfg()` on `data` into `out`, interrupted right after the checkpoint of iteration `crash_at`, then resumed
    with --resume to the end."""
    from dinoforge.train import loop

    real = loop.save_training_state

    def crash_after(cfg, model, optimizer, it, *a, **k):
        path = real(cfg, model, optimizer, it, *a, **k)
        if it == crash_at:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_training_state", crash_after)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg(), out, data=data, quiet=True)
    monkeypatch.setattr(loop, "save_training_state", real)
    loop.train(cfg(), out, data=data, resume=True, quiet=True)


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
    from dinoforge.train import loop
    from dinoforge.train.meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def poisoned(self, batch, teacher_temp, scaler=None):
        out = real(self, batch, teacher_temp, scaler)
        calls["n"] += 1
        if calls["n"] == 3:
            out["total_loss"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(SSLMetaArch, "forward_backward", poisoned)
    with pytest.raises(
        DinoforgeError, match=r"non-finite loss at iteration 2 .*last good checkpoint: .*model_0000001\.pth"
    ):
        loop.train(tiny_cfg(), tmp_path, data="bundled:train", quiet=True)


def test_pretrained_weights_start(tmp_path):
    from dinoforge.models.weights import build_backbone, save_backbone
    from dinoforge.train.meta_arch import SSLMetaArch, backbone_kwargs

    cfg = tiny_cfg()
    src = build_backbone(backbone_kwargs(cfg))
    with torch.no_grad():
        src.cls_token.fill_(0.5)
    path = save_backbone(src, tmp_path / "w.safetensors")
    model = SSLMetaArch(cfg)
    model.load_pretrained(str(path))
    assert torch.equal(model.student.backbone.cls_token, src.cls_token)
    assert torch.equal(model.teacher.backbone.cls_token, src.cls_token)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, overrides: list[str], resume: bool = False) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DINOFORGE_NO_PROGRESS="1",
    )
    torch.set_num_threads(1)
    from dinoforge import distributed
    from dinoforge.train import loop

    loop.train(load_config("demo", overrides), Path(out), data="bundled:train", resume=resume, quiet=True)
    distributed.shutdown()


def _spawn(world: int, out: Path, overrides: list[str], resume: bool = False) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(world, _free_port(), str(out), overrides, resume), nprocs=world, start_method="spawn"
    )


# The 2-process == 1-process runs: a learning rate without warm-up and an EMA momentum of 0.5, so that the exported
# teacher moves far more over their 4 steps than the tolerance they are compared at (at the official 0.99 momentum
# and lr warm-up it moves about 1e-5, and a comparison at 1e-4 could not fail).
MOVING = [
    "optim.base_lr=0.05",
    "optim.warmup_epochs=0",
    "teacher.momentum_teacher=0.5",
    "teacher.final_momentum_teacher=0.5",
    "ibot.mask_sample_probability=0",  # masks are drawn per process batch: masked inputs would differ (1×8 vs 2×4)
]
AGREE = 1e-4  # max abs teacher difference allowed between the 1- and 2-process runs


def initial_export(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The exported backbone (teacher, or the student's EMA when distilling) as loop.train initialises it."""
    from dinoforge.train.data import seed_everything
    from dinoforge.train.meta_arch import SSLMetaArch

    cfg = load_config("demo", overrides)
    seed_everything(cfg.train.seed)
    model = SSLMetaArch(cfg)
    prefix = model.export_prefix
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def assert_moved_then_agree(init: dict, one: Path, two: Path) -> dict[str, torch.Tensor]:
    """The 1-process run's export moved from its init by more than 10× AGREE, and the 2-process run's is within
    AGREE of it; returns the 2-process export."""
    from dinoforge.models.weights import load_backbone

    a = load_backbone(one / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(two / "teacher_backbone.safetensors").state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 10 * AGREE, moved
    assert max((a[k] - b[k]).abs().max().item() for k in a) < AGREE, moved
    return b


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, mode):
    """Same global batch (8) as 1×8 and 2×4 over gloo, with data-parallel gradient averaging or FSDP2 sharding:
    identical losses and teacher (iBOT masks and KoLeo are per-process batch statistics by design, so they are
    switched off here). Under FSDP2, resuming from the sharded run's gathered checkpoint is exact as well."""
    from dinoforge.models.weights import load_backbone

    common = TINY + [
        "ibot.loss_weight=0",
        "dino.koleo_loss_weight=0",
        "train.centering=sinkhorn_knopp",
        "optim.epochs=1",
        f"train.distributed={mode}",
        *MOVING,
    ]
    two = common + ["train.batch_size_per_gpu=4"]
    _spawn(1, tmp_path / "one", common + ["train.batch_size_per_gpu=8"])
    _spawn(2, tmp_path / "two", two)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        assert float(rb["total_loss"]) == pytest.approx(float(ra["total_loss"]), rel=1e-4)
        assert float(rb["lr"]) == pytest.approx(float(ra["lr"]))  # sqrt scaling uses the global batch
    tb = assert_moved_then_agree(initial_export(common), tmp_path / "one", tmp_path / "two")
    if mode == "fsdp":  # drop the last checkpoint and resume from the one of iteration 1
        (tmp_path / "two" / "checkpoints" / "model_0000003.pth").unlink()
        (tmp_path / "two" / "teacher_backbone.safetensors").unlink()
        _spawn(2, tmp_path / "two", two, resume=True)
        c = read_metrics(tmp_path / "two")  # the same kernels on the same shards: exact, as the 1-process resume
        assert [r["total_loss"] for r in c] == [r["total_loss"] for r in b]
        tc = load_backbone(tmp_path / "two" / "teacher_backbone.safetensors").state_dict()
        assert all(torch.equal(tb[k], tc[k]) for k in tb)


def test_bf16_autocast_tracks_fp32_and_fsdp2_mixed_precision_runs(tmp_path):
    """The mixed-precision paths, exercised on CPU: bf16 autocast follows the fp32 run's losses within bf16
    accuracy; FSDP2 with its bf16 MixedPrecisionPolicy (bf16 parameters, fp32 gradient reduction) over
    2 processes × 4 follows the 1 × 8 bf16 run."""
    from dinoforge.train import loop

    for mode in ("fp32", "bf16"):
        loop.train(tiny_cfg(f"compute_precision.autocast={mode}"), tmp_path / mode, data="bundled:train", quiet=True)
    fp32, bf16 = ([float(r["total_loss"]) for r in read_metrics(tmp_path / m)] for m in ("fp32", "bf16"))
    assert all(math.isfinite(v) for v in bf16)
    # measured ≤ 0.4 % (AMD EPYC, AVX2: avx2 and default kernels); a step taken wrongly moves the losses 4.7 % and
    # no training at all 25 % (FP16_TOL below), so 1.5 % leaves room for other kernels and still catches either
    assert bf16 == pytest.approx(fp32, rel=1.5e-2)
    assert bf16 != fp32  # autocast did change the arithmetic

    common = TINY + [
        "ibot.loss_weight=0",
        "dino.koleo_loss_weight=0",
        "optim.epochs=1",
        "compute_precision.autocast=bf16",
    ]
    _spawn(1, tmp_path / "one", common + ["train.batch_size_per_gpu=8"])
    _spawn(2, tmp_path / "two", common + ["train.batch_size_per_gpu=4", "train.distributed=fsdp"])
    one, two = ([float(r["total_loss"]) for r in read_metrics(tmp_path / m)] for m in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-2)  # measured ≤ 0.2 % (AVX2); a wrong step moves them 4.7 %


# fp16 run against the fp32 run with the same skipped step, per metric. fp16 rounds each operation to 2^-11 ≈ 5e-4
# relative. The DINO and iBOT cross-entropies do not amplify it: measured ≤ 0.02 % over the 8 steps (AMD EPYC, AVX2:
# ATEN_CPU_CAPABILITY=avx2 and =default), so 1 % holds on other kernels and is still far below what a wrong step
# moves them (a step taken at 3: 4.7 % at step 4, 5.5 % on iBOT at step 5; no training at all: 25 % by step 7).
# KoLeo, −log of nearest-neighbour distances between near-identical CLS tokens, amplifies it (measured ≤ 2.1 % on
# its term, ≤ 0.35 % on the total): it is checked through the total, within 2 %. Against an fp32 run that does not
# skip step 3, the kernels' drift stacks on a 3.4 % step (4.03 % on an AVX-512 Xeon, issue 25): no tolerance there
# both holds and means something.
FP16_TOL = {"dino_local_crops_loss": 1e-2, "dino_global_crops_loss": 1e-2, "ibot_loss": 1e-2, "total_loss": 2e-2}


def test_fp16_autocast_with_grad_scaler(tmp_path, monkeypatch, one_thread):
    """fp16 autocast on CPU with the grad scaler (compute_precision.grad_scaler): an inf gradient injected at step 3
    is caught by the scaler: that optimizer step is skipped (the student is unchanged) and the scale halves, the run
    ends with finite losses, and its losses follow those of an fp32 run that skips the same step. Unscaled, the inf
    reaches AdamW, the student turns NaN and the run stops at the next loss."""
    from dinoforge.train import loop
    from dinoforge.train.meta_arch import SSLMetaArch
    from dinoforge.train.step import TrainStep

    real = SSLMetaArch.forward_backward
    seen = []  # per step: (scale before it, a student parameter before it)

    def record(self, batch, teacher_temp, scaler=None):
        seen.append((scaler.get_scale() if scaler else None, self.student.backbone.cls_token.detach().clone()))
        out = real(self, batch, teacher_temp, scaler)
        if len(seen) == 4:
            self.student.backbone.cls_token.grad[0, 0, 0] = float("inf")
        return out

    real_step, steps = TrainStep._optimizer_step, []

    def skip_step_3(self):  # the fp32 reference: the same run with step 3's update skipped, as the scaler should
        steps.append(None)
        if len(steps) != 4:
            real_step(self)

    monkeypatch.setattr(TrainStep, "_optimizer_step", skip_step_3)
    loop.train(tiny_cfg(), tmp_path / "fp32", data="bundled:train", quiet=True)
    monkeypatch.setattr(TrainStep, "_optimizer_step", real_step)
    monkeypatch.setattr(SSLMetaArch, "forward_backward", record)
    # this tiny model's parameter gradients reach ~1.4e3: from torch's default initial scale 2^16 the scaler would
    # (rightly) skip every one of the 8 steps while backing off; start it at 16, where none overflows by itself
    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, init_scale=16.0))
    loop.train(tiny_cfg("compute_precision.autocast=fp16"), tmp_path / "fp16", data="bundled:train", quiet=True)
    fp32, fp16 = ({k: [float(r[k]) for r in read_metrics(tmp_path / m)] for k in FP16_TOL} for m in ("fp32", "fp16"))
    assert all(math.isfinite(v) for v in fp16["total_loss"])
    for k, rel in FP16_TOL.items():
        assert fp16[k] == pytest.approx(fp32[k], rel=rel), k
    assert fp16["total_loss"] != fp32["total_loss"]  # autocast did change the arithmetic
    scales = [s for s, _ in seen]
    assert scales[:4] == [16.0] * 4 and scales[4:] == [8.0] * 4  # halved once, by the injected inf
    assert torch.equal(seen[3][1], seen[4][1])  # the step with the inf gradient was skipped
    assert not torch.equal(seen[2][1], seen[3][1]) and not torch.equal(seen[4][1], seen[5][1])  # the others were not


def test_distillation_under_fsdp_matches_one_process(tmp_path):
    """Distillation with FSDP2 (frozen teacher, student and its EMA sharded) over 2 processes × 4 equals 1 × 8."""
    from dinoforge.train.checkpoint import list_checkpoints

    base = TINY + ["ibot.loss_weight=0", "dino.koleo_loss_weight=0", "optim.epochs=1", *MOVING]
    _spawn(1, tmp_path / "teacher", base)
    ckpt = list_checkpoints(tmp_path / "teacher" / "checkpoints")[-1]
    distill = base + [
        "student.embed_dim=16",
        "student.num_heads=1",
        "distillation.enabled=true",
        f"distillation.teacher_checkpoint={ckpt}",
    ]
    _spawn(1, tmp_path / "one", distill + ["train.batch_size_per_gpu=8"])
    _spawn(2, tmp_path / "two", distill + ["train.batch_size_per_gpu=4", "train.distributed=fsdp"])
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [float(r["total_loss"]) for r in b] == pytest.approx([float(r["total_loss"]) for r in a], rel=1e-4)
    assert_moved_then_agree(initial_export(distill), tmp_path / "one", tmp_path / "two")


def test_cli_bad_key_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dinoforge", "train", "-o", str(tmp_path), "optim.epoch=3"],
        capture_output=True,
        text=True,
        env={**os.environ, "DINOFORGE_NO_PROGRESS": "1"},
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "optim.epochs" in r.stderr and "Traceback" not in r.stderr


def test_koleo_is_part_of_total_and_finite_at_batch_one():
    from dinoforge.losses import KoLeoLoss

    x = F.normalize(torch.randn(1, 8), dim=-1)
    assert torch.isfinite(KoLeoLoss()(x))


def test_distillation_from_a_training_checkpoint(tmp_path):
    """A tiny teacher run, then distillation into a narrower student: the teacher stays frozen, the EMA of the
    student is exported with the student's architecture, and a checkpoint without heads is refused."""
    from dinoforge.models.weights import load_backbone
    from dinoforge.train import loop
    from dinoforge.train.checkpoint import list_checkpoints, load_checkpoint

    loop.train(tiny_cfg("optim.epochs=1"), tmp_path / "teacher", data="bundled:train", quiet=True)
    ckpt = list_checkpoints(tmp_path / "teacher" / "checkpoints")[-1]
    cfg = tiny_cfg("optim.epochs=1", "student.embed_dim=16", "student.num_heads=1", "distillation.enabled=true")
    cfg.distillation.teacher_checkpoint = str(ckpt)
    summary = loop.train(cfg, tmp_path / "student", data="bundled:train", quiet=True)
    student = load_backbone(summary["teacher"])
    assert student.embed_dim == 16
    state = load_checkpoint(list_checkpoints(tmp_path / "student" / "checkpoints")[-1])["model"]
    original = load_checkpoint(ckpt)["model"]
    for k, v in original.items():
        if k.startswith("teacher."):
            assert torch.equal(state[k], v), k
    assert all(math.isfinite(float(r["ibot_loss"])) for r in read_metrics(tmp_path / "student"))

    cfg.distillation.teacher_checkpoint = str(tmp_path / "teacher" / "teacher_backbone.safetensors")
    with pytest.raises(DinoforgeError, match="needs a training checkpoint with heads|cannot read teacher"):
        loop.train(cfg, tmp_path / "bad", data="bundled:train", quiet=True)


@pytest.mark.slow
def test_training_improves_knn_and_linear_over_random_init(tmp_path):
    """End to end on the bundled data: a short run of the demo model beats the same architecture at random init,
    bundled train → val at the training resolution, in k-NN top-1 (CLS ⊕ mean patch token) and in the linear probe
    (best of the heads on the last 1/4 blocks' CLS ± mean patch token)."""
    from dinoforge.eval.features import dataset_features
    from dinoforge.eval.knn import backbone_knn_top1
    from dinoforge.eval.linear import linear_probe
    from dinoforge.models.weights import build_backbone, load_backbone
    from dinoforge.train import loop

    # the official recipe: its random init (LayerScale 1e-5, every CLS the same) is the baseline this margin was set
    # for; the small recipe's 156 steps measured +2.35 over its own, stronger random init (LayerScale 0.1)
    overrides = ["train.recipe=official", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=150"]
    cfg = load_config("demo", [*overrides, "train.batch_size_per_gpu=64"])
    summary = loop.train(cfg, tmp_path, data="bundled:train", quiet=True)
    trained = load_backbone(summary["teacher"])
    torch.manual_seed(0)
    random_init = build_backbone(trained.arch)
    size = cfg.crops.global_crops_size

    def linear_top1(net) -> float:
        tr, va = (
            dataset_features(net, "", "bundled:" + split, 256, size, False, n_last_blocks=4, split=split)
            for split in ("train", "val")
        )
        as_torch = lambda f: {k: torch.from_numpy(f[k]) for k in ("cls", "patch_avg", "labels")}  # noqa: E731
        return linear_probe(as_torch(tr), as_torch(va), epochs=10)["top1"]

    acc_trained = backbone_knn_top1(trained, image_size=size)["cls+avgpool"]
    acc_random = backbone_knn_top1(random_init, image_size=size)["cls+avgpool"]
    assert acc_trained > acc_random + 3.0, (acc_trained, acc_random)
    lin_trained, lin_random = linear_top1(trained), linear_top1(random_init)
    assert lin_trained > lin_random + 5.0, (lin_trained, lin_random)
