"""Frozen target bases: how each teacher's features are mapped to the student's width.

`pca_map` gives each teacher its own principal directions: channel c of teacher k is k's c-th
component with a per-teacher sign, so two teachers' adapted tokens live in unrelated coordinates and
the gate's agreement term and the fused average compare unrelated numbers (a teacher that is an exact
rotation of another gets token cosine ~0.2 with it).

`cca_maps` gives all teachers one shared basis: a multi-set CCA (MAXVAR, Kettenring 1971) of their
features at co-visible tokens. Each teacher is whitened (ridge-regularised), the whitened joint
covariance M is eigendecomposed, and teacher k's map is W_k V_k, where V_k is the k-th block of M's
leading eigenvectors. Output channel c is then the c-th shared canonical variate in every teacher:
a component all teachers carry has eigenvalue up to T and appears in each of them with the same sign;
a component only one teacher carries has eigenvalue ~1 and ranks behind every shared one, so at the
student's width the shared basis holds mostly what the teachers have in common. (Several teachers' private
components share that eigenvalue: eigh may return any rotation of them, so such a channel need not
belong to one teacher.) Hand-written (a few lines of eigh) because scikit-learn's CCA handles two views
only and iterates, while this is closed form.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _fix_signs(w: Tensor) -> Tensor:
    """Rows of w with their largest-magnitude entry made positive: eigh's signs are arbitrary, and a
    deterministic sign keeps runs and resumed runs identical."""
    pivot = w.abs().argmax(dim=1, keepdim=True)
    return w * torch.sign(w.gather(1, pivot))


def _check(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    d = mean.shape[0]
    if tuple(cov.shape) != (d, d):
        raise ValueError(f"cov must be ({d}, {d}) for a mean of ({d},), got {tuple(cov.shape)}")
    cov64, mean64 = cov.detach().double().cpu(), mean.detach().double().cpu()
    if not (torch.isfinite(cov64).all() and torch.isfinite(mean64).all()):
        raise ValueError("teacher statistics contain non-finite values; recompute them "
                         "(comad-store joint-stats, or re-run extraction)")
    return mean64, 0.5 * (cov64 + cov64.T)


def pca_map(mean: Tensor, cov: Tensor, out_dim: int) -> tuple[Tensor, Tensor]:
    """(W (out_dim, D), b (out_dim,)) with W the leading eigenvectors of cov and b = -W mean (float64)."""
    mean64, cov64 = _check(mean, cov)
    if out_dim > mean64.shape[0]:
        raise ValueError(f"PCA init needs out_dim <= in_dim, got {out_dim} > {mean64.shape[0]}; "
                         "use heads.adapter_init = 'random' or 'cca' for a widening adapter")
    _, vecs = torch.linalg.eigh(cov64)  # ascending eigenvalues, vectors in columns
    w = _fix_signs(vecs.flip(1)[:, :out_dim].T.contiguous())
    return w, -(w @ mean64)


def _inv_sqrt(c: Tensor, ridge: float) -> Tensor:
    """(C + ridge · mean eigenvalue · I)^(-1/2) of a symmetric PSD matrix."""
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp(min=0)
    vals = vals + ridge * float(vals.mean()) + torch.finfo(vals.dtype).tiny ** 0.5
    return (vecs * vals.rsqrt()) @ vecs.T


def cca_maps(mean: Tensor, cov: Tensor, dims: list[int], out_dim: int,
             ridge: float) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """One shared basis for T teachers from their joint statistics at co-visible tokens.

    Args:
        mean: (ΣD,) joint mean of the concatenated features [t_1 | ... | t_T].
        cov: (ΣD, ΣD) their joint covariance.
        dims: [D_1, ..., D_T], summing to ΣD.
        out_dim: width of the shared space (the student's), <= ΣD.
        ridge: added to each teacher's covariance as a fraction of its mean eigenvalue, so directions
            with almost no variance are not amplified into noise by the whitening.
    Returns:
        [(W_k (out_dim, D_k), b_k (out_dim,))] in float64, with W_k (t_k - mean_k) the shared
        coordinates of teacher k, and the leading eigenvalues (out_dim,) of the whitened joint
        covariance (T: every teacher carries the component, 1: one teacher alone).
    """
    mean64, cov64 = _check(mean, cov)
    total = sum(dims)
    if total != mean64.shape[0] or any(d < 1 for d in dims):
        raise ValueError(f"dims {dims} must be positive and sum to the statistics' width {mean64.shape[0]}")
    if not 1 <= out_dim <= total:
        raise ValueError(f"out_dim = {out_dim} must be in [1, {total}] (the teachers' total width)")
    offsets = [0]
    for d in dims:
        offsets.append(offsets[-1] + d)
    blocks = [slice(offsets[k], offsets[k + 1]) for k in range(len(dims))]
    whiten = torch.block_diag(*[_inv_sqrt(cov64[s, s], ridge) for s in blocks])
    vals, vecs = torch.linalg.eigh(whiten @ cov64 @ whiten)
    v = _fix_signs(vecs.flip(1)[:, :out_dim].T.contiguous()).T  # (ΣD, out_dim), one sign per shared variate
    a = whiten @ v  # (ΣD, out_dim): block k maps teacher k into the shared coordinates
    maps = []
    for s in blocks:
        w = a[s].T.contiguous()
        maps.append((w, -(w @ mean64[s])))
    return maps, vals.flip(0)[:out_dim]


def effective_rank(cov: Tensor) -> float:
    """RankMe (Garrido et al., ICML 2023): exp of the entropy of the normalised eigenvalue spectrum of a
    feature covariance — a label-free estimate of a self-supervised representation's quality (a collapsed
    teacher has rank near 1, a rich one near its width)."""
    vals = torch.linalg.eigvalsh(cov.detach().double().cpu()).clamp(min=0)
    p = vals / vals.sum().clamp(min=torch.finfo(vals.dtype).tiny)
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))
