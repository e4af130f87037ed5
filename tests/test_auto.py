"""`dinoforge train --data FOLDER` without -c: the rule table, what it reads from the images, the printed and saved
reasons, key=value over the choice, and `--time` fitting `train.max_iterations` to a budget from a probe."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_cli_errors import run_cli
from test_train import TINY, tiny_cfg

from dinoforge.train import auto
from dinoforge.train.auto import DataFacts, Machine, choose, configure, look_at_data, parse_duration
from dinoforge.utils import DinoforgeError


def test_small_grey_images_on_two_cores_get_the_demo_recipe():
    c = choose(DataFacts(10_000, 32, grey=True), Machine(cores=2))
    assert c.preset == "demo"
    assert "crops.global_crops_size" not in c.overrides and "student.embed_dim" not in c.overrides
    assert c.overrides["train.batch_size_per_gpu"] == 128 and c.overrides["train.max_iterations"] == 40_000 // 128
    assert c.overrides["train.recipe"] == "small"
    assert any(r.startswith("grey images") for r in c.reasons) and len(c.reasons) == 4


def test_larger_images_more_cores_and_few_images():
    c = choose(DataFacts(2400, 96, grey=False), Machine(cores=16))
    assert c.overrides["crops.global_crops_size"] == 64 and c.overrides["student.patch_size"] == 8
    assert c.overrides["student.embed_dim"] == 192 and c.overrides["student.depth"] == 6
    assert not any("grey" in r for r in c.reasons)
    assert choose(DataFacts(200, 96, False), Machine(2)).overrides["train.batch_size_per_gpu"] == 16  # 8+ steps/epoch
    assert choose(DataFacts(5, 96, False), Machine(2)).overrides["train.batch_size_per_gpu"] == 5


def test_a_gpu_gets_vits14_and_starts_from_released_weights_found_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    gpu = Machine(cores=16, gpu="NVIDIA H100", gpu_memory_gib=80)
    c = choose(DataFacts(1_000_000, 256, False), gpu)
    assert c.preset == "vits14" and c.overrides["train.batch_size_per_gpu"] == 128
    assert "student.pretrained_weights" not in c.overrides and any("random init" in r for r in c.reasons)
    released = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    released.parent.mkdir(parents=True)
    released.write_bytes(b"")
    c = choose(DataFacts(1_000_000, 256, False), gpu)
    assert c.overrides["student.pretrained_weights"] == str(released)
    assert choose(DataFacts(50_000, 28, False), Machine(16, "L4", 24)).overrides["student.embed_dim"] == 384


def test_look_at_data_counts_and_measures_a_folder(tmp_path):
    for i, (w, h) in enumerate([(40, 30), (100, 60), (70, 90)]):
        Image.new("L", (w, h), 30 * i).convert("RGB").save(tmp_path / f"{i}.png")
    assert look_at_data(str(tmp_path)) == DataFacts(3, 60, grey=True)
    Image.new("RGB", (50, 50), (200, 10, 10)).save(tmp_path / "red.png")
    assert look_at_data(str(tmp_path)) == DataFacts(4, 55, grey=False)


@pytest.mark.parametrize(("text", "seconds"), [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10 minutes", "-5m", "0s", "m"])
def test_parse_duration_rejects_bad_input(text):
    with pytest.raises(DinoforgeError, match="--time must be a positive duration"):
        parse_duration(text)


def test_time_budget_sets_the_steps_from_the_probe_unless_given(monkeypatch):
    monkeypatch.setattr(auto, "probe_step", lambda cfg, data: (0.5, 10.0))
    said: list[str] = []
    cfg = configure("demo", "bundled:train", [], 600.0, said.append)
    # 600 s less the 5 % margin, the probe's own (monkeypatched: ~0 s) time and 10 s outside the steps, at 0.5 s/step
    assert (
        1116 <= cfg.train.max_iterations <= 1120
        and cfg.evaluation.eval_period_iterations == cfg.train.max_iterations // 4
    )
    assert said == [f"[train] {r}" for r in cfg.train.auto_choice] and "0.500 s/step" in said[0]
    cfg = configure("demo", "bundled:train", ["train.max_iterations=7"], 600.0, said.append)
    assert cfg.train.max_iterations == 7 and "ignored" in cfg.train.auto_choice[0]
    with pytest.raises(DinoforgeError, match="too short"):
        configure("demo", "bundled:train", [], 12.0, said.append)


def test_probe_times_a_real_step(one_thread):
    cfg = tiny_cfg("train.max_iterations=1000")
    step_s, outside_s = auto.probe_step(cfg, "bundled:val")
    assert 0 < step_s < 60 and outside_s >= 0
    assert cfg.train.max_iterations == 1000  # the probe ran on a copy


def test_key_value_wins_over_the_choice(tmp_path):
    for i in range(20):
        Image.new("RGB", (96, 96), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    cfg = configure(None, str(tmp_path), ["crops.global_crops_size=16", "train.max_iterations=5"], None, print)
    assert cfg.crops.global_crops_size == 16 and cfg.crops.local_crops_size == 32 and cfg.train.max_iterations == 5
    assert cfg.student.patch_size == 8 and cfg.train.auto_choice[0] == "auto (no -c): preset demo"


def test_bad_override_fails_before_the_images_are_read(tmp_path):
    with pytest.raises(DinoforgeError, match="optim.epoch"):
        configure(None, str(tmp_path / "missing"), ["optim.epoch=3"], None)


@pytest.mark.slow
def test_train_time_budget_end_to_end(tmp_path):
    """`dinoforge train --data FOLDER --time 30s` (tiny model): prints its choice, fits the steps, saves the reasons."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(32):
        torch.manual_seed(i)
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    r = run_cli(
        "train",
        "--data",
        str(folder),
        "--time",
        "30s",
        "-o",
        str(tmp_path / "run"),
        *TINY,
        "train.checkpoint_period_iterations=10000",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("[train] ")]
    assert lines[0] == "[train] auto (no -c): preset demo" and "s/step" in lines[-1]
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert [f"[train] {x}" for x in cfg.train.auto_choice] == lines
    assert cfg.train.max_iterations >= 10 and f"{cfg.train.max_iterations} steps" in lines[-1]
