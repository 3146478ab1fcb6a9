"""The training module: student + projector + decoder + teacher adapters + gate + dual KL (+ CLS term).

`CoMADDistiller.forward(batch)` is the whole method for one batch; the trainer only adds optimisation.

Targets: each teacher's patch tokens go through its adapter t̂_k = LN(W_k t_k + b_k) to the student's
width. `heads.adapter_init` chooses W_k: "cca" (the default) maps every teacher into ONE shared basis
fitted from the store's cross-teacher statistics (distill.basis.cca_maps), so the gate's agreement and
the fused average compare like with like; "pca" gives each teacher its own principal directions (the
first design: coordinates unrelated across teachers); "random" is random. Frozen unless
`heads.adapter_trainable` (then the collapse guard in distill.collapse watches the target spread).

Fusion (`heads.fusion`): "target" — the gate fuses the adapted teachers per token into one target
that the projector (visible tokens) and the decoder (full map) match; "loss" — each teacher gets its
own linear student head (the AM-RADIO / UNIC shape), the gate weights the per-teacher token losses per
token, and the map losses by each teacher's mean gate weight.

Gate prior (`gate.prior = "rankme"`): each teacher's gate weight is also multiplied by π_k^α, π_k its share
of the teachers' summed effective ranks (RankMe, distill.basis.effective_rank, from the store's per-teacher
statistics) and α = `gate.prior_power`, before renormalising: a label-free quality estimate, so a collapsed
or near-random teacher counts less than a rich one wherever both saw a token (consensus alone follows the
majority).

Global level (`loss.cls_weight` > 0), `loss.cls_fusion`: "mean" — a linear head per teacher on the student's
CLS matches that teacher's adapted CLS (token-level KL over channels), averaged over teachers; "gate" — one
head on the student's CLS matches the teachers' adapted CLS fused by the same consensus gate as the patch
tokens (the CLS as one more token every teacher saw, the head's output as the query).

Adapters, heads on the target side, the gate and the losses run in float32 even inside a bf16 autocast:
a τ = 0.1 softmax over cosines and log-softmax differences lose most of their bits in bf16.

State-dict prefixes: `student.` (a plain timm ViT, what export keeps), `projector.`, `decoder.`,
`adapters.<t>.`, `teacher_heads.<t>.`, `cls_heads.<t>.` (or `cls_head.`), `target_norm.<t>.`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from distill.basis import cca_maps, effective_rank
from distill.batch import StudentBatch
from distill.consensus_gate import consensus_gate, gate_statistics
from distill.heads import MaskedDecoder, Projector, TeacherAdapter
from distill.losses import MapKLLoss, TokenKLLoss
from distill.student import build_student, student_forward
from store_schema.config import PipelineConfig
from store_schema.stats import RunningStats
from vit_layers.pixels import normalize_pixels

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


def _grid(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """values (B, K, d) at grid indices idx (B, K) -> (B, N, d), zeros elsewhere."""
    b, _, d = values.shape
    return values.new_zeros(b, n, d).scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), values)


def _at(grid: Tensor, idx: Tensor) -> Tensor:
    """grid (..., N, d) gathered at idx (B, K) -> (..., K, d); grid is (B, N, d) or (B, T, N, d)."""
    index = idx.unsqueeze(-1).expand(*idx.shape, grid.shape[-1])
    if grid.dim() == 4:
        index = index.unsqueeze(1).expand(-1, grid.shape[1], -1, -1)
    return grid.gather(-2, index)


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
        h, lo = cfg.heads, cfg.loss
        self.projector = Projector(dim)
        self.decoder = MaskedDecoder(dim, h.decoder_depth, h.decoder_heads, h.decoder_mlp_ratio, cfg.grid_size)
        self.adapters = nn.ModuleDict(
            {t: TeacherAdapter(teacher_dims[t], dim, trainable=h.adapter_trainable) for t in self.teacher_names})
        self.fusion, self.adapter_init, self.cca_ridge = h.fusion, h.adapter_init, h.cca_ridge
        if self.fusion == "loss":
            self.teacher_heads = nn.ModuleDict({t: Projector(dim) for t in self.teacher_names})
        self.cls_weight, self.cls_fusion = lo.cls_weight, lo.cls_fusion
        if self.cls_weight > 0 and self.cls_fusion == "gate":
            self.cls_head = Projector(dim)
        elif self.cls_weight > 0:
            self.cls_heads = nn.ModuleDict({t: Projector(dim) for t in self.teacher_names})
        self.standardize = lo.standardize_targets
        if self.standardize:
            self.target_norm = nn.ModuleDict({t: TargetNorm(teacher_dims[t]) for t in self.teacher_names})
        # Trainable adapters learn through the targets; frozen ones (the default) keep them constant.
        self.token_loss = TokenKLLoss(lo.token_temperature, detach_target=not h.adapter_trainable)
        self.map_loss = MapKLLoss(lo.map_temperature, detach_target=not h.adapter_trainable)
        self.token_weight, self.map_weight = lo.token_weight, lo.map_weight
        self.gate_variant, self.gate_temperature = cfg.gate.variant, cfg.gate.temperature
        if cfg.gate.prior != "none":  # set from the store's statistics; saved with the model
            self.register_buffer("gate_prior", torch.ones(len(self.teacher_names)))
            self.prior_power = cfg.gate.prior_power
        self.adapter_trainable = h.adapter_trainable
        self.register_buffer("pixel_mean", torch.tensor(cfg.student.mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.student.std), persistent=False)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_from_statistics(self, stats: dict[str, RunningStats], pca: bool,
                             joint: tuple[RunningStats, list[int]] | None = None) -> None:
        """Set the standardisation buffers, and the adapters from the statistics.

        stats: each teacher's own statistics (all its tokens); joint: the cross-teacher statistics at
        co-visible tokens over self.teacher_names in order, with their widths (store_schema.joint_stats),
        required for heads.adapter_init = "cca". `pca` initialises each adapter from its own statistics.
        With standardised targets the adapter sees standardised features, so the statistics are
        standardised the same way first.
        """
        std_all = []
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
                std_all.append((mean, std))
                mean, cov = torch.zeros_like(mean), cov / torch.outer(std, std)
            if pca:
                self.adapters[t].init_from_statistics(mean, cov)
        self.set_gate_prior({t: effective_rank(torch.from_numpy(np.asarray(stats[t].cov))) for t in self.teacher_names})
        if joint is not None:
            self._init_shared_basis(*joint, std_all)

    @torch.no_grad()
    def set_gate_prior(self, ranks: dict[str, float]) -> None:
        """gate.prior = "rankme": each teacher's share of the teachers' effective ranks, raised to
        gate.prior_power and renormalised (no-op without a prior)."""
        if hasattr(self, "gate_prior"):
            r = torch.tensor([float(ranks[t]) for t in self.teacher_names], dtype=torch.float64) ** self.prior_power
            self.gate_prior.copy_(r / r.sum())

    def _init_shared_basis(self, joint: RunningStats, dims: list[int], std_all: list[tuple[Tensor, Tensor]]) -> None:
        mean, cov = torch.from_numpy(np.asarray(joint.mean)), torch.from_numpy(np.asarray(joint.cov))
        if std_all:  # the adapters see (x - mean_t) / std_t: express the joint statistics the same way
            mu = torch.cat([m for m, _ in std_all]).double()
            sd = torch.cat([s for _, s in std_all]).double()
            mean, cov = (mean - mu) / sd, cov / torch.outer(sd, sd)
        maps, _ = cca_maps(mean, cov, dims, self.student.embed_dim, self.cca_ridge)
        for t, (w, b) in zip(self.teacher_names, maps):
            self.adapters[t].set_map(w, b)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: StudentBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """One batch (distill/batch.py; its targets decoded, float) -> (loss, detached metrics).
        Metrics: loss, loss_token, loss_map, [loss_cls], gate_weight/<t>, gate_entropy, covered_fraction,
        and target_std/<t> with trainable adapters.
        """
        idx = batch["student_idx"]
        pixels = normalize_pixels(batch["pixels"], self.pixel_mean, self.pixel_std)
        tokens, patch_tokens = student_forward(self.student, pixels, idx)
        s, s_map = self.projector(patch_tokens), self.decoder(tokens, idx)  # (B, Ks, d), (B, N, d)
        with torch.autocast(s.device.type, enabled=False):  # targets, gate and losses in float32
            s, s_map, cls = s.float(), s_map.float(), tokens[:, 0].float()
            targets, visible = self._targets(batch, s_map.shape[1])  # (B, T, N, d), (B, T, N)
            fuse = self._fuse_targets if self.fusion == "target" else self._fuse_losses
            loss_token, loss_map, weights = fuse(s, s_map, idx, targets, visible)
            terms = [(self.token_weight, loss_token), (self.map_weight, loss_map)]
            metrics = {"loss_token": loss_token.detach(), "loss_map": loss_map.detach()}
            if self.cls_weight > 0:
                loss_cls = self._cls_loss(cls, batch["teacher_cls"])
                terms.append((self.cls_weight, loss_cls))
                metrics["loss_cls"] = loss_cls.detach()
            # A zero-weight term stays out of the graph: its head then gets no gradient at all (not NaN·0).
            loss = sum(w * x for w, x in terms if w > 0)
        metrics["loss"] = loss.detach()
        metrics.update(self._gate_metrics(weights, visible, targets))
        return loss, metrics

    def _targets(self, batch: StudentBatch, n: int) -> tuple[Tensor, Tensor]:
        """Adapted teacher tokens on the full grid (B, T, N, d), zero where unseen, and visibility (B, T, N)."""
        targets, visible = [], []
        for t in self.teacher_names:
            feats = batch["teacher_patch"][t].float()
            if self.standardize:
                feats = self.target_norm[t](feats)
            t_idx = batch["teacher_idx"][t]
            targets.append(_grid(self.adapters[t](feats), t_idx, n))
            visible.append(torch.zeros(t_idx.shape[0], n, dtype=torch.bool, device=t_idx.device).scatter(1, t_idx, True))
        return torch.stack(targets, 1), torch.stack(visible, 1)

    def _fuse_targets(self, s: Tensor, s_map: Tensor, idx: Tensor, targets: Tensor,
                      visible: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One gated target t̄ per token; the projector matches it at V_s, the decoder over the covered map."""
        query = s_map.scatter(1, idx.unsqueeze(-1).expand(-1, -1, s.shape[-1]), s)  # s_i where seen, s̃_i elsewhere
        fused, weights = consensus_gate(query, targets, visible, self.gate_variant, self.gate_temperature,
                                        getattr(self, "gate_prior", None))
        if self.adapter_trainable:  # same values; the gate weights stay gradient-free, the adapters get one
            fused = (weights.unsqueeze(-1) * targets).sum(1)
        return self.token_loss(s, _at(fused, idx)), self.map_loss(s_map, fused, visible.any(1)), weights

    def _fuse_losses(self, s: Tensor, s_map: Tensor, idx: Tensor, targets: Tensor,
                     visible: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A student head per teacher; gate-weighted per-teacher losses (weights detached)."""
        heads = [self.teacher_heads[t] for t in self.teacher_names]
        s_k = torch.stack([h(s) for h in heads], 1)  # (B, T, Ks, d)
        map_k = torch.stack([h(s_map) for h in heads], 1)  # (B, T, N, d)
        d = s.shape[-1]
        query = map_k.scatter(2, idx[:, None, :, None].expand(-1, len(heads), -1, d), s_k)
        _, weights = consensus_gate(query, targets, visible, self.gate_variant, self.gate_temperature,
                                    getattr(self, "gate_prior", None))
        tgt_k = _at(targets, idx)  # (B, T, Ks, d): every teacher saw every student token
        b, k, ks, _ = s_k.shape
        kl = self.token_loss.per_token(s_k.reshape(b * k, ks, d), tgt_k.reshape(b * k, ks, d)).view(b, k, ks)
        loss_token = (_at(weights.unsqueeze(-1), idx).squeeze(-1) * kl).sum(1).mean()
        share = gate_statistics(weights, visible)["teacher_weight"]
        share = share / share.sum().clamp(min=1e-12)
        loss_map = sum(share[j] * self.map_loss(map_k[:, j], targets[:, j], visible[:, j]) for j in range(k))
        return loss_token, loss_map, weights

    def _cls_loss(self, cls: Tensor, teacher_cls: dict[str, Tensor]) -> Tensor:
        """cls_fusion "mean": mean over teachers of the token-level KL between head_k(student CLS) and teacher
        k's adapted CLS; "gate": the KL between head(student CLS) and the gated fusion of the adapted CLS."""
        targets = []
        for t in self.teacher_names:
            feats = teacher_cls[t].float()
            if self.standardize:
                feats = self.target_norm[t](feats)
            targets.append(self.adapters[t](feats).unsqueeze(1))  # (B, 1, d)
        if self.cls_fusion == "mean":
            return torch.stack([self.token_loss(self.cls_heads[t](cls).unsqueeze(1), target)
                                for t, target in zip(self.teacher_names, targets)]).mean()
        s = self.cls_head(cls).unsqueeze(1)  # (B, 1, d)
        stacked = torch.stack(targets, 1)  # (B, T, 1, d), every teacher saw the image
        visible = torch.ones(stacked.shape[:3], dtype=torch.bool, device=stacked.device)
        fused, weights = consensus_gate(s, stacked, visible, self.gate_variant, self.gate_temperature,
                                        getattr(self, "gate_prior", None))
        if self.adapter_trainable:  # as in _fuse_targets: the adapters get a gradient through the target
            fused = (weights.unsqueeze(-1) * stacked).sum(1)
        return self.token_loss(s, fused)

    @torch.no_grad()
    def _gate_metrics(self, weights: Tensor, visible: Tensor, targets: Tensor) -> dict[str, Tensor]:
        stats = gate_statistics(weights, visible)
        out = {"gate_entropy": stats["entropy"], "covered_fraction": stats["covered_fraction"]}
        for k, t in enumerate(self.teacher_names):
            out[f"gate_weight/{t}"] = stats["teacher_weight"][k]
            if self.adapter_trainable:
                # Spread across visible tokens, mean over channels: -> 0 when the adapter collapses.
                seen = targets[:, k][visible[:, k]].float()
                out[f"target_std/{t}"] = seen.std(0).mean() if len(seen) > 1 else seen.new_zeros(())
        return out
