"""The benchmarks time the step `dinoforge train` runs: benchmarks/train_step.py's step, fed the batches the loop's
loader yields, ends with the loop's weights, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinoforge.config.config import load_config
from dinoforge.train import loop
from dinoforge.train.data import seed_everything
from dinoforge.train.step import TrainStep

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = [
    "train.recipe=official",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=4",
    "student.drop_path_rate=0.2",  # the model's own randomness: the step seeds it the same way in both
    "crops.global_crops_size=16",
    "crops.local_crops_size=8",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "ibot.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "ibot.head_hidden_dim=32",
    "train.batch_size_per_gpu=8",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=3",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
]
STEPS = 3


class _Stop(Exception):
    """Ends the loop's run after its third step."""


@pytest.mark.gpu  # the loop trains on CUDA when present
@pytest.mark.parametrize("extra", [[], ["crops.batched_augmentation=true", "optim.clip_grad=0.01"]])
def test_benchmark_step_equals_loop_step_bit_for_bit(tmp_path, monkeypatch, one_thread, extra):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from harness import DinoforgeStep

    seen: dict = {"batches": []}

    class Recording(TrainStep):
        def __call__(self, it: int, batch: dict) -> dict[str, float]:
            seen["batches"].append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
            out = super().__call__(it, batch)
            if it == STEPS - 1:
                seen["cfg"], seen["state"] = self.cfg, {k: v.clone() for k, v in self.model.state_dict().items()}
                raise _Stop
            return out

    monkeypatch.setattr(loop, "TrainStep", Recording)
    with pytest.raises(_Stop):
        loop.train(load_config("demo", TINY + extra), tmp_path, data="bundled:train", quiet=True)

    cfg = seen["cfg"]  # as the loop finalised it
    seed_everything(cfg.train.seed)  # the loop's seed before it builds the model
    ours_device = next(iter(seen["state"].values())).device  # the loop's: CUDA when present
    bench = DinoforgeStep(cfg, ours_device)
    for batch in seen["batches"]:
        bench(batch)
    ours, theirs = bench.model.state_dict(), seen["state"]
    assert ours.keys() == theirs.keys()
    assert any(k.startswith("teacher.") for k in ours) and any(k.startswith("student.") for k in ours)
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differing, differing[:5]
