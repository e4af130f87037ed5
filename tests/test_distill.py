"""Distillation (DINOv2 §5): the loss of one step against a hand computation with plain torch ops, the frozen
teacher, no masking and no stochastic depth in the student, and the student's EMA as the exported result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train import _batch, tiny_cfg  # tests/ is on sys.path under pytest

STUDENT_TEMP, CENTER_MOMENTUM, T = 0.1, 0.9, 0.05


def teacher_checkpoint(tmp_path, separate: bool):
    """A wider, deeper SSL model whose teacher (perturbed away from its student) is saved as a training checkpoint;
    returns that teacher module (the reference) and the file."""
    from dinoforge.train.meta_arch import SSLMetaArch

    big = SSLMetaArch(
        tiny_cfg(
            "student.embed_dim=48",
            "student.depth=3",
            "student.num_heads=3",
            "student.layerscale=1.0",
            f"ibot.separate_head={separate}",
        )
    )
    with torch.no_grad():
        for p in big.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "teacher.pth"
    torch.save({"model": big.state_dict(), "arch": big.arch}, path)
    return big.teacher, path


def distill_model(path, centering: str, *extra: str):
    from dinoforge.train.meta_arch import SSLMetaArch

    cfg = tiny_cfg("student.layerscale=1.0", f"train.centering={centering}", "distillation.enabled=true", *extra)
    cfg.distillation.teacher_checkpoint = str(path)
    return SSLMetaArch(cfg).train()


def sinkhorn(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp as in SwAV, in float64: prototypes get mass 1/K, rows 1/B, alternately; rows sum to 1."""
    q = torch.exp(logits.double() / temp).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def teacher_probs(logits, centering: str, center):
    if centering == "sinkhorn_knopp":
        return sinkhorn(logits, T)
    return torch.softmax((logits.double() - center.double()) / T, dim=-1)


def cross_entropy(t, s):
    """Per-row −Σ_k t·log softmax(s / student temperature)."""
    return -(t * torch.log_softmax(s.double() / STUDENT_TEMP, dim=-1)).sum(-1)


def koleo(x):
    x = F.normalize(x.double(), dim=-1)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return -torch.log(d.min(dim=1).values + 1e-8).mean()


def expected_losses(model, teacher, batch, centering: str, centers) -> dict[str, torch.Tensor]:
    """The §5 objective by hand: the frozen teacher on the two global crops; the student on all crops unmasked;
    DINO over every (student crop, other teacher global crop) pair; iBOT on every patch of both global crops."""
    cfg = model.cfg
    n_local = cfg.crops.local_crops_number
    glob = batch["collated_global_crops"]
    b = glob.shape[0] // 2
    separate = "ibot_head" in teacher
    with torch.no_grad():
        t = teacher.backbone.forward_features(glob)
        t_cls = teacher.dino_head(t["x_norm_clstoken"])
        t_patch = (teacher.ibot_head if separate else teacher.dino_head)(t["x_norm_patchtokens"])
        t_cls_p = teacher_probs(t_cls, centering, centers["dino"])
        n, k = t_patch.shape[1], t_patch.shape[-1]
        t_patch_p = teacher_probs(t_patch.reshape(-1, k), centering, centers["ibot"]).reshape(2 * b, n, k)
    s_g = model.student.backbone.forward_features(glob)
    s_l = model.student.backbone.forward_features(batch["collated_local_crops"])
    s_global = model.student.dino_head(s_g["x_norm_clstoken"])
    s_local = model.student.dino_head(s_l["x_norm_clstoken"])
    s_patch = (model.student.ibot_head if separate else model.student.dino_head)(s_g["x_norm_patchtokens"])

    t_crops = t_cls_p.chunk(2)
    n_terms = 2 + 2 * n_local
    local = sum(cross_entropy(tg, sl).mean() for sl in s_local.chunk(n_local) for tg in t_crops) / n_terms
    sa, sb = s_global.chunk(2)
    glob_loss = (cross_entropy(t_crops[1], sa).mean() + cross_entropy(t_crops[0], sb).mean()) / n_terms
    kol = cfg.dino.koleo_loss_weight * sum(koleo(c) for c in s_g["x_norm_clstoken"].chunk(2))
    ibot = cross_entropy(t_patch_p, s_patch).mean(dim=1).mean()  # per image over its patches, then over images
    total = cfg.dino.loss_weight * (local + glob_loss) + kol + cfg.ibot.loss_weight * ibot
    centers = {
        "dino": CENTER_MOMENTUM * centers["dino"] + (1 - CENTER_MOMENTUM) * t_cls.mean(0),
        "ibot": CENTER_MOMENTUM * centers["ibot"] + (1 - CENTER_MOMENTUM) * t_patch.reshape(-1, k).mean(0),
    }
    losses = {
        "dino_local_crops_loss": local,
        "dino_global_crops_loss": glob_loss,
        "koleo_loss": kol,
        "ibot_loss": ibot,
        "total_loss": total,
    }
    return losses, centers


