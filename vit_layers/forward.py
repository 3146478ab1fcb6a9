"""Token-dropping forward for timm ``VisionTransformer`` (teachers in extract/, the student in distill/).

A ViT only sees a subset of its patches: embed all (or only the visible) patches, add the absolute
position embedding, keep CLS + the visible tokens, then run ``norm_pre -> blocks -> norm``. Given the
same weights and kept indices this equals MAE's reference ``forward_encoder``; with every token kept it
equals timm's ``forward_features``.

Index convention: ``keep_idx`` (B, K) holds patch indices in [0, N) on the row-major grid
(index = row * grid_w + col). Order is **preserved**: output token j is the patch ``keep_idx[:, j]``.
Indices need not be sorted (the blocks are permutation-equivariant, so any order gives the same
per-token features); they must be unique within a sample.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

__all__ = [
    "check_supported_vit",
    "embed_image_tokens",
    "embed_patch_pixels",
    "encode_tokens",
    "forward_visible",
    "patchify",
    "unpatchify",
]


def check_supported_vit(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a plain CLS-token timm ViT this module can run.

    Supported: timm ``VisionTransformer`` with a CLS token, no register tokens, a position embedding
    that includes the CLS slot (``no_embed_class=False``), a fixed image size, a square conv patch
    embedding, no ``PatchDropout`` and the final norm applied to tokens (``global_pool='token'``).
    """
    def fail(problem: str, fix: str) -> None:
        raise ValueError(f"unsupported ViT ({type(model).__name__}): {problem}; {fix}")

    if not isinstance(model, VisionTransformer):
        fail("not a timm VisionTransformer", "build the model with timm.create_model('vit_...')")
    if model.cls_token is None:
        fail("it has no CLS token (class_token=False)", "build it with class_token=True")
    if model.reg_token is not None or getattr(model, "num_reg_tokens", 0):
        fail(f"it has {model.num_reg_tokens} register tokens", "build it with reg_tokens=0")
    if model.num_prefix_tokens != 1:
        fail(f"it has {model.num_prefix_tokens} prefix tokens, expected 1 (CLS only)",
             "build it with class_token=True, reg_tokens=0")
    if model.no_embed_class:
        fail("no_embed_class=True (the CLS token has no position embedding)",
             "build it with no_embed_class=False")
    if model.dynamic_img_size:
        fail("dynamic_img_size=True", "build it with a fixed img_size and dynamic_img_size=False")
    if model.pos_embed is None:
        fail("it has no absolute position embedding (pos_embed='none')", "build it with pos_embed='learn'")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not pe.flatten:
        fail(f"patch_embed is {type(pe).__name__} (flatten={getattr(pe, 'flatten', None)})",
             "use timm's plain PatchEmbed (no hybrid backbone)")
    proj = pe.proj
    if (not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride
            or proj.kernel_size != pe.patch_size or proj.padding not in ((0, 0), 0)
            or pe.dynamic_img_pad or pe.patch_size[0] != pe.patch_size[1]):
        fail(f"patch_embed is not a square, non-overlapping conv (patch_size={pe.patch_size})",
             "build it with an int patch_size and dynamic_img_pad=False")
    if model.pos_embed.shape[1] != pe.num_patches + 1:
        fail(f"pos_embed has {model.pos_embed.shape[1]} positions, expected {pe.num_patches + 1}",
             "rebuild the model for its image and patch size")
    # The keep set replaces PatchDropout; a dropout rate > 0 would be silently ignored otherwise.
    if not isinstance(model.patch_drop, nn.Identity):
        fail("it uses PatchDropout (patch_drop_rate > 0)",
             "build it with patch_drop_rate=0; token dropping is done by keep_idx")
    # With global_pool='avg' timm moves the final norm after pooling, so tokens would be un-normed.
    if isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity):
        fail("the final norm is applied after pooling (fc_norm, global_pool='avg')",
             "build it with global_pool='token' so patch tokens are normalised")


def _patch_size(model: VisionTransformer) -> int:
    return model.patch_embed.patch_size[0]


def _check_idx(idx: Tensor, batch: int, num_patches: int, name: str) -> Tensor:
    """Validate (B, K) patch indices and return them as int64."""
    if idx.dim() != 2 or idx.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B={batch}, K), got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of patch indices, got dtype {idx.dtype}")
    idx = idx.long()
    if idx.numel() == 0:
        return idx
    # One host sync per call; an out-of-range gather on CUDA is an opaque device-side assert instead.
    bad_range = (idx.min() < 0) | (idx.max() >= num_patches)
    s = idx.sort(dim=1).values
    dup = (s[:, 1:] == s[:, :-1]).any()
    if bool(bad_range | dup):
        raise ValueError(
            f"{name} must hold unique patch indices in [0, {num_patches}) per sample; got min "
            f"{int(idx.min())}, max {int(idx.max())}, duplicates={bool(dup)}"
        )
    return idx


