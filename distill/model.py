"""The training module: student + projector + decoder + frozen teacher adapters + gate + dual KL.

`CoMADDistiller.forward(batch)` is the whole method of DESIGN §5-7 for one batch; the trainer only
adds optimisation. State-dict prefixes: `student.` (a plain timm ViT, what export keeps),
`projector.`, `decoder.`, `adapters.<teacher>.`, `target_norm.<teacher>.` (stored feature mean/std,
used only when loss.standardize_targets).
"""
from __future__ import annotations


import numpy as np
import torch
from torch import Tensor, nn

from distill.consensus_gate import consensus_gate, gate_statistics
from distill.heads import MaskedDecoder, Projector, TeacherAdapter
from distill.losses import MapKLLoss, TokenKLLoss
from distill.student import build_student, student_forward
from store_schema.config import PipelineConfig
from store_schema.stats import RunningStats

# Standardisation floors each channel's std at this fraction of the median channel std.
_STD_FLOOR = 1e-3


class TargetNorm(nn.Module):
    """Standardise teacher features with the store's statistics: (..., D) -> (..., D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class CoMADDistiller(nn.Module):
    def __init__(self, cfg: PipelineConfig, teacher_dims: dict[str, int]) -> None:
        """teacher_dims: feature width of each teacher, in the order the gate stacks them."""
        super().__init__()
        missing = sorted(set(cfg.distill_teachers) - set(teacher_dims))
        if missing:
            raise ValueError(f"no feature width for teacher(s) {missing}: the store does not hold them")
        self.teacher_names = cfg.distill_teachers
        self.student = build_student(cfg.student, cfg.data.image_size, cfg.data.patch_size)
        dim = self.student.embed_dim
        h = cfg.heads
        self.projector = Projector(dim)
        self.decoder = MaskedDecoder(dim, h.decoder_depth, h.decoder_heads, h.decoder_mlp_ratio, cfg.grid_size)
        self.adapters = nn.ModuleDict(
            {t: TeacherAdapter(teacher_dims[t], dim, trainable=h.adapter_trainable) for t in self.teacher_names})
        self.standardize = cfg.loss.standardize_targets
        if self.standardize:
            self.target_norm = nn.ModuleDict({t: TargetNorm(teacher_dims[t]) for t in self.teacher_names})
        # Trainable adapters learn through the targets; frozen ones (the default) keep them constant.
        self.token_loss = TokenKLLoss(cfg.loss.token_temperature, detach_target=not h.adapter_trainable)
        self.map_loss = MapKLLoss(cfg.loss.map_temperature, detach_target=not h.adapter_trainable)
        self.token_weight, self.map_weight = cfg.loss.token_weight, cfg.loss.map_weight
        self.gate_variant, self.gate_temperature = cfg.gate.variant, cfg.gate.temperature
        self.adapter_trainable = h.adapter_trainable
        self.register_buffer("pixel_mean", torch.tensor(cfg.student.mean).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.student.std).view(1, 1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def init_from_statistics(self, stats: dict[str, RunningStats], pca: bool) -> None:
        """Set the standardisation buffers and (when `pca`) the adapters from each teacher's statistics.

        With standardised targets the adapter sees standardised features, so its PCA is taken of their
        correlation matrix (mean 0) rather than of the raw covariance.
        """
        for t in self.teacher_names:
            s = stats.get(t)
            if s is None or s.count < 2:
                raise ValueError(f"teacher {t!r} has no feature statistics in the store (count "
                                 f"{0 if s is None else s.count}); re-run extraction, or set "
                                 "heads.adapter_init = \"random\" and loss.standardize_targets = false")
            mean, cov = torch.from_numpy(np.asarray(s.mean)), torch.from_numpy(np.asarray(s.cov))
            if self.standardize:
                std = cov.diagonal().clamp(min=0).sqrt()
                # A (near-)constant channel would be amplified into noise: floor its std relative to the rest.
                std = std.clamp(min=max(_STD_FLOOR * float(std.median()), 1e-12))
                self.target_norm[t].mean.copy_(mean)
                self.target_norm[t].std.copy_(std)
                mean, cov = torch.zeros_like(mean), cov / torch.outer(std, std)
            if pca:
                self.adapters[t].init_from_statistics(mean, cov)

    def init_adapters(self, stats: dict[str, RunningStats]) -> None:
        """PCA-initialise every adapter (heads.adapter_init = "pca") from FeatureStore.teacher_stats."""
        self.init_from_statistics(stats, pca=True)

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """One batch -> (loss, detached metrics).

        batch: pixels uint8 (B, Ks, 3, p, p); student_idx int64 (B, Ks); teacher_idx {t: (B, Kt)};
        teacher_patch {t: float (B, Kt, D_t)}. Metrics: loss, loss_token, loss_map,
        gate_weight/<t>, gate_entropy, covered_fraction, and target_var/<t> with trainable adapters.
        """
        idx = batch["student_idx"]
        pixels = (batch["pixels"].float() / 255.0 - self.pixel_mean) / self.pixel_std
        tokens, patch_tokens = student_forward(self.student, pixels, idx)
        s = self.projector(patch_tokens)  # (B, Ks, d)
        s_map = self.decoder(tokens, idx)  # (B, N, d)
        b, n, d = s_map.shape
        targets, visible = [], []
        for t in self.teacher_names:
            feats = batch["teacher_patch"][t].float()
            if self.standardize:
                feats = self.target_norm[t](feats)
            t_idx = batch["teacher_idx"][t]
            adapted = self.adapters[t](feats)  # (B, Kt, d)
            targets.append(adapted.new_zeros(b, n, d).scatter(1, t_idx.unsqueeze(-1).expand(-1, -1, d), adapted))
            visible.append(torch.zeros(b, n, dtype=torch.bool, device=s_map.device).scatter(1, t_idx, True))
        targets_t, visible_t = torch.stack(targets, 1), torch.stack(visible, 1)  # (B, T, N, d), (B, T, N)
        query = s_map.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), s)  # u: s_i where seen, s̃_i elsewhere
        fused, weights = consensus_gate(query, targets_t, visible_t, self.gate_variant, self.gate_temperature)
        if self.adapter_trainable:  # same values; the gate weights stay gradient-free, the adapters get one
            fused = (weights.unsqueeze(-1).to(targets_t.dtype) * targets_t).sum(1)
        loss_token = self.token_loss(s, fused.gather(1, idx.unsqueeze(-1).expand(-1, -1, d)))
        loss_map = self.map_loss(s_map, fused, visible_t.any(1))
        # A zero-weight term stays out of the graph: its head then gets no gradient at all (not NaN·0).
        loss = sum(w * x for w, x in ((self.token_weight, loss_token), (self.map_weight, loss_map)) if w > 0)
        stats = gate_statistics(weights, visible_t)
        metrics = {"loss": loss.detach(), "loss_token": loss_token.detach(), "loss_map": loss_map.detach(),
                   "gate_entropy": stats["entropy"], "covered_fraction": stats["covered_fraction"]}
        for k, t in enumerate(self.teacher_names):
            metrics[f"gate_weight/{t}"] = stats["teacher_weight"][k]
            if self.adapter_trainable:
                # Variance across visible tokens, mean over channels: -> 0 when the adapter collapses.
                seen = targets_t[:, k][visible_t[:, k]].detach().float()
                metrics[f"target_var/{t}"] = seen.var(0).mean() if len(seen) > 1 else seen.new_zeros(())
        return loss, metrics
