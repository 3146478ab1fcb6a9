"""uint8 pixels -> the float input a ViT was trained on: /255, minus the channel mean, over the channel std."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalize_pixels"]


def normalize_pixels(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 (..., 3, H, W), on the device of `images`.

    Works for whole images (B, 3, H, W) and for patches (B, K, 3, p, p) alike: the channel axis is third
    from the end. mean, std: 3 floats (or tensors of 3) in the [0, 1] pixel scale.
    """
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"pixels must be (..., 3, H, W), got shape {tuple(images.shape)}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(3, 1, 1)
    return (images.float() / 255.0 - m) / s
