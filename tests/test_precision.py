"""What compute_precision.autocast=auto means on a CPU: bf16 only with bf16 matrix units and a measured gain."""

import os
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dinoforge.config.config import load_config
from dinoforge.train import precision
from dinoforge.train.precision import autocast_dtype, cpu_bf16_units, resolve_cpu_autocast, time_student_step

CPU = torch.device("cpu")
XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_bf16_units_are_read_from_the_cpu_flags():
    assert cpu_bf16_units(XEON) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_units(EPYC) == []
    assert cpu_bf16_units("") == []


@pytest.mark.parametrize(
    ("units", "fp32_s", "bf16_s", "expected"),
    [
        ([], 1.0, 0.1, "fp32"),  # no bf16 units: fp32 without timing anything
        (["amx_bf16"], 1.0, 0.5, "bf16"),  # 2x faster in bf16
        (["amx_bf16"], 1.0, 0.95, "fp32"),  # under the 1.1x margin
        (["avx512_bf16"], 0.145, 0.174, "fp32"),  # the demo model on AMX: slower in bf16
    ],
)
def test_auto_picks_bf16_only_with_units_and_a_measured_gain(monkeypatch, units, fp32_s, bf16_s, expected):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    timed = []

    def fake_time(cfg, dtype):
        timed.append(dtype)
        return bf16_s if dtype == torch.bfloat16 else fp32_s

    monkeypatch.setattr(precision, "time_student_step", fake_time)
    cfg, said = load_config("demo"), []
    resolve_cpu_autocast(cfg, CPU, None, said.append)
    assert cfg.compute_precision.autocast == expected
    assert autocast_dtype(cfg, CPU) == (torch.bfloat16 if expected == "bf16" else None)
    assert timed == ([None, torch.bfloat16] if units else [])
    assert (len(said) == 1 and f"-> {expected}" in said[0]) if units else said == []  # no units: nothing to say


def test_a_resumed_run_keeps_its_choice_and_explicit_values_are_left_alone(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["amx_bf16"])
    monkeypatch.setattr(precision, "time_student_step", lambda cfg, dtype: pytest.fail("resume must not re-time"))
    saved = load_config("demo", ["compute_precision.autocast=bf16"])
    cfg = load_config("demo")
    resolve_cpu_autocast(cfg, CPU, saved, lambda _: None)
    assert cfg.compute_precision.autocast == "bf16"
    explicit = load_config("demo", ["compute_precision.autocast=fp32"])
    resolve_cpu_autocast(explicit, CPU, None, lambda _: None)
    assert explicit.compute_precision.autocast == "fp32"
    on_cuda = load_config("demo")
    resolve_cpu_autocast(on_cuda, torch.device("cuda"), None, lambda _: None)
    assert on_cuda.compute_precision.autocast == "auto"  # CUDA keeps its own rule


def test_the_timing_probe_runs_the_student_in_both_precisions(monkeypatch):
    """The probe times a PROBE_DEPTH-block copy of the student at the global crop size, under the autocast asked."""
    from dinoforge.models.vision_transformer import DinoVisionTransformer

    real, seen = DinoVisionTransformer.forward_features, []

    def spy(self, x, masks=None):
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        seen.append((len(self.blocks), self.embed_dim, tuple(x.shape), amp))
        return real(self, x, masks)

    monkeypatch.setattr(DinoVisionTransformer, "forward_features", spy)
    cfg = load_config("demo")
    for dtype in (None, torch.bfloat16):
        assert time_student_step(cfg, dtype, repeats=1) > 0
    shape = (2, cfg.student.embed_dim, (16, 3, cfg.crops.global_crops_size, cfg.crops.global_crops_size))
    assert seen == [(*shape, torch.float32)] * 2 + [(*shape, torch.bfloat16)] * 2  # a warm-up and one timed run
    assert OmegaConf.select(cfg, "compute_precision.autocast") == "auto"  # the probe does not resolve anything


def test_train_writes_the_choice_and_resume_keeps_it_without_timing(tmp_path, monkeypatch, one_thread):
    from test_train import interrupted_then_resumed, read_metrics, tiny_cfg  # tests/ is on sys.path under pytest

    # (fp32 s, bf16 s) per start: the first measures bf16 2x faster; a resume that timed again would pick fp32
    per_start, timed = [(1.0, 0.5), (0.5, 1.0)], []

    def fake_time(cfg, dtype):
        timed.append(dtype)
        fp32_s, bf16_s = per_start[(len(timed) - 1) // 2]
        return bf16_s if dtype == torch.bfloat16 else fp32_s

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["amx_bf16"])
    monkeypatch.setattr(precision, "time_student_step", fake_time)
    cfg = partial(tiny_cfg, "train.OFFICIAL_EPOCH_LENGTH=2", "train.checkpoint_period_iterations=1")
    interrupted_then_resumed(cfg, tmp_path, monkeypatch, crash_at=1)
    assert timed == [None, torch.bfloat16]  # timed once, at the first start
    assert OmegaConf.load(tmp_path / "config.yaml").compute_precision.autocast == "bf16"  # rewritten by the resume
    assert [int(r["iteration"]) for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def _rank_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes whose bf16 probes disagree: rank 0's choice must be everyone's."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from dinoforge import distributed

    distributed.init_from_env("cpu")
    precision.cpu_bf16_units = lambda: ["amx_bf16"]
    choices = []
    for bf16_wins_on_rank0 in (True, False):
        bf16_s = 0.5 if (rank == 0) == bf16_wins_on_rank0 else 2.0  # rank 1 always measures the opposite
        precision.time_student_step = lambda cfg, dtype, b=bf16_s: b if dtype == torch.bfloat16 else 1.0
        cfg = load_config("demo")
        resolve_cpu_autocast(cfg, CPU, None, lambda _: None)
        choices.append(cfg.compute_precision.autocast)
    Path(out, f"rank{rank}.txt").write_text(" ".join(choices))
    distributed.shutdown()


def test_all_ranks_take_rank_zeros_choice(tmp_path):
    import torch.multiprocessing as mp
    from test_train import _free_port

    mp.start_processes(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank0.txt").read_text() == "bf16 fp32"
    assert (tmp_path / "rank1.txt").read_text() == "bf16 fp32"  # its own probe said fp32, then bf16
