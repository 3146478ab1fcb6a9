"""Target-collapse guard for trainable adapters (heads.adapter_trainable = true).

A trainable target-side adapter gets gradient from the distillation loss, and that loss falls fastest
when the targets stop depending on the input: every token mapped to one vector that any student
matches. The model logs `target_std/<t>`, the spread of teacher t's adapted targets across the
visible tokens of a batch (mean over channels; ~1 for healthy LayerNorm'd targets, -> 0 on collapse).
Like data2vec's guard, a spread below `heads.collapse_min_std` for `heads.collapse_patience`
consecutive steps stops the run (`collapse_action = "stop"`) or warns once (`"warn"`).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from store_schema.config import PipelineConfig

PREFIX = "target_std/"


class TargetCollapseError(RuntimeError):
    """The trainable adapters' targets collapsed; the message names the teacher and the settings."""


class CollapseGuard:
    def __init__(self, cfg: PipelineConfig) -> None:
        h = cfg.heads
        self.active = h.adapter_trainable and h.collapse_min_std > 0
        self.min_std, self.patience, self.action = h.collapse_min_std, h.collapse_patience, h.collapse_action
        self.run, self.warned = 0, False

    def update(self, step: int, metrics: dict[str, Tensor], reduce) -> str | None:
        """Check one step's metrics; `reduce` averages a tensor over ranks (every rank calls this alike).

        Returns a warning message when one was issued, raises TargetCollapseError on "stop".
        """
        if not self.active:
            return None
        names = sorted(k for k in metrics if k.startswith(PREFIX))
        if not names:
            return None
        stds = reduce(torch.stack([metrics[k].float() for k in names])).cpu()
        worst = int(stds.argmin())
        self.run = self.run + 1 if float(stds[worst]) < self.min_std else 0
        if self.run < self.patience:
            return None
        message = (f"step {step}: the trainable adapter targets of teacher {names[worst][len(PREFIX):]!r} collapsed "
                   f"(target std {float(stds[worst]):.4g} < heads.collapse_min_std = {self.min_std} for "
                   f"{self.run} consecutive steps): the targets no longer depend on the image. Use frozen "
                   "adapters (heads.adapter_trainable = false, heads.adapter_init = \"cca\"), or lower optim.base_lr")
        if self.action == "stop":
            raise TargetCollapseError(message)
        if not self.warned:
            self.warned = True
            warnings.warn(message)
            return message
        return None
