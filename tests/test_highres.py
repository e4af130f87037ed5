"""High-resolution adaptation (crops.highres, DINOv2 §4): the switch of crop sizes inside a run, the one resize of the
position embeddings and of AdamW's moments, schedules that carry on, exact resume on both sides of the switch, a
separate run from a training checkpoint at a larger size, the presets, and one-line errors."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from test_cli_errors import assert_one_line_error, run_main
from test_train import TINY, assert_same_run, interrupted_then_resumed, read_metrics, tiny_cfg

from dinoforge.config.config import PRESETS, load_config
from dinoforge.models.vision_transformer import resize_pos_embed
from dinoforge.train import highres, loop
from dinoforge.train.checkpoint import list_checkpoints, load_checkpoint
from dinoforge.train.meta_arch import SSLMetaArch
from dinoforge.train.schedules import build_schedulers
from dinoforge.utils import DinoforgeError

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY runs 8 iterations at 16/8 px crops (patch 4: a 4x4 grid); the last 3 (5, 6, 7) at 24/12 px (6x6)
HIGHRES = ["crops.highres.iterations=3", "crops.highres.global_crops_size=24", "crops.highres.local_crops_size=12"]
SWITCH = 5


def _pos(model) -> dict[str, torch.Tensor]:
    return {side: getattr(model, side).backbone.pos_embed.detach().clone() for side in ("student", "teacher")}


@pytest.mark.parametrize("batched", [False, True])
def test_switch_resizes_once_at_its_iteration_and_schedules_carry_on(tmp_path, monkeypatch, batched):
    """Crops (and masks) change size at iteration 5 exactly, in the PIL and the batched augmentation; the student's
    and teacher's position embeddings after the switch are resize_pos_embed of those before it, AdamW's first
    moment of it too; lr, wd, momentum and teacher temperature follow the run's schedules through the switch."""
    cfg = tiny_cfg(*HIGHRES, f"crops.batched_augmentation={str(batched).lower()}")
    seen, switches = [], []
    real_fb, real_switch = SSLMetaArch.forward_backward, loop.switch_resolution

    def record_batch(self, batch, teacher_temp, scaler=None):
        g, loc = batch["collated_global_crops"], batch["collated_local_crops"]
        seen.append((g.shape, loc.shape, batch["collated_masks"].shape, self.student.backbone.pos_embed.shape))
        return real_fb(self, batch, teacher_temp, scaler)

    def record_switch(model, optimizer, size):
        before = _pos(model)
        exp_avg = optimizer.state[model.student.backbone.pos_embed]["exp_avg"].clone()
        real_switch(model, optimizer, size)
        state = optimizer.state[model.student.backbone.pos_embed]
        tracked = any(p is model.student.backbone.pos_embed for g in optimizer.param_groups for p in g["params"])
        moments = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        switches.append((before, _pos(model), exp_avg, *moments, tracked, size))

    monkeypatch.setattr(SSLMetaArch, "forward_backward", record_batch)
    monkeypatch.setattr(loop, "switch_resolution", record_switch)
    loop.train(cfg, tmp_path, data="bundled:train", quiet=True)

    b = cfg.train.batch_size_per_gpu
    for it, (g, loc, masks, pos) in enumerate(seen):
        side, lside = (24, 12) if it >= SWITCH else (16, 8)
        assert g == (2 * b, 3, side, side) and loc == (2 * b, 3, lside, lside), it  # 2 local crops per image
        assert masks == (2 * b, (side // 4) ** 2) and pos == (1, 1 + (side // 4) ** 2, 32), it
    assert len(switches) == 1
    before, after, m_before, m_after, v_after, tracked, size = switches[0]
    assert size == 24 and tracked
    for side in ("student", "teacher"):  # the official interpolation (offset 0.1, bicubic) to the 6x6 grid, once
        torch.testing.assert_close(after[side], resize_pos_embed(before[side], (6, 6), 0.1, False), rtol=0, atol=0)
    torch.testing.assert_close(m_after, resize_pos_embed(m_before, (6, 6), 0.1, False), rtol=0, atol=0)
    assert v_after.shape == m_after.shape and bool((v_after > 0).all())

    rows = read_metrics(tmp_path)
    sched = build_schedulers(cfg)  # cfg was finalised by train(): the run's own values
    for r in rows:
        it = int(r["iteration"])
        for key, values in (("lr", sched.lr), ("wd", sched.wd), ("momentum", sched.momentum)):
            assert float(r[key]) == pytest.approx(values[it], rel=1e-6), (key, it)
        assert float(r["teacher_temp"]) == pytest.approx(sched.teacher_temp[it], rel=1e-6)
    last = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert last["iteration"] == 7 and last["arch"]["img_size"] == 24
    steps = {int(s["step"]) for s in last["optimizer"]["state"].values()}
    assert steps == {8}  # every parameter's AdamW step count ran on through the switch


@pytest.mark.parametrize("crash_at", [3, 5], ids=["before_switch", "after_switch"])
@pytest.mark.parametrize("batched", [False, True], ids=["pil", "batched"])
def test_resume_across_the_switch_is_bit_identical(tmp_path, monkeypatch, batched, crash_at):
    """Interrupted after the checkpoint of iteration 3 (base size: the resumed run makes the switch) or 5 (high-res:
    the resumed run rebuilds the 6x6 grid before restoring), the run ends bit-identical to an uninterrupted one."""
    cfg = partial(tiny_cfg, *HIGHRES, f"crops.batched_augmentation={str(batched).lower()}")
    loop.train(cfg(), tmp_path / "full", data="bundled:train", quiet=True)
    interrupted_then_resumed(cfg, tmp_path / "part", monkeypatch, crash_at=crash_at)
    assert_same_run(tmp_path / "full", tmp_path / "part")


def test_resume_with_another_highres_phase_is_a_one_line_error(tmp_path, monkeypatch):
    """A checkpoint of the high-res phase cannot resume into a config whose grid differs at its iteration."""
    cfg = partial(tiny_cfg, *HIGHRES, "optim.epochs=1", "crops.highres.iterations=1")  # switch at 3, checkpoint 3
    loop.train(cfg(), tmp_path, data="bundled:train", quiet=True)
    want = r"it trained at 24 px global crops, the config asks for 16 at its iteration 3; .*pretrained_weights"
    for other in ([], ["crops.highres.global_crops_size=32", "crops.highres.local_crops_size=16"]):
        with pytest.raises(DinoforgeError, match=want) as e:
            loop.train(tiny_cfg(*(HIGHRES + other if other else [])), tmp_path, "bundled:train", True, True)
        assert "\n" not in str(e.value)


def test_highres_checkpoint_continues_as_a_separate_run_at_a_larger_size(tmp_path):
    """student.pretrained_weights=<a dinoforge training checkpoint> at a larger crop size: student and teacher start
    from the checkpoint's teacher with its position embedding resized once, and its heads."""
    loop.train(tiny_cfg("optim.epochs=1"), tmp_path / "base", data="bundled:train", quiet=True)
    path = list_checkpoints(tmp_path / "base" / "checkpoints")[-1]
    saved = load_checkpoint(path)["model"]
    model = SSLMetaArch(tiny_cfg("crops.global_crops_size=24", "crops.local_crops_size=12"))
    model.load_pretrained(str(path))
    want = resize_pos_embed(saved["teacher.backbone.pos_embed"], (6, 6), 0.1, False)
    for side in ("student", "teacher"):
        got = getattr(model, side).state_dict()
        torch.testing.assert_close(got["backbone.pos_embed"], want, rtol=0, atol=0)
        for k, v in saved.items():
            if k.startswith("teacher.") and "pos_embed" not in k:
                assert torch.equal(got[k[len("teacher.") :]], v), (side, k)
    cont = loop.train(
        tiny_cfg("crops.global_crops_size=24", "crops.local_crops_size=12", f"student.pretrained_weights={path}"),
        tmp_path / "cont",
        data="bundled:train",
        quiet=True,
    )
    assert cont["iterations"] == 8 and read_metrics(tmp_path / "cont")[-1]["total_loss"] != "nan"


@pytest.mark.parametrize("name", ["vitl14_highres", "vitg14_highres"])
def test_highres_presets_load_and_resolve(name):
    """The paper's adaptation: 518 px global crops for 10k iterations, every schedule of the base preset compressed
    into them, from the pretrained weights given on the command line."""
    assert name in PRESETS
    cfg = load_config(name, ["student.pretrained_weights=ckpt.pth"])
    base = load_config(name.removesuffix("_highres"))
    assert cfg.crops.global_crops_size == 518 and cfg.crops.global_crops_size % cfg.student.patch_size == 0
    assert cfg.crops.local_crops_size % cfg.student.patch_size == 0 and cfg.crops.highres.iterations == 0
    assert cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH == 10_000
    for key in ("optim.epochs", "optim.warmup_epochs", "teacher.warmup_teacher_temp_epochs"):  # compressed, not cut
        sec, k = key.split(".")
        assert cfg[sec][k] == base[sec][k], key
    assert cfg.optim.base_lr < base.optim.base_lr  # "except the base learning rate which is reduced"
    assert highres.check_crop_phases(cfg)[0].global_size == 518
    assert cfg.student.arch == base.student.arch


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["crops.highres.iterations=8"], "crops.highres.iterations=8 must be between 1 and 7"),
        (["crops.highres.iterations=-1"], "must be between 1 and 7"),
        (["crops.highres.global_crops_size=12"], "crops.highres.global_crops_size=12 must be larger than"),
        (["crops.highres.global_crops_size=16"], "must be larger than crops.global_crops_size=16"),
        (["crops.highres.global_crops_size=26"], "local_crops_size (26, 12) must be multiples of student.patch_size 4"),
        (["crops.highres.local_crops_size=4"], "crops.highres.local_crops_size=4 must be between"),
        (["crops.highres.iterations=abc"], "crops.highres.iterations"),
    ],
)
def test_bad_highres_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, overrides, needle):
    hr = dict(kv.split("=") for kv in HIGHRES)
    hr.update(kv.split("=") for kv in overrides)
    args = ["train", "-c", "demo", "-o", str(tmp_path), *TINY, *(f"{k}={v}" for k, v in hr.items())]
    assert_one_line_error(run_main(monkeypatch, capsys, *args), needle)
    assert not (tmp_path / "checkpoints").exists()
