"""Map-level KL (L_map): per image and channel, a softmax over the covered grid positions.

Only positions some teacher saw (C = {i : A_i ≠ ∅}) have a target, so the softmax runs over C alone.
Uncovered entries are replaced with `torch.where` before any arithmetic, which keeps whatever they
hold (even NaN) out of both the value and the gradient; an image with an empty C is dropped from
the mean instead of producing a softmax over nothing.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.losses.token_kl import upcast
from store_schema.choices import check_temperature


def _masked_log_softmax(x: Tensor, covered: Tensor, fill: Tensor) -> Tensor:
    """log-softmax over positions (dim 1) of x (B, N, d) restricted to covered (B, N, 1); 0 elsewhere."""
    logits = torch.where(covered, x, fill)
    return torch.where(covered, torch.log_softmax(logits, dim=1), 0.0)


class MapKLLoss(nn.Module):
    """τ'² · mean over images and channels of KL(softmax_C(t/τ') ‖ softmax_C(s̃/τ')) over positions.

    The target is detached unless `detach_target` is False (trainable target-side adapters only).
    """

    def __init__(self, temperature: float, detach_target: bool = True) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature, "map KL temperature")
        self.detach_target = detach_target

    def forward(self, student_map: Tensor, target_map: Tensor, covered: Tensor) -> Tensor:
        """student_map, target_map: (B, N, d); covered: (B, N) bool -> scalar loss."""
        if student_map.dim() != 3 or student_map.shape != target_map.shape:
            raise ValueError(f"student_map {tuple(student_map.shape)} and target_map {tuple(target_map.shape)} "
                             "must both be (B, N, d)")
        if covered.dtype != torch.bool or tuple(covered.shape) != tuple(student_map.shape[:2]):
            raise ValueError(f"covered must be a bool (B, N) = {tuple(student_map.shape[:2])} mask, "
                             f"got {covered.dtype} {tuple(covered.shape)}")
        tau = self.temperature
        mask = covered.unsqueeze(-1)
        has_any = covered.any(1)
        # -inf drops uncovered positions from the softmax; an all-empty image gets a finite fill
        # instead, because a softmax over only -inf is NaN in both value and gradient.
        fill = torch.where(has_any, -math.inf, 0.0).to(upcast(student_map).dtype)[:, None, None]
        log_p_s = _masked_log_softmax(upcast(student_map) / tau, mask, fill)
        target = target_map.detach() if self.detach_target else target_map
        log_p_t = _masked_log_softmax(upcast(target) / tau, mask, fill)
        p_t = torch.where(mask, log_p_t.exp(), 0.0)
        kl = (p_t * (log_p_t - log_p_s)).sum(1)  # (B, d); exactly 0 for images with nothing covered
        count = (has_any.sum() * kl.shape[-1]).clamp(min=1)
        return tau**2 * kl.sum() / count

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
