"""Joint consensus gate: per-token, parameter-free fusion of several teachers' adapted features.

For image b and grid position i, the teachers that saw i are A_i = {k : visible[b, k, i]}. Each gets a
score from its cosine affinity to the (detached) student query u_i and its mean cosine agreement with
the other teachers in A_i; the weights are a temperature softmax of the scores over A_i only (README,
"How the teachers are fused"). Nothing here has parameters or passes gradient: the fused map is a target.

Teachers drop different tokens, so `targets` is a dense (B, T, N, d) grid whose invisible entries are
undefined (uninitialised memory, zeros, even NaN). They are replaced by zeros with `torch.where` before
any arithmetic, so no value there can reach a score, a weight or the fused target.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from store_schema.choices import GATE_VARIANTS  # defined once: gate.variant's choices in the config are these


def _check_args(query: Tensor, targets: Tensor, visible: Tensor, variant: str, temperature: float,
                prior: Tensor | None = None) -> None:
    if variant not in GATE_VARIANTS:
        raise ValueError(f"unknown gate variant {variant!r}; choose one of {', '.join(map(repr, GATE_VARIANTS))}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"gate temperature must be a finite number > 0, got {temperature!r}")
    if query.dim() not in (3, 4):
        raise ValueError(f"query must be (B, N, d), or (B, T, N, d) per teacher, got shape {tuple(query.shape)}")
    if targets.dim() != 4:
        raise ValueError(f"targets must be (B, T, N, d) (teachers on the full grid), got shape {tuple(targets.shape)}")
    b, t, n, d = targets.shape
    if t < 1:
        raise ValueError("targets hold no teacher (T = 0)")
    if tuple(query.shape) not in ((b, n, d), (b, t, n, d)):
        raise ValueError(f"query shape {tuple(query.shape)} does not match targets (B, T, N, d) = {(b, t, n, d)}: "
                         f"expected {(b, n, d)} or {(b, t, n, d)}")
    if prior is not None and (tuple(prior.shape) != (t,) or not bool((prior > 0).all() & prior.isfinite().all())):
        raise ValueError(f"prior must be ({t},) finite positive teacher weights, got {prior.tolist()}")
    if visible.dtype != torch.bool:
        raise TypeError(f"visible must be a bool mask, got dtype {visible.dtype}")
    if tuple(visible.shape) != (b, t, n):
        raise ValueError(f"visible shape {tuple(visible.shape)} does not match targets: expected {(b, t, n)}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # A softmax at τ = 0.1 of cosines is sensitive to bf16 rounding; work in at least float32.
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _scores(q: Tensor, t: Tensor, visible: Tensor, variant: str) -> Tensor:
    """Per-teacher scores c (B, T, N) for a masked, zero-filled target grid t (B, T, N, d)."""
    if variant == "mean":
        return torch.zeros(visible.shape, dtype=t.dtype, device=t.device)
    tn = F.normalize(t, dim=-1)  # zero rows stay zero, so invisible teachers add nothing below
    qn = F.normalize(q, dim=-1)
    qn = qn.unsqueeze(1) if qn.dim() == 3 else qn  # one query for all teachers, or one per teacher's head
    if variant == "affinity":
        return (tn * qn).sum(-1)
    # Pairwise cosines (B, N, T, T) with the diagonal removed; invisible j are zero rows already.
    pair = torch.einsum("bknd,bjnd->bnkj", tn, tn)
    eye = torch.eye(pair.shape[-1], dtype=torch.bool, device=pair.device)
    pair = pair.masked_fill(eye, 0.0)
    others = (visible.sum(1, keepdim=True) - 1).clamp(min=1)  # |A_i| - 1, guarded for lone teachers
    agreement = pair.sum(-1).permute(0, 2, 1) / others  # 0 where k is the only teacher that saw i
    if variant == "agreement":
        return agreement
    affinity = (tn * qn).sum(-1)
    return 0.5 * (affinity + agreement)


@torch.no_grad()
def consensus_gate(query: Tensor, targets: Tensor, visible: Tensor, variant: str,
                   temperature: float, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fuse teachers per token.

    Args:
        query: (B, N, d) student query u_i (projector output where the student saw i, decoder output
            elsewhere), or (B, T, N, d) with one query per teacher (each teacher's own student head, for
            loss-level fusion); detached here.
        targets: (B, T, N, d) adapted teacher tokens on the full grid; ignored where not visible.
        visible: (B, T, N) bool, teacher k saw token i.
        variant: one of GATE_VARIANTS.
        temperature: τ_g > 0 of the softmax over teachers.
        prior: optional (T,) positive teacher weights π_k, w_k ∝ π_k exp(c_k / τ_g) (the model passes each
            teacher's share of the summed effective ranks, `distill.basis.effective_rank`).

    Returns:
        fused: (B, N, d) Σ_k w_k,i t̂_k,i; exactly zero at positions no teacher saw.
        weights: (B, T, N) softmax over k ∈ A_i; exactly zero for k ∉ A_i and at uncovered positions.
        Both in float32 (or the inputs' wider dtype) and without autograd history.
    """
    _check_args(query, targets, visible, variant, temperature, prior)
    dtype = _compute_dtype(query, targets)
    t = torch.where(visible.unsqueeze(-1), targets.to(dtype), 0.0)
    q = query.detach().to(dtype)
    logits = _scores(q, t, visible, variant) / temperature
    if prior is not None:
        logits = logits + prior.to(dtype).log().view(1, -1, 1)
    covered = visible.any(1, keepdim=True)
    # Uncovered rows get finite logits (a softmax of all -inf is NaN) and are zeroed by the mask after.
    logits = torch.where(visible | ~covered, logits, -math.inf)
    logits = torch.where(covered, logits, 0.0)
    weights = torch.softmax(logits, dim=1) * visible
    fused = torch.einsum("btn,btnd->bnd", weights, t)
    return fused, weights


@torch.no_grad()
def gate_statistics(weights: Tensor, visible: Tensor) -> dict[str, Tensor]:
    """What the trainer logs each step, averaged over covered tokens (those some teacher saw).

    Args:
        weights: (B, T, N) gate weights from `consensus_gate`.
        visible: (B, T, N) bool visibility used to compute them.

    Returns:
        "teacher_weight": (T,) mean weight of each teacher (zero where it did not see the token);
        "entropy": () mean gate entropy in nats, 0 where one teacher saw the token, log|A_i| at most;
        "covered_fraction": () fraction of grid positions some teacher saw.
        All zeros when nothing is covered.
    """
    if weights.dim() != 3 or tuple(weights.shape) != tuple(visible.shape):
        raise ValueError(f"weights {tuple(weights.shape)} and visible {tuple(visible.shape)} must both be (B, T, N)")
    covered = visible.any(1)  # (B, N)
    count = covered.sum().clamp(min=1).to(weights.dtype)
    w = torch.where(covered.unsqueeze(1), weights, 0.0)
    entropy = -torch.special.xlogy(w, w).sum(1)  # xlogy keeps 0·log 0 = 0
    return {
        "teacher_weight": w.sum((0, 2)) / count,
        "entropy": entropy.sum() / count,
        "covered_fraction": covered.to(weights.dtype).mean(),
    }
