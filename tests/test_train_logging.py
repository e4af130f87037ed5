"""Run reporting: the stall/collapse monitor on real runs (a stalled official-recipe run warns, a small-recipe run
does not) and curves.png drawn from metrics.csv."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from test_train import read_metrics, tiny_cfg  # tests/ is on sys.path under pytest

from dinoforge.train.logging import StallMonitor, plot_curves


def test_monitor_warns_once_after_the_grace_fraction(capsys):
    monitor = StallMonitor(max_iter=100, recipe="official")
    uniform = {"teacher_entropy": 0.9995, "teacher_cls_std": 0.8}
    assert monitor.check(10, uniform) == 0.0  # inside the first 30 % of the run: not yet
    assert capsys.readouterr().err == ""
    assert monitor.check(30, uniform) == 1.0
    assert monitor.check(40, uniform) == 1.0
    err = capsys.readouterr().err
    assert err.count("warning: DINO stalled at iteration 30") == 1 and "train.recipe=small" in err
    assert monitor.check(50, {"teacher_entropy": 0.80, "teacher_cls_std": 0.01}) == 1.0
    assert "CLS collapse at iteration 50" in capsys.readouterr().err
    assert set(monitor.warnings) == {"dino_uniform", "cls_collapse"}
    assert monitor.check(60, {"teacher_entropy": 0.80, "teacher_cls_std": 0.9}) == 0.0


def _run(tmp_path, name, *extra):
    """12 steps of the tiny config (width 64, batch 16) on 64 bundled images (the small recipe makes one epoch one
    pass: 4 steps, as the tiny config's official epoch)."""
    from dinoforge.data.datasets import BundledDataset
    from dinoforge.train.loop import train

    data = tmp_path / "images"
    if not data.exists():
        data.mkdir()
        val = BundledDataset("val")
        for i in range(64):
            val.pil(i).save(data / f"{i:02d}.png")
    out = tmp_path / name
    cfg = tiny_cfg("optim.epochs=3", "train.batch_size_per_gpu=16", "student.embed_dim=64", *extra)
    summary = train(cfg, out, data=str(data), quiet=True)
    return out, summary, read_metrics(out)


def test_stalled_official_run_is_reported_and_small_recipe_run_is_not(tmp_path):
    out, summary, rows = _run(tmp_path, "official")
    assert any("DINO stalled" in w for w in summary["warnings"])
    assert json.loads((out / "train_summary.json").read_text())["warnings"] == summary["warnings"]
    late = [r for r in rows if int(r["iteration"]) >= 4]
    assert late and all(float(r["stalled"]) == 1.0 for r in late)
    assert all(float(r["teacher_entropy"]) >= 0.99 for r in late)

    _, summary, rows = _run(tmp_path, "small", "train.recipe=small")
    assert summary["warnings"] == []
    assert all(float(r["stalled"]) == 0.0 for r in rows)
    assert max(float(r["teacher_entropy"]) for r in rows if int(r["iteration"]) >= 4) < 0.99


def test_curves_png_shows_every_panel(tmp_path):
    rows = [
        {"iteration": i, "total_loss": 9 - i, "ibot_loss": 3 - i / 9, "teacher_entropy": 1 - i / 50, "lr": 1e-3}
        for i in range(10)
    ]
    rows[-1]["knn_top1_cls"] = 61.5
    path = plot_curves(rows, tmp_path / "curves.png")
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape[1] > 3 * img.shape[0]  # four panels side by side
    # every quarter of the figure holds drawn (non-white) pixels: no empty panel
    for quarter in np.array_split(img, 4, axis=1):
        assert (quarter < 200).mean() > 0.02
    assert plot_curves([], tmp_path / "none.png") is None
