"""The student: a plain timm ViT with fixed 2-D sin-cos positions and a token-dropping forward.

Kept a stock `VisionTransformer` (no subclass, no extra modules) so the exported state dict loads
strictly into `timm.create_model(arch, **arch_kwargs)`.
"""
from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from store_schema.arch_check import RESERVED_ARCH_KWARGS
from store_schema.config import ConfigError, StudentConfig
from vit_layers.forward import check_supported_vit, embed_patch_pixels, encode_tokens
from vit_layers.positions import sincos_pos_embed_2d


def build_student(cfg: StudentConfig, image_size: int, patch_size: int) -> VisionTransformer:
    """A randomly initialised timm ViT for `cfg.arch` at this image/patch size, headless.

    pos_embed is overwritten with MAE-layout sin-cos positions (CLS slot zeros) and frozen. It stays
    a Parameter with requires_grad=False, so the state dict keeps timm's keys; build optimiser
    groups from parameters that require grad.
    """
    reserved = set(RESERVED_ARCH_KWARGS) & set(cfg.arch_kwargs)
    if reserved:
        raise ValueError(f"student.arch_kwargs must not set {sorted(reserved)}: they come from data.image_size, "
                         "data.patch_size and the pipeline (a headless, randomly initialised student)")
    try:
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0, img_size=image_size,
                                  patch_size=patch_size, **cfg.arch_kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError, ZeroDivisionError) as e:
        # timm checks sizes with asserts and arithmetic deep inside the model: name the keys instead
        raise ConfigError(f"student.arch = {cfg.arch!r} with student.arch_kwargs = {dict(cfg.arch_kwargs)} cannot be "
                          f"built at data.image_size = {image_size}, data.patch_size = {patch_size}: "
                          f"{type(e).__name__}: {e or 'invalid sizes'} (e.g. embed_dim must be a positive multiple "
                          "of num_heads, depth >= 0)") from e
    check_supported_vit(model)
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"the student needs a square patch grid for 2-D sin-cos positions, got {grid}")
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed_2d(model.embed_dim, grid[0], cls_token=True))
    model.pos_embed.requires_grad_(False)
    return model


def student_forward(model: VisionTransformer, patches: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Encode only the visible patches.

    Args:
        patches: (B, K, 3, p, p) normalised float pixels of the student's visible patches.
        idx: (B, K) their grid indices (row-major), unique per sample.
    Returns:
        tokens (B, 1+K, d) after the final norm, CLS first (the decoder's input), and the patch
        tokens (B, K, d) = tokens[:, 1:] in `idx` order (the projector's input).
    """
    tokens = encode_tokens(model, embed_patch_pixels(model, patches, idx))
    return tokens, tokens[:, 1:]
