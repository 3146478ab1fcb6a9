"""Augmented views and masks for the demo teacher fixtures; every random draw comes from a passed generator.

Nothing here touches the global RNG, so a fixture's training is a function of its seed alone.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def random_resized_crop(x: Tensor, scale: tuple[float, float], gen: torch.Generator) -> Tensor:
    """Batched RandomResizedCrop (ratio 3/4..4/3) by an affine resampling: (B, C, H, W) -> same shape."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen).exp()
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # box centre stays inside the image
    theta[:, 1, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jittered_view(x: Tensor, scale: tuple[float, float], contrast: tuple[float, float], brightness: float,
                  gen: torch.Generator) -> Tensor:
    """One augmented view of images in [0, 1] (B, 3, H, W): a random resized crop, then a per-image
    contrast factor and brightness shift (the digits are grey: intensity is their colour jitter)."""
    v = random_resized_crop(x, scale, gen)
    c = torch.empty(len(x), 1, 1, 1).uniform_(contrast[0], contrast[1], generator=gen)
    s = torch.empty(len(x), 1, 1, 1).uniform_(-brightness, brightness, generator=gen)
    return (v - 0.5) * c + 0.5 + s


def random_keep(batch: int, n: int, n_keep: int, gen: torch.Generator) -> Tensor:
    """MAE's per-sample random subset: argsort of uniform noise, first n_keep -> (B, n_keep) indices."""
    return torch.rand(batch, n, generator=gen).argsort(1)[:, :n_keep]


def block_masks(batch: int, grid: int, ratio: tuple[float, float], prob: float, min_patches: int, aspect: float,
                gen: torch.Generator, attempts: int = 40) -> Tensor:
    """iBOT's blockwise masks (BEiT's generator) -> bool (B, grid * grid), True = masked, row-major.

    With probability `prob` an image is masked, with a target ratio uniform in `ratio`; rectangles of
    min_patches.. remaining patches, aspect ratio log-uniform in [aspect, 1/aspect], are added while they
    add new patches without overshooting the target. The random numbers are drawn up front, `attempts`
    rectangles per image (BEiT tries 10 per block), so an image can end slightly below its target.
    """
    draws = torch.rand(batch, attempts + 2, 4, generator=gen).tolist()  # one call: cheap and reproducible
    masks = np.zeros((batch, grid, grid), dtype=bool)
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)
    for i, d in enumerate(draws):
        if d[0][0] >= prob:
            continue
        target = int(round((ratio[0] + d[0][1] * (ratio[1] - ratio[0])) * grid * grid))
        m, count = masks[i], 0
        for a in d[1:]:
            if count >= target:
                break
            left_over = target - count
            area = min_patches + a[0] * max(0, left_over - min_patches)
            ar = math.exp(log_lo + a[1] * (log_hi - log_lo))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if not (0 < h < grid and 0 < w < grid):
                continue
            top, left = int(a[2] * (grid - h + 1)), int(a[3] * (grid - w + 1))
            new = h * w - int(m[top:top + h, left:left + w].sum())
            if 0 < new <= left_over:
                m[top:top + h, left:left + w] = True
                count += new
    return torch.from_numpy(masks.reshape(batch, grid * grid))
