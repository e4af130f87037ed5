"""Multi-crop augmentation: output layout, blur/solarize/grayscale rates measured over many draws in both blur
modes, the official DataAugmentationDINO's measured (inverted) blur rates, and tiny crops."""

import numpy as np
import pytest
import torch
from dinov2.data.augmentations import DataAugmentationDINO as OfficialAugmentation
from PIL import Image
from torchvision.transforms import functional as TF

from dinoforge.data import augment as augment_module
from dinoforge.data.augment import DataAugmentationDINO, gaussian_blur
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD

N_DRAWS = 300


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny per-image ops


def _image(size: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def calls(monkeypatch):
    """Record the side length of every image that gets blurred (by ours or torchvision's, which the official
    augmentation uses) or solarized."""
    seen = {"blur": [], "solarize": []}
    solarize = TF.solarize

    def counting(blur):
        def counting_blur(img, *args, **kwargs):
            seen["blur"].append(TF.get_image_size(img)[0])
            return blur(img, *args, **kwargs)

        return counting_blur

    def counting_solarize(img, *args, **kwargs):
        seen["solarize"].append(TF.get_image_size(img)[0])
        return solarize(img, *args, **kwargs)

    monkeypatch.setattr(TF, "gaussian_blur", counting(TF.gaussian_blur))
    monkeypatch.setattr(augment_module, "gaussian_blur", counting(gaussian_blur))
    monkeypatch.setattr(TF, "solarize", counting_solarize)
    return seen


def _rates(augment, seen) -> dict[str, float]:
    """Per-draw rates: blurred global crops (32 px), blurred local crops (16 px, per crop), solarized."""
    img = _image()
    for _ in range(N_DRAWS):
        augment(img)
    return {
        "global": seen["blur"].count(32) / N_DRAWS,
        "local": seen["blur"].count(16) / (2 * N_DRAWS),
        "solarize": len(seen["solarize"]) / N_DRAWS,
    }


def test_layout():
    out = DataAugmentationDINO(local_crops_number=3, global_crops_size=32, local_crops_size=16)(_image())
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [t.shape for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"], strict=True))
    assert out["offsets"] == ()
    assert out["global_crops"][0].dtype == torch.float32


def test_intended_blur_rates(calls):
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    rates = _rates(aug, calls)
    # global crop 1 always blurred, global crop 2 with p 0.1: 1.1 blurred global crops per draw
    assert rates["global"] == pytest.approx(1.1, abs=0.06)
    assert rates["local"] == pytest.approx(0.5, abs=0.07)
    assert rates["solarize"] == pytest.approx(0.2, abs=0.07)
    assert (aug.blur_global1.p, aug.blur_global2.p, aug.blur_local.p) == (1.0, 0.1, 0.5)


def test_official_blur_flag_reproduces_the_official_rates(calls):
    ours = _rates(
        DataAugmentationDINO(local_crops_number=2, global_crops_size=32, local_crops_size=16, official_blur=True),
        calls,
    )
    calls["blur"].clear()
    calls["solarize"].clear()
    ref = _rates(OfficialAugmentation((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=32, local_crops_size=16), calls)
    # official: global crop 1 never blurred, global crop 2 blurred with p 0.9
    assert ref["global"] == pytest.approx(0.9, abs=0.06) and ours["global"] == pytest.approx(0.9, abs=0.06)
    assert ref["local"] == pytest.approx(0.5, abs=0.07) and ours["local"] == pytest.approx(0.5, abs=0.07)
    assert abs(ours["solarize"] - ref["solarize"]) < 0.1


def test_grayscale_rate():
    aug = DataAugmentationDINO(local_crops_number=0, global_crops_size=16, local_crops_size=8)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    img, gray = _image(), 0
    for _ in range(N_DRAWS):
        crop = aug(img)["global_crops"][0] * std + mean
        gray += bool(torch.allclose(crop[0], crop[1], atol=1e-3) and torch.allclose(crop[1], crop[2], atol=1e-3))
    assert gray / N_DRAWS == pytest.approx(0.2, abs=0.07)


def test_tiny_crops_and_grayscale_input():
    aug = DataAugmentationDINO(local_crops_number=4, global_crops_size=8, local_crops_size=4)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))  # mode "L"
    for _ in range(30):
        out = aug(img)
        assert out["local_crops"][0].shape == (3, 4, 4)
        assert all(torch.isfinite(t).all() for t in out["global_crops"] + out["local_crops"])


def test_blur_sigma_scale(monkeypatch):
    """blur_sigma_scale multiplies the sigma range (0.1, 2.0) of every blur."""
    sigmas = []

    def recording_blur(img, kernel_size, sigma):
        sigmas.append(sigma)
        return gaussian_blur(img, kernel_size, sigma)

    monkeypatch.setattr(augment_module, "gaussian_blur", recording_blur)
    augment = DataAugmentationDINO(
        local_crops_number=2, global_crops_size=32, local_crops_size=16, blur_sigma_scale=0.1
    )
    for _ in range(40):
        augment(_image())
    assert sigmas and 0.01 <= min(sigmas) and max(sigmas) <= 0.2
    assert max(sigmas) > 0.1  # the scaled range is used, not a constant


def test_gaussian_blur_matches_torchvision():
    """Our separable blur against torchvision's 2-D one (what the official augmentation calls): same kernel,
    padding and rounding, so pixels differ by at most one grey level (float summation order), rarely."""
    rng = np.random.default_rng(0)
    mismatched = total = 0
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        mode_shape = (h, w) if trial % 3 == 0 else (h, w, 3)
        img = Image.fromarray(rng.integers(0, 256, mode_shape, dtype=np.uint8))
        kernel = min(9, 2 * min(h, w) - 1)
        sigma = float(rng.uniform(0.1, 2.0))
        ours = np.asarray(gaussian_blur(img, kernel, sigma)).astype(int)
        ref = np.asarray(TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])).astype(int)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1
        mismatched += int((ours != ref).sum())
        total += ref.size
    assert mismatched / total < 0.01
