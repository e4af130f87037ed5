"""Batched multi-crop augmentation: crop boxes against torchvision's RandomResizedCrop (two-sample KS tests, exact
fallback), per-op rates within binomial 4σ bounds, each op against torchvision.transforms.functional, whole outputs
against a crop-by-crop torchvision reference, determinism, batch independence, and the training collate."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp, kstest
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from dinoforge.data import batch_augment as ba
from dinoforge.data.augment import gaussian_blur as pil_gaussian_blur
from dinoforge.data.batch_augment import CROP_TRIES, BatchAugmentationDINO, crop_boxes
from dinoforge.data.collate import mask_and_cast
from dinoforge.data.masking import MaskingGenerator
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.train.data import SeededCollate
from dinoforge.utils import DinoforgeError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny per-image ops

TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _sizes(images) -> torch.Tensor:
    return torch.tensor([tuple(im.shape[1:]) for im in images])


# ---------------------------------------------------------------- crop boxes vs torchvision


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [(224, 224, (0.32, 1.0)), (160, 240, (0.05, 0.32)), (90, 200, (0.32, 1.0))],  # the last falls back ~1 in 10
)
def test_crop_boxes_match_torchvision_distribution(height, width, scale):
    """Area fraction, log aspect ratio and relative offsets of 3000 boxes vs 3000 of torchvision's get_params."""
    n = 3000
    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, height, width), scale, (3 / 4, 4 / 3)) for _ in range(n)]
    )
    u = torch.rand(n, 2 * CROP_TRIES + 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = crop_boxes(torch.full((n,), height), torch.full((n,), width), scale, u)
    assert (ours >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()

    def stats(b: torch.Tensor) -> dict[str, np.ndarray]:
        top, left, h, w = b.double().unbind(1)
        return {
            "area": (h * w / (height * width)).numpy(),
            "log ratio": torch.log(w / h).numpy(),
            "top": ((top + 0.5) / (height - h + 1)).numpy(),
            "left": ((left + 0.5) / (width - w + 1)).numpy(),
        }

    a, b = stats(ours), stats(ref)
    for name in a:
        p = ks_2samp(a[name], b[name]).pvalue
        assert p > 0.01, f"{name}: KS p = {p:.2g}"


@pytest.mark.parametrize(("height", "width"), [(60, 200), (200, 60)])
def test_crop_boxes_fall_back_to_torchvision_centre_crop(height, width):
    """No try fits (scale ≥ 0.9 of a 10:3 image): every box is torchvision's clamped-ratio centre crop."""
    ref = RandomResizedCrop.get_params(torch.empty(1, height, width), (0.9, 1.0), (3 / 4, 4 / 3))
    u = torch.rand(50, 2 * CROP_TRIES + 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = crop_boxes(torch.full((50,), height), torch.full((50,), width), (0.9, 1.0), u)
    assert (ours == torch.tensor(ref)).all()


# ---------------------------------------------------------------- per-op rates


def _assert_rate(flags: torch.Tensor, p: float, what: str) -> None:
    """Binomial 4σ bound on the observed rate (exact for p = 0 or 1)."""
    n, rate = flags.numel(), flags.double().mean().item()
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n), f"{what}: rate {rate:.4f} over {n}, expected {p}"


@pytest.mark.parametrize(("official_blur", "blur_p"), [(False, (1.0, 0.1, 0.5)), (True, (0.0, 0.9, 0.5))])
def test_op_rates_and_factor_ranges(official_blur, blur_p):
    b, n_local = 2000, 2
    aug = BatchAugmentationDINO(
        local_crops_number=n_local, global_crops_size=16, local_crops_size=8, official_blur=official_blur
    )
    global_plan, local_plan = aug.plan(torch.tensor([[32, 40]]).repeat(b, 1), torch.Generator().manual_seed(0))
    assert global_plan.boxes.shape == (2 * b, 4) and local_plan.boxes.shape == (n_local * b, 4)
    for name, plan in (("global", global_plan), ("local", local_plan)):
        _assert_rate(plan.flip, 0.5, f"{name} flip")
        _assert_rate(plan.jitter, 0.8, f"{name} jitter")
        _assert_rate(plan.gray, 0.2, f"{name} grayscale")
        assert (plan.order.sort(1).values == torch.arange(4)).all()  # a permutation per crop
        for position in range(4):
            for op in range(4):
                _assert_rate(plan.order[:, position] == op, 0.25, f"{name} op {op} at position {position}")
    _assert_rate(global_plan.blur[:b], blur_p[0], "global 1 blur")
    _assert_rate(global_plan.blur[b:], blur_p[1], "global 2 blur")
    _assert_rate(local_plan.blur, blur_p[2], "local blur")
    _assert_rate(global_plan.solarize[:b], 0.0, "global 1 solarize")
    _assert_rate(global_plan.solarize[b:], 0.2, "global 2 solarize")
    _assert_rate(local_plan.solarize, 0.0, "local solarize")

    factors = torch.cat([global_plan.factors, local_plan.factors]).double().numpy()
    for column, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):  # ColorJitter(.4,.4,.2,.1)
        assert kstest(factors[:, column], "uniform", args=(lo, hi - lo)).pvalue > 0.01, column
    sigma = torch.cat([global_plan.sigma, local_plan.sigma]).double().numpy()
    assert kstest(sigma, "uniform", args=(0.1, 1.9)).pvalue > 0.01


def test_blur_sigma_scale_scales_the_sigma_range():
    aug = BatchAugmentationDINO(local_crops_number=1, global_crops_size=16, local_crops_size=8, blur_sigma_scale=0.25)
    global_plan, _ = aug.plan(torch.tensor([[32, 32]]).repeat(1000, 1), torch.Generator().manual_seed(0))
    assert kstest(global_plan.sigma.double().numpy(), "uniform", args=(0.025, 0.475)).pvalue > 0.01


# ---------------------------------------------------------------- ops vs torchvision


def _test_batch() -> torch.Tensor:
    """8-bit levels in [0, 1], with a grey image, ties between channels, black and white pixels."""
    x = torch.randint(0, 256, (6, 3, 13, 17), generator=torch.Generator().manual_seed(0)).float() / 255
    x[0] = x[0, :1]
    x[1, 1, :3] = x[1, 0, :3]  # max or min shared by R and G
    x[1, 2, 3:6] = x[1, 1, 3:6]
    x[2, :, :2] = 0.0
    x[2, :, 2:4] = 1.0
    x[3, :, 0, 0] = 128 / 255  # exactly at the solarize threshold
    return x


@pytest.mark.parametrize(
    ("op", "lo", "hi", "tol"),
    [(0, 0.0, 2.0, 1e-6), (1, 0.0, 2.0, 1e-6), (2, 0.0, 2.0, 1e-6), (3, -0.5, 0.5, 1e-5)],
)
def test_jitter_ops_match_torchvision(op, lo, hi, tol):
    x = _test_batch()
    factors = torch.linspace(lo, hi, x.shape[0])
    ours = ba.JITTER_OPS[op](x, factors)
    ref = torch.stack([TV_JITTER[op](x[i], float(factors[i])) for i in range(x.shape[0])])
    assert (ours - ref).abs().max().item() <= tol


def test_grayscale_and_solarize_match_torchvision():
    x = _test_batch()
    assert torch.equal(ba.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3))
    assert torch.equal(ba.solarize(x), TF.solarize(x, 128 / 255))
    assert ba.solarize(x)[3, 0, 0, 0] == pytest.approx(127 / 255)  # >= the threshold inverts, as torchvision


