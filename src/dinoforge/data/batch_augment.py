"""Batched multi-crop augmentation: the DINOv2 recipe of augment.py on uint8 tensors, photometric ops per batch.

Only the crop box, its resize and its flip are done crop by crop; colour jitter, grayscale, blur, solarize and
normalisation run once on all stacked crops with per-crop random factors, so the data path outpaces training.
Values stay float in [0, 1] between ops, as torchvision's tensor ops do (the PIL path rounds to 8 bits after each
op, and its blends truncate: about half a grey level darker per jitter op); the random draws follow the PIL path's
distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms
from torchvision.transforms import functional as TF

from dinoforge.data.augment import (
    BLUR_SIGMA,
    COLOR_JITTER,
    GRAYSCALE_P,
    JITTER_P,
    SOLARIZE_P,
    SOLARIZE_THRESHOLD,
    blur_kernel_size,
    blur_probabilities,
    gaussian_kernel,
)
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.utils import DinoforgeError

CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # RandomResizedCrop.get_params's tries before its centre-crop fallback
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

# Columns of one crop's uniform draws: (area, log ratio) per try, top, left; then flip and the photometric draws.
_BOX = slice(0, 2 * CROP_TRIES + 2)
_FLIP, _JITTER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(_BOX.stop, _BOX.stop + 6)
_FACTORS = slice(_BOX.stop + 6, _BOX.stop + 10)
_ORDER = slice(_BOX.stop + 10, _BOX.stop + 14)
DRAWS_PER_CROP = _ORDER.stop


def to_uint8_tensor(image: Image.Image) -> Tensor:
    """A PIL image as the [3, H, W] uint8 RGB tensor that `BatchAugmentationDINO` takes (cheap, per sample)."""
    return TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))


def decode_jpegs(data: Sequence[bytes], device: torch.device | str = "cpu") -> list[Tensor]:
    """JPEG files' bytes → uint8 [3, H, W] RGB tensors decoded on `device`: torchvision's `decode_jpeg`, batched on
    the GPU (nvJPEG) when `device` is CUDA, libjpeg on the CPU. RuntimeError when one does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))


def crop_boxes(heights: Tensor, widths: Tensor, scale: tuple[float, float], u: Tensor) -> Tensor:
    """torchvision's `RandomResizedCrop.get_params` (ratio 3/4 to 4/3) for N crops at once → [N, 4] long boxes
    (top, left, height, width).

    `u` [N, 2·CROP_TRIES + 2] holds uniforms in [0, 1): an area fraction and a log aspect ratio per try, then the
    top and left offsets of the first try that fits; when none fits, the centre crop of the clamped ratio."""
    h_img, w_img = heights.double()[:, None], widths.double()[:, None]
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    area = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u[:, 0 : 2 * CROP_TRIES : 2])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1 : 2 * CROP_TRIES : 2])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.int().argmax(1, keepdim=True)
    found = fits.any(1)
    h, w, h_img, w_img = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], h_img[:, 0], w_img[:, 0]
    in_ratio = w_img / h_img
    fall_w = torch.where(in_ratio > CROP_RATIO[1], torch.round(h_img * CROP_RATIO[1]), w_img)
    fall_h = torch.where(in_ratio < CROP_RATIO[0], torch.round(w_img / CROP_RATIO[0]), h_img)
    h, w = torch.where(found, h, fall_h), torch.where(found, w, fall_w)
    top = torch.where(found, torch.floor(u[:, -2] * (h_img - h + 1)), torch.div(h_img - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, -1] * (w_img - w + 1)), torch.div(w_img - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1).long()


