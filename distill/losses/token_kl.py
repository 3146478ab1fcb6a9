"""Token-level KL (L_tok): per student-visible token, a softmax over channels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from store_schema.choices import check_temperature  # the one temperature rule (the config applies it too)


def upcast(x: Tensor) -> Tensor:
    # log-softmax differences lose most of their bits in bf16; keep float64 when a test asks for it.
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TokenKLLoss(nn.Module):
    """τ² · mean over tokens of KL(softmax(t/τ) ‖ softmax(s/τ)), softmax over the channel axis.

    The τ² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.). The
    target is detached unless `detach_target` is False — only for trainable target-side adapters,
    which otherwise could never learn (and whose collapse the trainer then logs).
    """

    def __init__(self, temperature: float, detach_target: bool = True) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature, "token KL temperature")
        self.detach_target = detach_target

    def forward(self, student: Tensor, target: Tensor) -> Tensor:
        """student, target: (B, K, d) -> scalar loss."""
        return self.per_token(student, target).mean()

    def per_token(self, student: Tensor, target: Tensor) -> Tensor:
        """student, target: (B, K, d) -> (B, K) τ² · KL per token (for per-token weighting)."""
        if student.dim() != 3 or student.shape != target.shape:
            raise ValueError(f"student {tuple(student.shape)} and target {tuple(target.shape)} must both be (B, K, d)")
        if student.shape[1] == 0:
            raise ValueError("token KL over zero tokens: the student saw no token")
        tau = self.temperature
        log_p_s = F.log_softmax(upcast(student) / tau, dim=-1)
        log_p_t = F.log_softmax(upcast(target.detach() if self.detach_target else target) / tau, dim=-1)
        return tau**2 * F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