def embed_image_tokens(model: VisionTransformer, images: Tensor, keep_idx: Tensor) -> Tensor:
    """Embed full images and keep CLS + the listed patch tokens.

    Args:
        images: (B, 3, H, W) normalised float images at the model's image size.
        keep_idx: (B, K) integer patch indices in [0, N), row-major, unique per sample.
    Returns:
        (B, 1 + K, D): CLS then the kept tokens in ``keep_idx`` order, positions already added.
    """
    x = model.patch_embed(images)  # (B, N, D)
    keep_idx = _check_idx(keep_idx, x.shape[0], x.shape[1], "keep_idx")
    x = model._pos_embed(x)  # (B, 1 + N, D): CLS prepended, positions added
    d = x.shape[-1]
    kept = torch.gather(x[:, 1:], 1, keep_idx.unsqueeze(-1).expand(-1, -1, d))
    return torch.cat([x[:, :1], kept], dim=1)


def embed_patch_pixels(model: VisionTransformer, patches: Tensor, idx: Tensor) -> Tensor:
    """Embed only the visible patches' pixels; equals ``embed_image_tokens`` on the full image.

    This is how the student sees its visible patches without the rest of the image.

    Args:
        patches: (B, K, 3, p, p) normalised float pixels of the visible patches.
        idx: (B, K) their row-major grid indices in [0, N), unique per sample.
    Returns:
        (B, 1 + K, D): CLS then the patch tokens in ``idx`` order, positions added.
    """
    p = _patch_size(model)
    if patches.dim() != 5 or patches.shape[-2:] != (p, p):
        raise ValueError(f"patches must have shape (B, K, C, {p}, {p}), got {tuple(patches.shape)}")
    b, k, c = patches.shape[:3]
    if idx.shape[:2] != (b, k):
        raise ValueError(f"idx shape {tuple(idx.shape)} does not match patches (B={b}, K={k})")
    pe = model.patch_embed
    idx = _check_idx(idx, b, pe.num_patches, "idx")
    # A stride-p conv over one p x p patch is exactly that patch's token in the full-image conv.
    x = pe.proj(patches.reshape(b * k, c, p, p)).reshape(b, k, -1)  # (B, K, D)
    x = pe.norm(x)
    pos = model.pos_embed  # (1, 1 + N, D)
    d = x.shape[-1]
    x = x + torch.gather(pos[:, 1:].expand(b, -1, -1), 1, idx.unsqueeze(-1).expand(-1, -1, d))
    cls = (model.cls_token + pos[:, :1]).expand(b, -1, -1)
    return model.pos_drop(torch.cat([cls, x], dim=1))


def encode_tokens(model: VisionTransformer, x: Tensor) -> Tensor:
    """Run embedded tokens through the encoder: (B, 1 + K, D) -> norm_pre -> blocks -> norm -> (B, 1 + K, D)."""
    x = model.norm_pre(x)
    if model.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    return model.norm(x)


def forward_visible(model: VisionTransformer, images: Tensor, keep_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Token-dropping forward on full images.

    Args:
        images: (B, 3, H, W) normalised float images.
        keep_idx: (B, K) patch indices (see module docstring for the convention).
    Returns:
        cls (B, D) and patch tokens (B, K, D) after the final norm, patch j at ``keep_idx[:, j]``.
    """
    x = encode_tokens(model, embed_image_tokens(model, images, keep_idx))
    return x[:, 0], x[:, 1:]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C, p, p), row-major patches, N = (H/p)*(W/p). Any dtype (uint8 or float)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(b, gh * gw, c, p, p)


def unpatchify(patches: Tensor, grid: int | tuple[int, int]) -> Tensor:
    """Inverse of ``patchify``: (B, N, C, p, p) with N = gh * gw -> (B, C, gh*p, gw*p)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if patches.dim() != 5 or patches.shape[1] != gh * gw:
        raise ValueError(f"patches must be (B, {gh * gw}, C, p, p) for grid {gh}x{gw}, got {tuple(patches.shape)}")
    b, _, c, ph, pw = patches.shape
    x = patches.reshape(b, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
    return x.reshape(b, c, gh * ph, gw * pw)