def _per_image(factor: Tensor) -> Tensor:
    return factor.to(torch.float32).view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """torchvision's `rgb_to_grayscale(x, 3)` of [N, 3, H, W] images in [0, 1] (a copy)."""
    r, g, b = x.unbind(1)
    gray = GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b
    return gray.unsqueeze(1).expand_as(x).contiguous()


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = _per_image(factor)
    return (f * x + (1.0 - f) * other).clamp(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's `adjust_brightness` with one factor per image of [N, 3, H, W] in [0, 1]."""
    return (_per_image(factor) * x).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's `adjust_contrast` (blend with the mean grey level) with one factor per image."""
    r, g, b = x.unbind(1)
    mean = (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).mean((1, 2))
    return _blend(x, mean.view(-1, 1, 1, 1), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's `adjust_saturation` (blend with the grayscale image) with one factor per image."""
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's `adjust_hue` (HSV hue rotated by `factor` turns) with one factor per image.

    RGB → hue sextant as torchvision's `_rgb2hsv`; back with the closed form c_n = V − C·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6·hue) mod 6 for n = 5, 3, 1 (R, G, B), which keeps value and chroma as HSV does."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    div = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sextant = torch.where(
        maxc == r, (g - b) / div, torch.where(maxc == g, 2.0 + (b - r) / div, 4.0 + (r - g) / div)
    ) + 6.0 * factor.to(x.dtype).view(-1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + sextant.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)


JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)  # in the order of ColorJitter's factors


def gaussian_blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """torchvision's `gaussian_blur` (reflect padding) with one sigma per image of [N, C, H, W]: two 1-D passes as
    grouped convolutions, with augment.py's kernel."""
    n, c, h, w = x.shape
    kernel = torch.from_numpy(gaussian_kernel(kernel_size, sigma.cpu().numpy())).to(x.device, x.dtype)
    kernel = kernel.repeat_interleave(c, 0)
    half = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: Tensor) -> Tensor:
    """torchvision's `solarize` of [0, 1] images at augment.py's threshold (128 of 255)."""
    return torch.where(x >= SOLARIZE_THRESHOLD / 255, 1.0 - x, x)


@dataclass
class CropPlan:
    """The random draws of N crops, one row each: where to crop and which photometric ops to apply."""

    boxes: Tensor  # [N, 4] long: top, left, height, width in the source image
    flip: Tensor  # [N] bool
    jitter: Tensor  # [N] bool: colour jitter applied
    factors: Tensor  # [N, 4] float32: brightness, contrast, saturation, hue
    order: Tensor  # [N, 4] long: the jitter ops' order, a permutation of 0..3 (indices into JITTER_OPS)
    gray: Tensor  # [N] bool
    blur: Tensor  # [N] bool
    sigma: Tensor  # [N] float32: blur sigma
    solarize: Tensor  # [N] bool

    def to(self, device: torch.device | str) -> CropPlan:
        """The plan with its per-crop tensors on `device` (the boxes stay on the CPU: they are read crop by crop)."""
        moved = {k: v if k == "boxes" else v.to(device) for k, v in vars(self).items()}
        return CropPlan(**moved)


