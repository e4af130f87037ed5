"""DINOv2 multi-crop augmentation: two global and N local crops, the paper's colour/blur/solarize recipe."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import correlate1d
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dinoforge.data.transforms import normalize_transform

# The paper's recipe, shared by the PIL path below and the batched tensor path (batch_augment.py).
COLOR_JITTER: dict[str, float] = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_P, GRAYSCALE_P, SOLARIZE_P = 0.8, 0.2, 0.2
SOLARIZE_THRESHOLD = 128  # of 255
BLUR_SIGMA: tuple[float, float] = (0.1, 2.0)  # meant for BLUR_SIGMA_CROP px crops; scaled by `blur_sigma_scale`
BLUR_SIGMA_CROP = 224
BLUR_KERNEL = 9


def blur_probabilities(official_blur: bool) -> tuple[float, float, float]:
    """Blur probability of global crop 1, global crop 2 and the local crops; the official code applies 1 − p."""
    intended = (1.0, 0.1, 0.5)
    return tuple(1.0 - p for p in intended) if official_blur else intended


def blur_kernel_size(side: int, kernel_size: int = BLUR_KERNEL) -> int:
    """The blur kernel for a crop whose shorter side is `side`: `kernel_size`, capped at 2·side−1 (reflect padding
    needs the half-kernel to be shorter than the side)."""
    return min(kernel_size, 2 * side - 1)


def gaussian_kernel(kernel_size: int, sigma: float | np.ndarray) -> np.ndarray:
    """torchvision's normalised 1-D Gaussian kernel (float32, [k]); sigmas of shape [n] give one kernel per row."""
    half = kernel_size // 2
    x = np.linspace(-half, half, kernel_size, dtype=np.float32)
    w = np.exp(-0.5 * (x / np.asarray(sigma, dtype=np.float32)[..., None]) ** 2)
    return w / w.sum(-1, keepdims=True)


def gaussian_blur(img: Image.Image, kernel_size: int, sigma: float) -> Image.Image:
    """torchvision's `gaussian_blur` of a PIL image (same kernel, reflect padding, rounding) as two 1-D passes:
    ~3x faster on 24 px crops, where the 2-D convolution took most of the data workers' time."""
    w = gaussian_kernel(kernel_size, sigma)
    a = np.asarray(img, dtype=np.float32)
    for axis in (0, 1):
        a = correlate1d(a, w, axis=axis, mode="mirror")  # scipy's "mirror" is torch's "reflect"
    return Image.fromarray(np.rint(a).astype(np.uint8), mode=img.mode)


class RandomGaussianBlur:
    """With probability `p`, Gaussian-blur a PIL image with sigma ~ U(radius_min, radius_max).

    The kernel is 9 pixels as official (odd `kernel_size`), capped at 2·min(side)−1 so that it stays valid
    on tiny crops.
    """

    def __init__(
        self,
        p: float,
        radius_min: float = BLUR_SIGMA[0],
        radius_max: float = BLUR_SIGMA[1],
        kernel_size: int = BLUR_KERNEL,
    ) -> None:
        self.p = p
        self.radius_min, self.radius_max = radius_min, radius_max
        self.kernel_size = kernel_size

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        sigma = torch.empty(()).uniform_(self.radius_min, self.radius_max).item()
        kernel = blur_kernel_size(min(img.size), self.kernel_size)
        return gaussian_blur(img, kernel, sigma)

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, sigma=({self.radius_min}, {self.radius_max}))"


class DataAugmentationDINO:
    """PIL image → {global_crops: [2], global_crops_teacher: [same 2], local_crops: [N], offsets: ()}.

    Random-resized crops (bicubic) and flips, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2,
    Gaussian blur with p 1.0 / 0.1 / 0.5 on global crop 1 / global crop 2 / local crops (the paper's
    intention), solarize p 0.2 on global crop 2, ImageNet normalisation. `official_blur=True` reproduces the
    official code, whose blur applies with 1 − p (effective 0.0 / 0.9 / 0.5). `blur_sigma_scale` multiplies the
    blur's sigma range (0.1, 2.0), which is meant for 224 px crops (e.g. 32/224 for 32 px images).
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
    ) -> None:
        self.local_crops_number = local_crops_number
        self.official_blur = official_blur

        def geometric(size: int, scale: tuple[float, float]) -> transforms.Compose:
            return transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
                    transforms.RandomHorizontalFlip(p=0.5),
                ]
            )

        def blur(p: float) -> RandomGaussianBlur:
            return RandomGaussianBlur(
                p, radius_min=BLUR_SIGMA[0] * blur_sigma_scale, radius_max=BLUR_SIGMA[1] * blur_sigma_scale
            )

        self.geometric_global = geometric(global_crops_size, global_crops_scale)
        self.geometric_local = geometric(local_crops_size, local_crops_scale)
        colour = transforms.Compose(
            [
                transforms.RandomApply([transforms.ColorJitter(**COLOR_JITTER)], p=JITTER_P),
                transforms.RandomGrayscale(p=GRAYSCALE_P),
            ]
        )
        self.blur_global1, self.blur_global2, self.blur_local = (blur(p) for p in blur_probabilities(official_blur))
        self.solarize_global2 = transforms.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=SOLARIZE_P)
        normalize = normalize_transform()
        self.global_transfo1 = transforms.Compose([colour, self.blur_global1, normalize])
        self.global_transfo2 = transforms.Compose([colour, self.blur_global2, self.solarize_global2, normalize])
        self.local_transfo = transforms.Compose([colour, self.blur_local, normalize])

    def __call__(self, image: Image.Image) -> dict[str, object]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        global_crops = [
            self.global_transfo1(self.geometric_global(image)),
            self.global_transfo2(self.geometric_global(image)),
        ]
        local_crops = [self.local_transfo(self.geometric_local(image)) for _ in range(self.local_crops_number)]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }
