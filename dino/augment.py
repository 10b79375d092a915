"""DINO v1 multi-crop augmentation, batched on the training device with kornia.

Per image: G = 2 global crops (or only global 1 when G = 1) and L local crops (DINO's ``DataAugmentationDINO``):

| view     | crop                            | then                                                                  |
|----------|---------------------------------|-----------------------------------------------------------------------|
| global 1 | RandomResizedCrop, global_scale | flip, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, gray p=0.2, blur p=1.0 |
| global 2 | same                            | same flip and colour ops, blur p=0.1, solarise (128/255) p=0.2        |
| local ×L | RandomResizedCrop, local_scale  | same flip and colour ops, blur p=0.5                                  |

then ImageNet normalisation. The probabilities above are DINO's and the defaults; ``color_jitter_p``,
``grayscale_p``, ``solarize_p`` and ``blur`` (off: no blur in any view) change them (the digits preset turns the
colour operations off). Crops are bicubic and clamped to [0, 1] (bicubic overshoots). Every sample of every view
draws its own parameters from torch's global RNG (saved in checkpoints, so a resumed run draws the same crops).

kornia is imported only when a :class:`MultiCropAugmentation` is built: the rest of ``dino`` (the model, k-NN
evaluation, attention maps, :func:`eval_transform`) imports and runs without it.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_P = 0.8
GRAYSCALE_P = 0.2
SOLARIZE_P = 0.2
SOLARIZE_THRESHOLD = 128 / 255
# Blur probability of each view; solarisation is global 2's only. n_global_crops is 1 or 2: DINO's two global views.
BLUR_P = {"global1": 1.0, "global2": 0.1, "local": 0.5}
GLOBAL_BLUR_P = (BLUR_P["global1"], BLUR_P["global2"])
MAX_GLOBAL_CROPS = len(GLOBAL_BLUR_P)


def blur_kernel_size(sigma_max: float, size: int) -> int:
    """Odd kernel covering ±3σ of the widest blur, at most the (odd) crop size."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    limit = size if size % 2 else size - 1
    return max(3, min(k, limit))


def _kornia_augmentation() -> ModuleType:
    try:
        import kornia.augmentation
    except ImportError as error:
        raise ImportError(f"dino's multi-crop augmentation needs kornia ({error}): pip install kornia") from error
    return kornia.augmentation


class _ClampUnit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0.0, 1.0)


def _view(size: int, scale: tuple[float, float], hflip_p: float, color_jitter_p: float, grayscale_p: float,
          blur_p: float, blur_sigma: tuple[float, float], solarize_p: float) -> nn.Sequential:
    K = _kornia_augmentation()
    ops: list[nn.Module] = [
        K.RandomResizedCrop((size, size), scale=tuple(scale), resample="BICUBIC", align_corners=False,
                           cropping_mode="resample"),
        _ClampUnit(),
    ]
    if hflip_p > 0:
        ops.append(K.RandomHorizontalFlip(p=hflip_p))
    if color_jitter_p > 0:
        ops.append(K.ColorJitter(**JITTER, p=color_jitter_p))
    if grayscale_p > 0:
        ops.append(K.RandomGrayscale(p=grayscale_p))
    if blur_p > 0:
        ops.append(K.RandomGaussianBlur(blur_kernel_size(blur_sigma[1], size), sigma=tuple(blur_sigma), p=blur_p))
    if solarize_p > 0:
        ops.append(K.RandomSolarize(thresholds=(SOLARIZE_THRESHOLD, SOLARIZE_THRESHOLD), additions=(0.0, 0.0),
                                    p=solarize_p))
    return nn.Sequential(*ops)


class MultiCropAugmentation(nn.Module):
    """uint8 (B, 3, H, W) images on the device -> ``[globals (G·B, 3, S, S), locals (L·B, 3, l, l)]`` normalised
    float, G = ``n_global_crops`` (1 or 2).

    Rows are view-major, as DINO's loss expects: globals are [g1 (B) | g2 (B)], locals [l1 (B) | … | lL (B)].
    The locals list entry is omitted when ``n_local_crops`` is 0. Building one needs kornia (``ImportError``
    saying so otherwise).
    """

    def __init__(self, global_size: int, local_size: int, n_local_crops: int,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 blur_sigma: tuple[float, float] = (0.1, 2.0), hflip_p: float = 0.5, n_global_crops: int = 2,
                 color_jitter_p: float = JITTER_P, grayscale_p: float = GRAYSCALE_P, solarize_p: float = SOLARIZE_P,
                 blur: bool = True) -> None:
        super().__init__()
        if not 1 <= n_global_crops <= MAX_GLOBAL_CROPS:
            raise ValueError(f"n_global_crops must be 1 or {MAX_GLOBAL_CROPS} (DINO's global views); got "
                             f"{n_global_crops}")
        self.n_local_crops = n_local_crops
        colour = (color_jitter_p, grayscale_p)
        self.global_views = nn.ModuleList(
            _view(global_size, global_scale, hflip_p, *colour, blur_p * blur, blur_sigma, solarize_p * (view == 1))
            for view, blur_p in enumerate(GLOBAL_BLUR_P[:n_global_crops]))
        self.local = _view(local_size, local_scale, hflip_p, *colour, BLUR_P["local"] * blur, blur_sigma, 0.0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (B, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255.0)
        crops = [torch.cat([view(x) for view in self.global_views])]
        if self.n_local_crops:
            # One call draws independent parameters for every (view, image) pair; repeat() tiles the batch, so the
            # rows come out view-major.
            crops.append(self.local(x.repeat(self.n_local_crops, 1, 1, 1)))
        return [self.normalize(c) for c in crops]


def eval_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, size, size) for evaluation (bicubic, antialiased resize)."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
