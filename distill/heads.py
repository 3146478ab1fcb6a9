"""Training-only heads around the student: projector, masked decoder, teacher adapters (README, "How the
teachers are fused").

None of these is exported; the exported student is a plain timm ViT.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from distill.basis import pca_map
from vit_layers.positions import sincos_pos_embed_2d

# timm's ViT normalisation (eps 1e-6); a partial so timm can pass device/dtype through.
_layer_norm = partial(nn.LayerNorm, eps=1e-6)


class Projector(nn.Module):
    """Linear head on the student's visible patch tokens: (B, K, d) -> (B, K, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class MaskedDecoder(nn.Module):
    """Reconstructs a feature map over all N positions from the student's visible tokens.

    Encoder tokens are scattered back onto the grid, a learnable mask token fills the positions the
    student did not see, fixed sin-cos positions tell the blocks where each token sits.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, grid_size: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"decoder dim {dim} is not divisible by decoder_heads {num_heads}")
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        # Not persistent: a fixed function of (dim, grid), so checkpoints need not carry it.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid_size, cls_token=True), persistent=False)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_layer_norm) for _ in range(depth)
        ])
        self.norm = _layer_norm(dim)
        self.pred = nn.Linear(dim, dim)
        self.apply(_init_linear)

    def forward(self, tokens: Tensor, idx: Tensor) -> Tensor:
        """tokens (B, 1+K, d) with CLS at 0, idx (B, K) grid indices of the patch tokens -> map (B, N, d)."""
        b, k1, d = tokens.shape
        if idx.shape != (b, k1 - 1):
            raise ValueError(f"idx {tuple(idx.shape)} must be (B, K) = {(b, k1 - 1)} for tokens {tuple(tokens.shape)}")
        grid = self.mask_token.to(tokens.dtype).expand(b, self.num_patches, d)
        grid = grid.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), tokens[:, 1:])
        x = torch.cat([tokens[:, :1], grid], dim=1) + self.pos_embed.to(tokens.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def _init_linear(m: nn.Module) -> None:
    # MAE's decoder init: xavier weights, zero biases (PyTorch's default is tuned for ReLU nets).
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class TeacherAdapter(nn.Module):
    """t̂ = LayerNorm(W t + b) without affine: (B, K, in_dim) -> (B, K, out_dim).

    Frozen by default (`trainable=False`): a trainable target-side map can collapse to a constant
    that any student matches. `init_from_statistics` makes W the top principal directions of this
    teacher alone; `set_map` installs a shared basis (distill.basis.cca_maps).
    """

    def __init__(self, in_dim: int, out_dim: int, trainable: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps, elementwise_affine=False)
        self.trainable = trainable
        self.requires_grad_(trainable)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))

    @torch.no_grad()
    def init_from_statistics(self, mean: Tensor, cov: Tensor) -> None:
        """PCA: W = the out_dim leading eigenvectors of cov (rows, descending eigenvalue), b = -W mean."""
        if tuple(cov.shape) != (self.in_dim, self.in_dim):
            raise ValueError(f"cov must be ({self.in_dim}, {self.in_dim}), got {tuple(cov.shape)}")
        if tuple(mean.shape) != (self.in_dim,):
            raise ValueError(f"mean must be ({self.in_dim},), got {tuple(mean.shape)}")
        self.set_map(*pca_map(mean, cov, self.out_dim))

    @torch.no_grad()
    def set_map(self, weight: Tensor, bias: Tensor) -> None:
        """Set W (out_dim, in_dim) and b (out_dim,), e.g. a shared basis from `distill.basis.cca_maps`."""
        if tuple(weight.shape) != (self.out_dim, self.in_dim) or tuple(bias.shape) != (self.out_dim,):
            raise ValueError(f"map must be W {(self.out_dim, self.in_dim)} and b ({self.out_dim},), got "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        self.proj.weight.copy_(weight)
        self.proj.bias.copy_(bias)