@pytest.mark.parametrize(("centering", "separate"), [("sinkhorn_knopp", True), ("centering", False)])
def test_distillation_loss_matches_hand_computation(tmp_path, centering, separate):
    """Two steps of forward_backward against the hand objective (the second step checks the softmax centre, which
    the first moved); the teacher is the checkpoint's, never gets a gradient; the batch's iBOT masks are ignored."""
    reference, path = teacher_checkpoint(tmp_path, separate)
    model = distill_model(path, centering)
    assert set(model.teacher) == set(reference)
    for k, v in reference.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k
    k = reference.dino_head.last_layer.weight_v.shape[0]
    centers = {"dino": torch.zeros(k), "ibot": torch.zeros(k)}
    for seed in (0, 1):
        batch = _batch(model.cfg, seed=seed)
        masks = batch["collated_masks"]
        assert masks.any() and not masks.all()  # masking the student, or iBOT on masked patches only, would differ
        got = model.forward_backward(batch, teacher_temp=T)
        want, centers = expected_losses(model, reference, batch, centering, centers)
        for name, value in want.items():
            assert torch.allclose(got[name].double(), value, rtol=1e-4, atol=1e-6), (seed, name, got[name], value)
    assert model.student.backbone.cls_token.grad is not None
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())


def test_student_has_no_stochastic_depth(tmp_path):
    """§5 removes stochastic depth: a student set to drop-path 0.3 gives the same output twice in train mode."""
    _, path = teacher_checkpoint(tmp_path, separate=True)
    model = distill_model(path, "sinkhorn_knopp", "student.drop_path_rate=0.3")
    x = torch.randn(4, 3, 16, 16)
    a, b = (model.student.backbone.forward_features(x)["x_norm_clstoken"] for _ in range(2))
    assert torch.equal(a, b)


def test_optimizer_step_moves_student_and_its_ema_not_the_teacher(tmp_path):
    """One training step by hand: AdamW changes only the student, the EMA update is m·ema + (1−m)·student for every
    parameter of the student's EMA, the teacher keeps the checkpoint's values, and the export is the EMA's backbone."""
    from dinoforge.models.weights import load_backbone
    from dinoforge.train.checkpoint import export_teacher
    from dinoforge.train.param_groups import apply_optim_scheduler
    from dinoforge.train.step import build_optimizer

    reference, path = teacher_checkpoint(tmp_path, separate=True)
    model = distill_model(path, "sinkhorn_knopp")
    optimizer = build_optimizer(model.cfg, model, fused=False)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in [*model.teacher.parameters(), *model.student_ema.parameters()]}
    apply_optim_scheduler(optimizer, lr=1e-2, wd=0.04, last_layer_lr=1e-2)
    ema_before = {k: v.clone() for k, v in model.student_ema.named_parameters()}
    student_before = {k: v.clone() for k, v in model.student.named_parameters()}
    model.forward_backward(_batch(model.cfg), teacher_temp=T)
    optimizer.step()
    m = 0.9
    model.update_teacher(m)

    student = dict(model.student.named_parameters())
    assert ema_before.keys() == student.keys()
    assert any(not torch.equal(student[k], student_before[k]) for k in student)
    for name, p in model.student_ema.named_parameters():
        assert torch.allclose(p, m * ema_before[name] + (1 - m) * student[name], atol=1e-6), name
    for k, v in reference.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k

    path = export_teacher(model.state_dict(), model.arch, tmp_path / "out.safetensors", model.export_prefix)
    exported = load_backbone(str(path))
    ema_backbone = model.student_ema.backbone.state_dict()
    assert exported.embed_dim == model.student.backbone.embed_dim
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ema_backbone[k]), k
    assert not torch.equal(exported.cls_token, model.student.backbone.cls_token)


def test_heads_trained_on_a_frozen_backbone_make_a_distillation_teacher(tmp_path):
    """The supervised-teacher route of scripts/distill_experiment.py: DINO/iBOT heads trained on a backbone file
    (here a perturbed random one stands for the supervised backbone) with the backbone frozen for every iteration
    leave the exported backbone bit-identical to the file, and their training checkpoint is a distillation teacher
    made of that backbone and the trained heads."""
    from safetensors.torch import load_file

    from dinoforge.models.weights import build_backbone, save_backbone
    from dinoforge.train import loop
    from dinoforge.train.checkpoint import list_checkpoints, load_checkpoint, load_distillation_teacher
    from dinoforge.train.meta_arch import backbone_kwargs

    big = ["student.embed_dim=48", "student.depth=3", "student.num_heads=3", "student.layerscale=1.0"]
    supervised = build_backbone(backbone_kwargs(tiny_cfg(*big)))
    with torch.no_grad():
        for p in supervised.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_backbone(supervised, tmp_path / "supervised.safetensors")
    cfg = tiny_cfg(*big, f"student.pretrained_weights={path}", "train.freeze_backbone_iters=8")  # all 2 × 4 iterations
    loop.train(cfg, tmp_path / "heads", "bundled:train", quiet=True)

    want, got = load_file(path), load_file(tmp_path / "heads" / "teacher_backbone.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    first, *_, last = list_checkpoints(tmp_path / "heads" / "checkpoints")
    first, last = load_checkpoint(first)["model"], load_checkpoint(last)["model"]
    heads = [k for k in last if k.startswith("teacher.dino_head.")]
    assert any(not torch.equal(first[k], last[k]) for k in heads)  # the teacher's heads learnt

    teacher, _ = load_distillation_teacher(str(list_checkpoints(tmp_path / "heads" / "checkpoints")[-1]), 4)
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(v, want[k]), k
    for k, v in teacher.dino_head.state_dict().items():
        assert torch.equal(v, last[f"teacher.dino_head.{k}"]), k
