"""Fixed 2-D sin-cos position embeddings in MAE's layout (the student's positions; MAE-style checkpoints)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sincos_pos_embed_2d"]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): sin of dim/2 frequencies, then cos of the same (MAE's order)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool) -> Tensor:
    """Fixed 2-D sin-cos positions in MAE's layout: (1, [1 +] grid_size², dim), float32.

    Tokens are row-major. The first dim/2 channels encode the column (x) coordinate and the last
    dim/2 the row (y) coordinate, as MAE's `get_2d_sincos_pos_embed` does (its meshgrid puts x
    first), so a student built here matches MAE-style checkpoints. The CLS position is all zeros.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positions need an embedding dim divisible by 4, got {dim}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
