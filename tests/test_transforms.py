"""Eval transforms vs the official dinov2 transform and hand-computed crops/pads."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from dinoforge.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    eval_transform_size,
    normalize_transform,
)
from dinoforge.utils import DinoforgeError


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("wh", [(300, 200), (180, 400), (256, 256)])
def test_eval_transform_matches_official(wh):
    from dinov2.data.transforms import make_classification_eval_transform

    img = _photo(*wh)
    ours = eval_transform()(img)
    ref = make_classification_eval_transform()(img)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_imagenet_stats_match_official():
    from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert IMAGENET_MEAN == IMAGENET_DEFAULT_MEAN and IMAGENET_STD == IMAGENET_DEFAULT_STD


@pytest.mark.parametrize("wh,size,patch", [((300, 200), 100, 14), ((131, 257), 67, 16), ((64, 64), 32, 4)])
def test_eval_transform_size_crop(wh, size, patch):
    img = _photo(*wh, seed=1)
    out = eval_transform_size(size, patch)(img)
    resized = T.Resize(size, interpolation=InterpolationMode.BICUBIC)(img)
    full = normalize_transform()(resized)
    h, w = full.shape[-2:]
    assert min(h, w) == size  # shorter side went to `size`
    th, tw = h // patch * patch, w // patch * patch
    assert out.shape == (3, th, tw)
    top, left = (h - th) // 2, (w - tw) // 2
    torch.testing.assert_close(out, full[:, top : top + th, left : left + tw], rtol=0, atol=0)


def test_eval_transform_size_pad_keeps_every_pixel():
    img = _photo(300, 200, seed=2)  # resized to 150 x 100: pad to 154 x 112
    out = eval_transform_size(100, 14, mode="pad")(img)
    assert out.shape == (3, 112, 154)
    full = normalize_transform()(T.Resize(100, interpolation=InterpolationMode.BICUBIC)(img))
    torch.testing.assert_close(out[:, 6:106, 2:152], full, rtol=0, atol=0)
    assert out[:, :6].abs().sum() == 0 and out[:, :, :2].abs().sum() == 0 and out[:, :, 152:].abs().sum() == 0


def test_eval_transform_size_rejects_bad_arguments():
    with pytest.raises(DinoforgeError):
        eval_transform_size(10, 14)
    with pytest.raises(DinoforgeError):
        eval_transform_size(100, 14, mode="stretch")


def test_denormalize_inverts_normalisation():
    img = _photo(40, 30, seed=3)
    x = normalize_transform()(img)
    torch.testing.assert_close(denormalize(x), T.ToTensor()(img), atol=1e-6, rtol=0)
    batch = torch.stack([x, x])
    torch.testing.assert_close(denormalize(batch)[1], T.ToTensor()(img), atol=1e-6, rtol=0)
