"""`dinoforge finetune`: layer-wise lr decay and the lr schedule against hand values, the head (init and input:
the linear probe's CLS ⊕ mean patch features), a resume after epoch 1 bit-identical to an uninterrupted run, the
command's outputs and errors, and (slow) fine-tuning a freshly trained demo teacher beats the linear probe on its
frozen features."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_errors import assert_one_line_error, run_cli, run_main
from test_train_cli import write_bundled_images

from dinoforge.data.datasets import BundledDataset
from dinoforge.features import batch_features
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weights import load_backbone, save_backbone
from dinoforge.train import finetune as ft
from dinoforge.train.param_groups import apply_optim_scheduler

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, init_values=0.1)


def tiny(**kw) -> DinoVisionTransformer:
    torch.manual_seed(1)
    return DinoVisionTransformer(**(TINY | kw))


def bundled_list(path: Path, split: str, indices) -> str:
    """A labelled file list of bundled images (`bundled:train/17<TAB>label`)."""
    labels = BundledDataset(split).labels
    path.write_text("".join(f"bundled:{split}/{i}\t{int(labels[i])}\n" for i in indices))
    return str(path)


def test_layer_decay_gives_each_block_its_lr_and_no_decay_on_norms_biases():
    model = ft.Classifier(tiny(), 5)
    settings = ft.FinetuneSettings(layer_decay=0.5)
    optimizer = ft.build_optimizer(model, settings)
    apply_optim_scheduler(optimizer, 0.8, 0.05, 0.8)
    lr, wd = {}, {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr[names[id(p)]], wd[names[id(p)]] = group["lr"], group["weight_decay"]
    assert len(lr) == len(names)
    # depth 3: embeddings 0.5^4, block i 0.5^(3 - i), final norm and head 1
    hand = {
        "backbone.pos_embed": 0.05,
        "backbone.cls_token": 0.05,
        "backbone.patch_embed.proj.weight": 0.05,
        "backbone.blocks.0.attn.qkv.weight": 0.1,
        "backbone.blocks.1.mlp.fc1.weight": 0.2,
        "backbone.blocks.2.ls2.gamma": 0.4,
        "backbone.norm.weight": 0.8,
        "head.weight": 0.8,
        "head.bias": 0.8,
    }
    for name, value in hand.items():
        assert lr[name] == pytest.approx(value), name
    assert wd["head.weight"] == wd["backbone.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["head.bias"] == wd["backbone.norm.weight"] == wd["backbone.blocks.2.ls2.gamma"] == 0.0
    assert wd["backbone.blocks.1.norm1.bias"] == 0.0


def test_lr_schedule_warms_up_then_follows_the_half_cosine():
    settings = ft.FinetuneSettings(epochs=3, warmup_epochs=1, lr=1e-3, min_lr=1e-5)
    sched = ft.lr_schedule(settings, steps_per_epoch=4)
    assert len(sched) == 12
    got = [sched[i] for i in range(12)]
    warmup = [0.0, 1e-3 / 3, 2e-3 / 3, 1e-3]
    cosine = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    np.testing.assert_allclose(got, warmup + cosine, rtol=1e-12, atol=1e-15)
    assert sched[12] == 1e-5


def test_head_init_and_its_input_are_the_linear_probes():
    backbone = tiny()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = ft.Classifier(backbone, 7, "cls+avgpool", seed=3)
    assert model.head.weight.shape == (7, 64)
    assert torch.equal(model.head.bias, torch.zeros(7))
    assert (
        0.008 < float(model.head.weight.detach().std()) < 0.012
        and abs(float(model.head.weight.detach().mean())) < 0.002
    )
    assert torch.equal(ft.Classifier(tiny(), 7, seed=3).head.weight, model.head.weight)
    assert not torch.equal(ft.Classifier(tiny(), 7, seed=4).head.weight, model.head.weight)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert ft.Classifier(tiny(), 7, "cls").head.weight.shape == (7, 32)

    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():  # the evaluations' features: last block's normed CLS and mean normed patch token
        feats = batch_features(backbone, x, layers=1)
        want = model.head(torch.cat([feats["cls"][:, -1], feats["patch"][:, -1].mean(1)], dim=1))
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)


def _run(out: Path, data: tuple[str, str], **kw) -> dict:
    settings = ft.FinetuneSettings(epochs=3, batch_size=16, warmup_epochs=1, lr=2e-3, image_size=16, seed=5)
    resume = kw.pop("resume", False)
    return ft.finetune(
        tiny(drop_path_rate=0.3), *data, out, replace(settings, **kw), resume=resume, quiet=True, eval_batch_size=32,
        num_workers=1,  # crops drawn in a worker: the main process's RNG (drop path) is seeded per step alone
    )  # fmt: skip


@pytest.fixture
def small_lists(tmp_path) -> tuple[str, str]:
    return bundled_list(tmp_path / "train.txt", "train", range(64)), bundled_list(
        tmp_path / "val.txt", "val", range(32)
    )


def test_resume_after_epoch_one_is_bit_identical(tmp_path, small_lists, monkeypatch, one_thread):
    """Run A: 3 epochs straight. Run B: stopped right after its epoch-1 checkpoint, then --resume. Drop path 0.3
    (drawn per step) and random crops: the same losses, val top-1 and final weights, bit for bit."""
    a = _run(tmp_path / "a", small_lists)

    save = ft.save_checkpoint

    def save_then_die(ckpt_dir, epoch, payload, keep):
        save(ckpt_dir, epoch, payload, keep)
        raise KeyboardInterrupt  # a kill after the first checkpoint

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", small_lists)
    monkeypatch.setattr(ft, "save_checkpoint", save)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["model_0000000.pth"]
    b = _run(tmp_path / "b", small_lists, resume=True)

    assert [h["train_loss"] for h in a["epochs"]] == [h["train_loss"] for h in b["epochs"]]
    assert a["top1_per_epoch"] == b["top1_per_epoch"] and len(a["top1_per_epoch"]) == 3
    assert len({h["train_loss"] for h in a["epochs"]}) == 3
    for name in ("backbone.safetensors", "head.safetensors"):
        from safetensors.torch import load_file

        ta, tb = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    trained = load_backbone(tmp_path / "a" / "backbone.safetensors").state_dict()
    start = tiny().state_dict()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])

    with pytest.raises(ft.DinoforgeError, match="cannot resume .*lr=0.002 \\(now 0.001\\)"):
        _run(tmp_path / "b", small_lists, resume=True, lr=1e-3)


def test_command_writes_metrics_checkpoints_and_loadable_weights(tmp_path):
    """Class folders with a corrupt image: metrics.json with per-epoch top-1 and the settings, the skipped-image
    line, a checkpoint per epoch (the last two kept), backbone.safetensors that load_backbone reads, the head."""
    write_bundled_images(tmp_path / "train", 24, classes=3)
    (tmp_path / "train" / "c1" / "broken.png").write_bytes(b"\x89PNG cut short")
    val = tmp_path / "val"
    for i, path in enumerate(write_bundled_images(val, 9, classes=3)):
        path.rename(path.with_name(f"v{i}.png"))
    weights = save_backbone(tiny(), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    args = ["finetune", "--weights", str(weights), "--train-data", str(tmp_path / "train"), "--val-data", str(val)]
    r = run_cli(*args, "-o", str(out), "--epochs", "3", "-b", "8", "--image-size", "16", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"results in {out}" in r.stdout
    assert f"skipped 1 unreadable images (first: {tmp_path / 'train' / 'c1' / 'broken.png'})" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["top1_per_epoch"]) == 3 and m["top1"] == m["top1_per_epoch"][-1]
    assert all(0 <= t <= 100 and t * 9 / 100 == pytest.approx(round(t * 9 / 100)) for t in m["top1_per_epoch"])
    assert m["classes"] == ["c0", "c1", "c2"] and m["num_classes"] == 3
    assert m["settings"]["epochs"] == 3 and m["settings"]["layer_decay"] == 0.75
    assert m["model"]["drop_path_rate"] == 0.1 and m["skipped_images"] == 1
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["model_0000001.pth", "model_0000002.pth"]
    backbone = load_backbone(out / "backbone.safetensors")
    assert backbone.embed_dim == 32 and backbone.arch["drop_path_rate"] == 0.1
    from safetensors import safe_open

    with safe_open(str(out / "head.safetensors"), "pt") as f:
        assert f.get_tensor("weight").shape == (3, 64)
        assert json.loads(f.metadata()["classes"]) == ["c0", "c1", "c2"]


def test_command_errors_are_one_line(tmp_path, monkeypatch, capsys):
    write_bundled_images(tmp_path / "train", 4, classes=2)
    write_bundled_images(tmp_path / "val" / "c9", 1)
    weights = save_backbone(tiny(), tmp_path / "tiny.safetensors")
    args = ["finetune", "--weights", str(weights), "--train-data", str(tmp_path / "train"), "-o", str(tmp_path / "o")]
    r = run_main(monkeypatch, capsys, *args, "--features", "patch")
    assert_one_line_error(r, "--features", "cls+avgpool")
    r = run_main(monkeypatch, capsys, *args, "--val-data", str(tmp_path / "val"))
    assert_one_line_error(r, "c9", "not among the 2 train classes")
    (tmp_path / "u.txt").write_text("bundled:train/0\nbundled:train/1\n")
    r = run_main(monkeypatch, capsys, *args[:3], "--train-data", str(tmp_path / "u.txt"), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "u.txt has unlabelled images")
    r = run_main(monkeypatch, capsys, *args, "-b", "100")
    assert_one_line_error(r, "--batch-size 100", "4 train images")
    assert_one_line_error(run_main(monkeypatch, capsys, "finetune", "-o", str(tmp_path / "o")), "--model", "--weights")


@pytest.mark.slow
def test_finetuning_the_demo_teacher_beats_its_linear_probe(tmp_path, monkeypatch):
    """The issue's claim on the bundled data: a demo teacher (the demo preset, 20 steps of 64 on 1280 images), then
    the linear probe on its frozen features and fine-tuning, both on the same 2000 train images (bundled:train/0..1999)
    → the first 1000 val images, at 24 px (the teacher's crop size), 5 epochs. Measured (README, Fine-tuning): linear
    38.30, fine-tuned 47.20; 118 s in all on 2 cores."""
    from dinoforge.config.config import load_config
    from dinoforge.eval.linear import run_linear_eval
    from dinoforge.train.loop import train

    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    # the teacher the claim was measured on: the official init (from the xavier init that the small recipe draws since
    # 2026-12-07 the linear probe reads 55.1 and these 5 epochs of fine-tuning 52.8: not re-tuned yet)
    short = [
        "train.batch_size_per_gpu=64",
        "optim.epochs=1",
        "evaluation.eval_period_iterations=0",
        "train.small_recipe.init=official",
    ]
    teacher = train(
        load_config("demo", short),
        tmp_path / "teacher",
        bundled_list(tmp_path / "t.txt", "train", range(1280)),
        quiet=True,
    )["teacher"]
    train_list = bundled_list(tmp_path / "train.txt", "train", range(2000))
    val_list = bundled_list(tmp_path / "val.txt", "val", range(1000))
    net = load_backbone(teacher)
    linear = run_linear_eval(net, "demo-teacher", train_list, val_list, tmp_path / "linear", image_size=24)
    settings = ft.FinetuneSettings(epochs=5, batch_size=64, lr=2e-3, min_scale=0.5, image_size=24)
    tuned = ft.finetune(
        load_backbone(teacher, drop_path_rate=0.1), train_list, val_list, tmp_path / "ft", settings, quiet=True
    )
    assert tuned["top1"] > linear["top1"] + 1.0, (linear["top1"], tuned["top1"])