@pytest.mark.parametrize(("height", "width", "kernel"), [(13, 17, 9), (4, 6, 7), (3, 3, 5)])
def test_gaussian_blur_matches_torchvision_and_the_pil_path(height, width, kernel):
    """Per-image sigma vs torchvision's tensor blur (float, 1e-5) and augment.gaussian_blur on uint8 PIL images
    (which rounds to 8 bits: within half a grey level)."""
    levels = torch.randint(0, 256, (5, 3, height, width), generator=torch.Generator().manual_seed(1))
    x = levels.float() / 255
    sigma = torch.tensor([0.1, 0.4, 0.9, 1.5, 2.0])
    ours = ba.gaussian_blur(x, kernel, sigma)
    for i, s in enumerate(sigma.tolist()):
        ref = TF.gaussian_blur(x[i], [kernel, kernel], [s, s])
        assert (ours[i] - ref).abs().max().item() <= 1e-5
        pil = Image.fromarray(levels[i].permute(1, 2, 0).numpy().astype(np.uint8))
        rounded = torch.from_numpy(np.asarray(pil_gaussian_blur(pil, kernel, s)).copy()).permute(2, 0, 1).float()
        assert (ours[i] * 255 - rounded).abs().max().item() <= 0.5 + 1e-3


def _reference_crop(image: torch.Tensor, plan, r: int, size: int) -> torch.Tensor:
    """Crop r of `plan`, made crop by crop with torchvision's tensor ops in the PIL path's order."""
    x = image.float() / 255
    top, left, h, w = plan.boxes[r].tolist()
    x = TF.resized_crop(x, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    if plan.flip[r]:
        x = TF.hflip(x)
    if plan.jitter[r]:
        for op in plan.order[r].tolist():
            x = TV_JITTER[op](x, float(plan.factors[r, op]))
    if plan.gray[r]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if plan.blur[r]:
        kernel = min(9, 2 * size - 1)
        x = TF.gaussian_blur(x, [kernel, kernel], [float(plan.sigma[r])] * 2)
    if plan.solarize[r]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


DEVICES = [None, "cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # None: where the images are


@pytest.mark.parametrize("device", DEVICES)
def test_output_matches_a_crop_by_crop_torchvision_reference(device):
    """Images of three sizes in one batch; rows are crop-major (row r is a crop of image r mod B) and every op
    of the plan is applied as torchvision would, in the plan's jitter order (1e-4 after normalisation; 1e-3 on a
    GPU). With a `device`, the crops are made there (the training device) from the CPU's uint8 images."""
    images = [_image(32, 32, 0), _image(40, 28, 1), _image(20, 50, 2)] * 8
    aug = BatchAugmentationDINO(
        (0.32, 1.0), (0.05, 0.32), local_crops_number=2, global_crops_size=16, local_crops_size=8, device=device
    )
    global_crops, local_crops = aug(images, torch.Generator().manual_seed(3))
    assert global_crops.device.type == local_crops.device.type == (device or "cpu")
    global_crops, local_crops = global_crops.cpu(), local_crops.cpu()
    tol = 1e-3 if device == "cuda" else 1e-4
    global_plan, local_plan = aug.plan(_sizes(images), torch.Generator().manual_seed(3))
    assert global_crops.shape == (48, 3, 16, 16) and local_crops.shape == (48, 3, 8, 8)
    assert global_crops.dtype == local_crops.dtype == torch.float32
    for crops, plan, size in ((global_crops, global_plan, 16), (local_crops, local_plan, 8)):
        for flags in (plan.flip, plan.jitter, plan.gray, plan.blur):  # the reference covers both branches
            assert flags.any() and not flags.all()
        for r in range(crops.shape[0]):
            ref = _reference_crop(images[r % len(images)], plan, r, size)
            assert (crops[r] - ref).abs().max().item() <= tol, r
    assert global_plan.solarize.any()


def test_shapes_without_local_crops_and_bad_input():
    aug = BatchAugmentationDINO(local_crops_number=0, global_crops_size=12, local_crops_size=4)
    global_crops, local_crops = aug([_image(20, 20, 0), _image(9, 30, 1)], torch.Generator().manual_seed(0))
    assert global_crops.shape == (4, 3, 12, 12) and local_crops.shape == (0, 3, 4, 4)
    with pytest.raises(DinoforgeError, match="uint8"):
        aug([_image(20, 20, 0).float()], torch.Generator())
    with pytest.raises(DinoforgeError, match="2 generators for 1 images"):
        aug([_image(20, 20, 0)], _generators(0, 1))


# ---------------------------------------------------------------- determinism


def test_seeded_generator_gives_identical_output():
    images = [_image(32, 32, 0), _image(28, 36, 1)]
    aug = BatchAugmentationDINO(local_crops_number=3, global_crops_size=16, local_crops_size=8)
    a, b, c = (aug(images, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_per_image_generators_make_crops_independent_of_the_batch():
    """With one generator per image, an image's crops are the same alone or in any batch (1 × 8 == 2 × 4)."""
    images = [_image(32, 32, 0), _image(28, 36, 1), _image(30, 30, 2)]
    aug = BatchAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    global_crops, local_crops = aug(images, _generators(10, 11, 12))
    alone_global, alone_local = aug(images[1:2], _generators(11))
    torch.testing.assert_close(global_crops[1::3], alone_global, rtol=0, atol=1e-6)
    torch.testing.assert_close(local_crops[1::3], alone_local, rtol=0, atol=1e-6)


def test_seeded_collate_augments_the_batch_and_counts_skipped_samples():
    """The training collate of the batched path: unreadable samples are dropped and their indices listed, each kept
    image is augmented with a generator seeded by its own key, then the iBOT masks are drawn for its global crops."""
    aug = BatchAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    masking = partial(
        mask_and_cast,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        dtype=torch.float32,
        mask_generator=MaskingGenerator((4, 4), max_num_patches=8),
    )
    collate = SeededCollate(masking, aug)
    images = [_image(32, 32, 0), _image(28, 36, 1)]
    batch = collate([(images[0], 11), (None, 5), (images[1], 22), (None, 3)])
    assert batch["skipped"] == [5, 3]
    global_crops, local_crops = aug(images, _generators(11, 22))
    assert torch.equal(batch["collated_global_crops"], global_crops)
    assert torch.equal(batch["collated_local_crops"], local_crops)
    assert batch["collated_masks"].shape == (4, 16) and batch["collated_masks"].any()
    assert collate([(None, 1), (None, 2)]) == {"skipped": [1, 2]}

    # on the training device: the loader's call only gathers the uint8 images, `finish` makes the same batch
    on_device = SeededCollate(
        masking, BatchAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8, device="cpu")
    )
    gathered = on_device([(images[0], 11), (None, 5), (images[1], 22), (None, 3)])
    assert gathered.keys() == {"samples", "skipped"} and gathered["skipped"] == [5, 3]
    assert all(image.dtype == torch.uint8 for image, _ in gathered["samples"])
    finished = on_device.finish(gathered)
    assert finished.keys() == batch.keys()
    for key, value in batch.items():
        assert torch.equal(finished[key], value) if torch.is_tensor(value) else finished[key] == value, key
    assert collate.finish(batch) is batch  # a batch the loader collated passes through
