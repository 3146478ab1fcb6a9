"""Replayable views: torchvision's RandomResizedCrop + horizontal flip, from a seeded generator (a stored
view record replays its crop exactly, so the store holds no images; store_schema/README.md, `views`).

The crop box is stored normalised to the source image size, so a view record is meaningful without
the image; `apply_view` rounds it back to exactly the integer box `sample_view` drew (exact for image
sides below 2**22 pixels even through the float32 of `to_array`), and then does what torchvision's PIL
path does: crop, resize with antialiasing (PIL's resampling filters always antialias), flip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from extract.masks import generator_for
from store_schema.config import PipelineConfig, ViewsConfig

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params tries this many boxes before its fallback


@dataclass(frozen=True)
class ViewParams:
    top: float  # box, normalised by the source height / width, in [0, 1]
    left: float
    height: float
    width: float
    flip: bool

    def to_array(self) -> np.ndarray:
        """float32 (5,) [top, left, height, width, flip] — the stored form."""
        return np.array([self.top, self.left, self.height, self.width, float(self.flip)], np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "ViewParams":
        a = np.asarray(a, np.float64).reshape(-1)
        if a.shape != (5,):
            raise ValueError(f"view parameters must have 5 values [top, left, height, width, flip], got {a.shape}")
        return cls(float(a[0]), float(a[1]), float(a[2]), float(a[3]), bool(a[4] >= 0.5))

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) in pixels of a width x height source: the box sample_view drew."""
        return (int(round(self.top * height)), int(round(self.left * width)),
                int(round(self.height * height)), int(round(self.width * width)))


def sample_view(width: int, height: int, gen: torch.Generator, cfg: ViewsConfig) -> ViewParams:
    """Draw a crop box and flip bit for a width x height image, from `gen` only.

    Same draws, in the same order, as torchvision's RandomResizedCrop.get_params followed by
    RandomHorizontalFlip (10 attempts of area-scale and log-ratio sampling, then the central-crop
    fallback; then one uniform draw for the flip): with `gen` seeded like the global RNG, the box equals
    torchvision's.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"sample_view: image size must be positive, got {width}x{height}")
    top, left, h, w = _crop_box(width, height, cfg.crop_scale, cfg.crop_ratio, gen)
    flip = bool(torch.rand(1, generator=gen).item() < cfg.hflip_prob)
    return ViewParams(top / height, left / width, h / height, w / width, flip)


def _crop_box(width: int, height: int, scale: list[float], ratio: list[float],
              gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's get_params with every draw from `gen`; returns (top, left, h, w) in pixels."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision computes it
    for _ in range(_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    # fallback: the largest central crop within the ratio range
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(cfg: PipelineConfig, key: str, view: int, width: int, height: int) -> ViewParams:
    """The view `view` of sample `key`: sample_view with the generator (cfg.seed, key, view, "view")."""
    return sample_view(width, height, generator_for(cfg.seed, key, view, "view"), cfg.views)


def apply_view(image: Image.Image, params: ViewParams, size: int, interpolation: str) -> torch.Tensor:
    """Crop the view's box out of an RGB image, resize to size x size, flip: uint8 (3, size, size).

    Equals torchvision.transforms.functional.resized_crop(image, *box, [size, size], interpolation,
    antialias=True) (+ hflip) on the PIL path. Boxes larger than the image (tiny images) are upsampled.
    """
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(map(repr, _RESAMPLE))}")
    if image.mode != "RGB":
        raise ValueError(f"apply_view needs an RGB image, got mode {image.mode!r} (decode with store_schema.shards)")
    top, left, h, w = params.pixel_box(*image.size)
    if h <= 0 or w <= 0:
        raise ValueError(f"view box {params} is empty on a {image.size[0]}x{image.size[1]} image")
    out = image.crop((left, top, left + w, top + h)).resize((size, size), _RESAMPLE[interpolation])
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).contiguous()