class BatchAugmentationDINO:
    """uint8 [3, H, W] images (sizes may differ) → (global crops [2B, 3, g, g], local crops [n·B, 3, l, l]), float32,
    ImageNet-normalised, crop-major (crop i of every image, then crop i + 1) as `collate_data_and_cast` stacks them.

    The recipe and arguments are `DataAugmentationDINO`'s: random-resized crops (bicubic, antialiased) and flips,
    colour jitter (0.4, 0.4, 0.2, 0.1; its four ops in a random order per crop) with p 0.8, grayscale p 0.2, blur
    p 1.0 / 0.1 / 0.5 (inverted with `official_blur`), solarize p 0.2 on global crop 2. All randomness comes from
    the generator(s) passed in: one for the batch, or one per image (then an image's crops depend on its own
    generator only, whatever the batch it is in).

    With a `device` (the training device), the images are moved there and the crops, photometric ops and
    normalisation run there; the random draws stay on the CPU generators, so the crops do not depend on the device
    beyond its arithmetic (on the CPU they are bit-identical to device=None's).
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        official_blur: bool = False,
        blur_sigma_scale: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        self.global_crops_scale, self.local_crops_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.blur_p = blur_probabilities(official_blur)
        self.sigma_range = (BLUR_SIGMA[0] * blur_sigma_scale, BLUR_SIGMA[1] * blur_sigma_scale)
        jitter = transforms.ColorJitter(**COLOR_JITTER)  # its factor ranges, e.g. brightness 0.4 → (0.6, 1.4)
        self.factor_ranges = torch.tensor([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue])

    def _uniforms(self, n_images: int, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
        """[n_crops · B, DRAWS_PER_CROP] uniforms in crop-major row order (global 1, global 2, locals)."""
        shape = (2 + self.local_crops_number, DRAWS_PER_CROP)
        if isinstance(generator, torch.Generator):
            u = torch.rand(n_images, *shape, generator=generator, dtype=torch.float64)
        else:
            if len(generator) != n_images:
                raise DinoforgeError(f"got {len(generator)} generators for {n_images} images")
            u = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in generator])
        return u.transpose(0, 1).reshape(-1, DRAWS_PER_CROP)

    def _plan(
        self, u: Tensor, sizes: Tensor, scale: tuple[float, float], blur_p: Tensor, solarize_p: Tensor
    ) -> CropPlan:
        lo, hi = self.factor_ranges[:, 0], self.factor_ranges[:, 1]
        return CropPlan(
            boxes=crop_boxes(sizes[:, 0], sizes[:, 1], scale, u[:, _BOX]),
            flip=u[:, _FLIP] < 0.5,
            jitter=u[:, _JITTER] < JITTER_P,
            factors=(lo + (hi - lo) * u[:, _FACTORS]).float(),
            order=u[:, _ORDER].argsort(1),
            gray=u[:, _GRAY] < GRAYSCALE_P,
            blur=u[:, _BLUR] < blur_p,
            sigma=(self.sigma_range[0] + (self.sigma_range[1] - self.sigma_range[0]) * u[:, _SIGMA]).float(),
            solarize=u[:, _SOLARIZE] < solarize_p,
        )

    def plan(self, sizes: Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> tuple[CropPlan, CropPlan]:
        """The draws of the global and the local crops of B images of `sizes` [B, 2] (height, width)."""
        b = sizes.shape[0]
        u = self._uniforms(b, generator)
        n_local = self.local_crops_number
        p1, p2, p_local = self.blur_p
        global_plan = self._plan(
            u[: 2 * b],
            sizes.repeat(2, 1),
            self.global_crops_scale,
            torch.tensor([p1, p2]).repeat_interleave(b),
            torch.tensor([0.0, SOLARIZE_P]).repeat_interleave(b),
        )
        local_plan = self._plan(
            u[2 * b :],
            sizes.repeat(n_local, 1),
            self.local_crops_scale,
            torch.full((n_local * b,), p_local),
            torch.zeros(n_local * b),
        )
        return global_plan, local_plan

    @staticmethod
    def render(images: Sequence[Tensor], plan: CropPlan, size: int) -> Tensor:
        """Apply `plan` to float [3, H, W] `images` in [0, 1] (row r crops image r mod B) → [N, 3, size, size],
        normalised."""
        b = len(images)
        plan = plan.to(images[0].device)
        x = torch.empty(plan.boxes.shape[0], 3, size, size, device=images[0].device)
        for r, (top, left, h, w) in enumerate(plan.boxes.tolist()):
            crop = images[r % b][None, :, top : top + h, left : left + w]
            x[r] = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        x.clamp_(0, 1)
        x[plan.flip] = x[plan.flip].flip(-1)
        for position in range(4):
            for op, fn in enumerate(JITTER_OPS):
                rows = (plan.jitter & (plan.order[:, position] == op)).nonzero()[:, 0]
                if rows.numel():
                    x[rows] = fn(x[rows], plan.factors[rows, op])
        x[plan.gray] = grayscale(x[plan.gray])
        rows = plan.blur.nonzero()[:, 0]
        if rows.numel():
            x[rows] = gaussian_blur(x[rows], blur_kernel_size(size), plan.sigma[rows])
        x[plan.solarize] = solarize(x[plan.solarize])
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD, inplace=True)

    def __call__(
        self, images: Sequence[Tensor], generator: torch.Generator | Sequence[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        """The normalised global and local crops of `images`, drawn from `generator` (one, or one per image), on
        `self.device` (default: the images' device)."""
        for im in images:
            if im.dtype != torch.uint8 or im.ndim != 3 or im.shape[0] != 3:
                raise DinoforgeError(f"expected uint8 [3, H, W] images, got {im.dtype} {tuple(im.shape)}")
        sizes = torch.tensor([tuple(im.shape[1:]) for im in images], dtype=torch.long).view(-1, 2)
        global_plan, local_plan = self.plan(sizes, generator)
        floats = [im.to(self.device or im.device, non_blocking=True).float().div_(255) for im in images]
        return (
            self.render(floats, global_plan, self.global_crops_size),
            self.render(floats, local_plan, self.local_crops_size),
        )
