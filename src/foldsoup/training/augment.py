"""Batched image preprocessing and augmentation on the device the images live on.

Images stay uint8 until a batch is drawn; resize (e.g. CIFAR-10 32 -> 224), the random affine
crop, colour jitter, erasing and normalisation happen per sample in a few tensor ops, so a GPU
never waits on CPU loaders. All randomness comes from an explicit torch.Generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def eval_transform(images: torch.Tensor, size: int, mean: list[float], std: list[float],
                   interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 [B,C,H,W] -> normalised float [B,C,size,size] (resize by `interpolation`, data.interpolation:
    bilinear or bicubic, antialiased when shrinking; no randomness)."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        if interpolation == "bilinear":
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False,
                              antialias=x.shape[-1] > size or x.shape[-2] > size).clamp_(0, 1)
    return normalise(x, mean, std)


def affine_params(n: int, aug: dict, hflip: bool, g: torch.Generator, device) -> torch.Tensor:
    """Per-sample 2x3 matrices mapping output to input coordinates ([-1, 1] grid):
    a random-resized crop (area in aug['scale'], aspect ratio 3/4..4/3), rotation, shift, flip."""
    lo, hi = aug["scale"]
    area = _uniform(n, lo, hi, g, device)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g, device)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    # Crop centre anywhere that keeps the crop inside the image, plus the extra shift.
    cx = _uniform(n, -1, 1, g, device) * (1 - sx) + _uniform(n, -1, 1, g, device) * 2 * aug["translate"]
    cy = _uniform(n, -1, 1, g, device) * (1 - sy) + _uniform(n, -1, 1, g, device) * 2 * aug["translate"]
    angle = _uniform(n, -1, 1, g, device) * math.radians(aug["rotate"])
    cos, sin = torch.cos(angle), torch.sin(angle)
    flip = torch.ones(n, device=device)
    if hflip:
        flip = torch.where(torch.rand(n, generator=g, device=device) < 0.5, -flip, flip)
    theta = torch.stack(
        [
            torch.stack([cos * sx * flip, -sin * sy, cx], dim=1),
            torch.stack([sin * sx * flip, cos * sy, cy], dim=1),
        ],
        dim=1,
    )
    return theta


def train_transform(
    images: torch.Tensor, size: int, mean: list[float], std: list[float], aug: dict, hflip: bool, g: torch.Generator
) -> torch.Tensor:
    """uint8 [B,C,H,W] -> augmented, normalised float [B,C,size,size]."""
    n, c, device = images.shape[0], images.shape[1], images.device
    x = images.float().div_(255.0)
    theta = affine_params(n, aug, hflip, g, device)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if aug["jitter"] > 0:
        j = aug["jitter"]
        brightness = _uniform(n, 1 - j, 1 + j, g, device).view(n, 1, 1, 1)
        contrast = _uniform(n, 1 - j, 1 + j, g, device).view(n, 1, 1, 1)
        grey = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x * brightness - grey) * contrast + grey).clamp_(0, 1)
    x = normalise(x, mean, std)
    if aug["erase"] > 0:
        x = random_erase(x, aug["erase"], g)
    return x


def random_erase(x: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    """Zero (the normalised mean) one rectangle of 2%..25% of the area per chosen sample."""
    n, _, h, w = x.shape
    device = x.device
    area = _uniform(n, 0.02, 0.25, g, device)
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), g, device))
    eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
    ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
    top = torch.rand(n, generator=g, device=device) * (h - eh)
    left = torch.rand(n, generator=g, device=device) * (w - ew)
    chosen = torch.rand(n, generator=g, device=device) < prob
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
        & chosen.view(n, 1, 1)
    )
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner by weight `lam` (drawn by the caller from
    Beta(alpha, alpha) on the host, a whole epoch at a time, so no step waits on the device).
    `targets` are class probabilities [B, classes]."""
    perm = torch.randperm(x.shape[0], generator=g, device=x.device)
    return x * lam + x[perm] * (1 - lam), targets * lam + targets[perm] * (1 - lam)
