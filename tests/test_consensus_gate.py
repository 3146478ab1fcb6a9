"""Consensus gate against a loop-by-loop reference of its definition (distill/consensus_gate.py's docstring),
plus its invariants."""
from __future__ import annotations

import math

import pytest
import torch

from distill.consensus_gate import GATE_VARIANTS, consensus_gate, gate_statistics

B, T, N, D = 2, 3, 10, 6


def _cos(x: list[float], y: list[float]) -> float:
    nx = math.sqrt(sum(v * v for v in x))
    ny = math.sqrt(sum(v * v for v in y))
    return sum(a * b for a, b in zip(x, y)) / max(nx * ny, 1e-300)


def reference_gate(query, targets, visible, variant, tau, prior=None):
    """Straight transcription of the gate's definition with python loops and the math module."""
    b_, t_, n_, d_ = targets.shape
    fused = torch.zeros(b_, n_, d_, dtype=torch.float64)
    weights = torch.zeros(b_, t_, n_, dtype=torch.float64)
    for b in range(b_):
        for i in range(n_):
            seen = [k for k in range(t_) if bool(visible[b, k, i])]
            if not seen:
                continue
            u = query[b, i].tolist()
            vec = {k: targets[b, k, i].tolist() for k in seen}
            scores = {}
            for k in seen:
                a = _cos(u, vec[k])
                others = [j for j in seen if j != k]
                g = sum(_cos(vec[k], vec[j]) for j in others) / len(others) if others else 0.0
                scores[k] = {"joint": (a + g) / 2, "mean": 0.0, "affinity": a, "agreement": g}[variant]
            pi = [1.0] * t_ if prior is None else [float(p) for p in prior]
            top = max(scores.values())
            z = sum(pi[k] * math.exp((scores[k] - top) / tau) for k in seen)
            for k in seen:
                w = pi[k] * math.exp((scores[k] - top) / tau) / z
                weights[b, k, i] = w
                for c in range(d_):
                    fused[b, i, c] += w * vec[k][c]
    return fused, weights


