"""Video eval: frame sampling, clip averaging vs per-frame forwards of the official ViT, e2e on frames."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoforge.data.transforms import eval_transform
from dinoforge.eval.video import (
    Clip,
    average_per_clip,
    clip_features,
    list_clips,
    run_video_eval,
    sample_indices,
)
from dinoforge.utils import DinoforgeError


def tiny_official_vit():
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, init_values=1)


def make_clips(root: Path, n_per_class: int, n_frames: int, seed: int) -> None:
    """Two classes: frames dominated by red (class a) or blue (class b), with noise and a moving bar."""
    rng = np.random.default_rng(seed)
    for cls, channel in (("a", 0), ("b", 2)):
        for c in range(n_per_class):
            d = root / cls / f"clip{c}"
            d.mkdir(parents=True)
            for f in range(n_frames):
                img = rng.integers(0, 90, size=(40, 40, 3)).astype(np.uint8)
                img[..., channel] = rng.integers(150, 255, size=(40, 40))
                img[:, (3 * f) % 40] = 255
                Image.fromarray(img).save(d / f"{f:03d}.png")


def test_sample_indices_are_segment_centres():
    assert sample_indices(10, 5) == [1, 3, 5, 7, 9]
    assert sample_indices(16, 4) == [2, 6, 10, 14]
    assert sample_indices(2, 4) == [0, 0, 1, 1]
    assert sample_indices(1, 3) == [0, 0, 0]
    with pytest.raises(DinoforgeError):
        sample_indices(0, 2)


def test_average_per_clip_matches_numpy():
    x = torch.randn(12, 5)
    ids = torch.tensor([0, 0, 0, 2, 2, 1, 1, 1, 1, 2, 0, 1])
    ref = np.stack([x.double().numpy()[ids.numpy() == c].mean(0) for c in range(3)])
    # summed in float64 and rounded once to fp32: within half an fp32 ulp of the float64 mean (rtol: one ulp). A float32
    # reference would carry its own summation error, relative to means that may nearly cancel.
    np.testing.assert_allclose(average_per_clip(x, ids, 3).numpy(), ref, rtol=np.finfo(np.float32).eps, atol=0)


def test_clip_features_are_means_of_sampled_frame_features(tmp_path: Path):
    make_clips(tmp_path, 2, 6, seed=0)
    clips, classes = list_clips(tmp_path)
    assert classes == ["a", "b"] and [c.label for c in clips] == [0, 0, 1, 1]
    vit = tiny_official_vit().eval()
    got = clip_features(vit, clips, t=3, image_size=32, batch_size=4)
    tf = eval_transform(resize=round(32 * 256 / 224), crop=32)
    with torch.no_grad():
        for i, clip in enumerate(clips):
            frames = sorted(clip.path.iterdir())
            x = torch.stack([tf(Image.open(frames[j]).convert("RGB")) for j in sample_indices(6, 3)])
            ref = vit.forward_features(x)["x_norm_clstoken"].mean(0)
            torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-5)


def test_list_clips_errors(tmp_path: Path):
    with pytest.raises(DinoforgeError, match="not found"):
        list_clips(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(DinoforgeError, match="no clips"):
        list_clips(tmp_path)
    make_clips(tmp_path / "v", 1, 2, seed=0)
    with pytest.raises(DinoforgeError, match="not in the train set"):
        list_clips(tmp_path / "v", ["a"])


def test_video_file_without_decoder_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError, as when not installed
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"\x00" * 16)
    clips, _ = list_clips(tmp_path)
    assert clips == [Clip(tmp_path / "a" / "x.mp4", 0)]
    with pytest.raises(DinoforgeError, match="PyAV"):
        clip_features(tiny_official_vit().eval(), clips, t=2, image_size=32)


def test_run_video_eval_separates_colour_classes(tmp_path: Path):
    make_clips(tmp_path / "train", 6, 4, seed=1)
    make_clips(tmp_path / "val", 3, 4, seed=2)
    res = run_video_eval(tiny_official_vit(), tmp_path / "train", tmp_path / "val", tmp_path / "out",
                         frames=2, image_size=32, ks=[3], n_c=5)  # fmt: skip
    assert res["knn"]["k=3"]["top1"] == 100.0
    assert res["logreg"]["top1"] == 100.0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["num_train"] == 12 and saved["classes"] == ["a", "b"]


def test_video_file_frames_are_sampled_in_order(tmp_path: Path):
    av = pytest.importorskip("av")
    from dinoforge.eval.video import clip_frames

    levels = [0, 50, 100, 150, 200, 250]
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for v in levels:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), v, dtype=np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    clips, _ = list_clips(tmp_path)
    frames = clip_frames(clips[0], 3)
    means = [float(np.asarray(f).mean()) for f in frames]
    assert means == pytest.approx([levels[i] for i in sample_indices(6, 3)], abs=6)


@pytest.mark.slow
def test_video_command_end_to_end_with_cache(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from dinoforge.cli import app
    from dinoforge.models.vision_transformer import DinoVisionTransformer
    from dinoforge.models.weights import save_backbone

    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, init_values=1.0)
    weights = save_backbone(vit, tmp_path / "tiny.safetensors")
    make_clips(tmp_path / "train", 5, 4, seed=3)
    make_clips(tmp_path / "val", 2, 4, seed=4)
    monkeypatch.setenv("DINOFORGE_CACHE_DIR", str(tmp_path / "cache"))
    args = ["eval", "video", "--weights", str(weights), "--train-data", str(tmp_path / "train"),
            "--val-data", str(tmp_path / "val"), "--frames", "3", "--image-size", "32", "--k", "3",
            "--n-c", "4", "--device", "cpu"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "o1") in res.output
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    m1, m2 = (json.loads((tmp_path / o / "metrics.json").read_text()) for o in ("o1", "o2"))
    assert m1 == m2 and m1["knn"]["k=3"]["top1"] == 100.0