def irregular_visibility(seed: int = 0) -> torch.Tensor:
    """(B, T, N) mask whose tokens are seen by 0, 1, 2 and 3 teachers, in both images."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.rand(B, T, N, generator=g) < 0.5
    vis[:, :, 0] = False                      # nobody
    vis[:, :, 1] = torch.tensor([True, False, False])  # one
    vis[:, :, 2] = torch.tensor([False, True, True])   # two
    vis[:, :, 3] = True                       # all three
    return vis


def random_inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, N, D, generator=g, dtype=dtype)
    targets = torch.randn(B, T, N, D, generator=g, dtype=dtype)
    return query, targets, irregular_visibility(seed)


@pytest.mark.parametrize("variant", GATE_VARIANTS)
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_matches_loop_reference(variant, tau):
    query, targets, vis = random_inputs(1)
    counts = vis.sum(1)
    assert {0, 1, 2, 3} <= set(counts.unique().tolist())
    fused, weights = consensus_gate(query, targets, vis, variant, tau)
    ref_fused, ref_weights = reference_gate(query, targets, vis, variant, tau)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, ref_fused, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", GATE_VARIANTS)
def test_float32_matches_reference(variant):
    query, targets, vis = random_inputs(2, dtype=torch.float32)
    fused, weights = consensus_gate(query, targets, vis, variant, 0.1)
    assert fused.dtype == weights.dtype == torch.float32
    ref_fused, ref_weights = reference_gate(query.double(), targets.double(), vis, variant, 0.1)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.double(), ref_fused, rtol=1e-5, atol=1e-5)


def test_low_precision_inputs_are_computed_in_float32():
    query, targets, vis = random_inputs(3, dtype=torch.float32)
    fused, weights = consensus_gate(query.bfloat16(), targets.bfloat16(), vis, "joint", 0.1)
    assert fused.dtype == weights.dtype == torch.float32
    ref_fused, _ = consensus_gate(query.bfloat16().float(), targets.bfloat16().float(), vis, "joint", 0.1)
    torch.testing.assert_close(fused, ref_fused)


@pytest.mark.parametrize("variant", GATE_VARIANTS)
def test_weights_are_a_distribution_over_the_teachers_that_saw_the_token(variant):
    query, targets, vis = random_inputs(4)
    fused, weights = consensus_gate(query, targets, vis, variant, 0.1)
    covered = vis.any(1)
    assert (weights[~vis] == 0).all()
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1)[covered], torch.ones(int(covered.sum()), dtype=weights.dtype))
    assert (weights.sum(1)[~covered] == 0).all()
    assert (fused[~covered] == 0).all()
    lone = vis.sum(1) == 1
    torch.testing.assert_close(fused[lone], (targets * vis.unsqueeze(-1)).sum(1)[lone])


def test_mean_is_uniform_over_visible_teachers():
    query, targets, vis = random_inputs(5)
    _, weights = consensus_gate(query, targets, vis, "mean", 0.1)
    expected = vis.double() / vis.sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(weights, expected)


def test_identical_teachers_get_uniform_agreement_and_joint_weights():
    query, targets, _ = random_inputs(6)
    vis = torch.ones(B, T, N, dtype=torch.bool)
    same = targets[:, :1].expand(-1, T, -1, -1)
    uniform = torch.full((B, T, N), 1.0 / T, dtype=torch.float64)
    _, w_agree = consensus_gate(query, same, vis, "agreement", 0.1)
    torch.testing.assert_close(w_agree, uniform)
    # equal affinities too: every teacher is the same vector, so joint is uniform as well
    _, w_joint = consensus_gate(query, same, vis, "joint", 0.1)
    torch.testing.assert_close(w_joint, uniform)


def test_agreement_favours_the_majority():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(B, 1, N, D, generator=g, dtype=torch.float64)
    targets = torch.cat([base, base + 0.01 * torch.randn(B, 1, N, D, generator=g, dtype=torch.float64),
                         -base], dim=1)
    vis = torch.ones(B, T, N, dtype=torch.bool)
    _, w = consensus_gate(torch.randn(B, N, D, dtype=torch.float64), targets, vis, "agreement", 0.1)
    assert (w[:, 2] < w[:, 0]).all() and (w[:, 2] < w[:, 1]).all()


def test_teacher_aligned_with_query_gets_most_affinity_weight():
    query, targets, _ = random_inputs(8)
    vis = torch.ones(B, T, N, dtype=torch.bool)
    targets = targets.clone()
    targets[:, 1] = 3.0 * query  # cosine 1: the maximum possible affinity
    _, weights = consensus_gate(query, targets, vis, "affinity", 0.1)
    assert (weights.argmax(1) == 1).all()


@pytest.mark.parametrize("variant", GATE_VARIANTS)
def test_garbage_at_invisible_positions_changes_nothing(variant):
    query, targets, vis = random_inputs(9)
    fused, weights = consensus_gate(query, targets, vis, variant, 0.1)
    for garbage in (float("nan"), float("inf"), 1e30):
        dirty = targets.masked_fill(~vis.unsqueeze(-1), garbage)
        fused2, weights2 = consensus_gate(query, dirty, vis, variant, 0.1)
        assert torch.equal(fused, fused2) and torch.equal(weights, weights2)


def test_no_gradient_flows():
    query, targets, vis = random_inputs(10)
    query.requires_grad_(True)
    targets.requires_grad_(True)
    fused, weights = consensus_gate(query, targets, vis, "joint", 0.1)
    assert fused.grad_fn is None and weights.grad_fn is None
    assert not fused.requires_grad and not weights.requires_grad


def test_temperature_sharpens():
    query, targets, _ = random_inputs(11)
    vis = torch.ones(B, T, N, dtype=torch.bool)
    _, hot = consensus_gate(query, targets, vis, "joint", 10.0)
    _, cold = consensus_gate(query, targets, vis, "joint", 0.01)
    ent = lambda w: gate_statistics(w, vis)["entropy"]  # noqa: E731
    assert ent(cold) < ent(hot) <= math.log(T) + 1e-9


def test_gate_statistics():
    query, targets, vis = random_inputs(12)
    _, weights = consensus_gate(query, targets, vis, "joint", 0.1)
    stats = gate_statistics(weights, vis)
    covered = vis.any(1)
    n_cov = int(covered.sum())
    expected_w = torch.stack([weights[:, k][covered].sum() / n_cov for k in range(T)])
    torch.testing.assert_close(stats["teacher_weight"], expected_w)
    assert math.isclose(float(stats["teacher_weight"].sum()), 1.0, rel_tol=1e-9)
    ent = 0.0
    for b in range(B):
        for i in range(N):
            if covered[b, i]:
                ent -= sum(w * math.log(w) for w in weights[b, :, i].tolist() if w > 0)
    assert math.isclose(float(stats["entropy"]), ent / n_cov, rel_tol=1e-9)
    assert math.isclose(float(stats["covered_fraction"]), n_cov / (B * N))
    _, w_mean = consensus_gate(query, targets, vis, "mean", 0.1)
    ent_mean = sum(math.log(int(c)) for c in vis.sum(1)[covered].tolist()) / n_cov
    assert math.isclose(float(gate_statistics(w_mean, vis)["entropy"]), ent_mean, rel_tol=1e-9)
    empty = gate_statistics(torch.zeros(B, T, N), torch.zeros(B, T, N, dtype=torch.bool))
    assert all(torch.isfinite(v).all() and (v == 0).all() for v in empty.values())


def test_bad_arguments_raise_helpful_errors():
    query, targets, vis = random_inputs(13)
    with pytest.raises(ValueError, match="'joint', 'mean', 'affinity', 'agreement'"):
        consensus_gate(query, targets, vis, "max", 0.1)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            consensus_gate(query, targets, vis, "joint", tau)
    with pytest.raises(ValueError, match=r"\(B, T, N, d\)"):
        consensus_gate(query, targets[0], vis, "joint", 0.1)
    with pytest.raises(ValueError, match="query shape"):
        consensus_gate(query[:, :-1], targets, vis, "joint", 0.1)
    with pytest.raises(ValueError, match="visible shape"):
        consensus_gate(query, targets, vis[:, :-1], "joint", 0.1)
    with pytest.raises(TypeError, match="bool"):
        consensus_gate(query, targets, vis.float(), "joint", 0.1)
    with pytest.raises(ValueError, match="weights"):
        gate_statistics(torch.zeros(B, T), vis)


@pytest.mark.parametrize("variant", GATE_VARIANTS)
def test_a_teacher_prior_multiplies_the_weights_before_renormalising(variant):
    query, targets, vis = random_inputs(3)
    prior = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    fused, weights = consensus_gate(query, targets, vis, variant, 0.1, prior)
    ref_fused, ref_weights = reference_gate(query, targets, vis, variant, 0.1, prior.tolist())
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, ref_fused, rtol=1e-10, atol=1e-12)
    uniform = consensus_gate(query, targets, vis, variant, 0.1, torch.full((3,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(uniform[1], consensus_gate(query, targets, vis, variant, 0.1)[1])  # scale-free
    with pytest.raises(ValueError, match="prior"):
        consensus_gate(query, targets, vis, variant, 0.1, torch.tensor([1.0, 0.0, 1.0]))
