"""Token- and map-level KL against explicit loop references (README, "How the teachers are fused"), plus invariants."""
from __future__ import annotations

import math

import pytest
import torch

from distill.losses import MapKLLoss, TokenKLLoss


def _softmax(xs: list[float], tau: float) -> list[float]:
    top = max(xs)
    e = [math.exp((x - top) / tau) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def reference_token_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    b_, k_, _ = s.shape
    total = 0.0
    for b in range(b_):
        for k in range(k_):
            total += _kl(_softmax(t[b, k].tolist(), tau), _softmax(s[b, k].tolist(), tau))
    return tau**2 * total / (b_ * k_)


def reference_map_kl(s: torch.Tensor, t: torch.Tensor, covered: torch.Tensor, tau: float) -> float:
    b_, n_, d_ = s.shape
    total, terms = 0.0, 0
    for b in range(b_):
        pos = [i for i in range(n_) if bool(covered[b, i])]
        if not pos:
            continue
        for c in range(d_):
            p = _softmax([float(t[b, i, c]) for i in pos], tau)
            q = _softmax([float(s[b, i, c]) for i in pos], tau)
            total += _kl(p, q)
            terms += 1
    return tau**2 * total / max(terms, 1)


def _pair(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


def _covered(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cov = torch.rand(b, n, generator=g) < 0.6
    cov[0, :2] = True  # at least two positions in the first image
    return cov


# --------------------------------------------------------------------------------------------- token


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_token_kl_matches_reference(tau):
    s, t = _pair((2, 5, 7), 0)
    loss = TokenKLLoss(tau)(s, t)
    assert math.isclose(float(loss), reference_token_kl(s, t, tau), rel_tol=1e-10)


def test_token_kl_zero_at_equality_and_nonnegative():
    s, t = _pair((3, 4, 8), 1)
    loss_fn = TokenKLLoss(1.0)
    assert float(loss_fn(s, s.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(loss_fn(s, s + 5.0)) == pytest.approx(0.0, abs=1e-12)  # softmax ignores a shift
    for seed in range(5):
        s, t = _pair((2, 3, 6), seed)
        assert float(loss_fn(s, t)) >= 0


def test_token_kl_temperature_scaling():
    s, t = _pair((2, 4, 6), 2)
    tau = 3.0
    # τ² · KL at temperature τ is KL at temperature 1 of the scaled logits, times τ².
    assert math.isclose(float(TokenKLLoss(tau)(s, t)), tau**2 * float(TokenKLLoss(1.0)(s / tau, t / tau)),
                        rel_tol=1e-12)


def test_token_kl_gradient_reaches_student_not_target():
    s, t = _pair((2, 3, 5), 3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    TokenKLLoss(1.0)(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_token_kl_low_precision_is_upcast():
    s, t = _pair((2, 3, 5), 4, dtype=torch.float32)
    loss = TokenKLLoss(1.0)(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32


def test_token_kl_bad_arguments():
    for tau in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="temperature"):
            TokenKLLoss(tau)
    s, t = _pair((2, 3, 5), 5)
    with pytest.raises(ValueError, match=r"\(B, K, d\)"):
        TokenKLLoss(1.0)(s, t[:, :2])
    with pytest.raises(ValueError, match="zero tokens"):
        TokenKLLoss(1.0)(s[:, :0], t[:, :0])


# ----------------------------------------------------------------------------------------------- map


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_map_kl_matches_reference(tau):
    s, t = _pair((3, 9, 4), 10)
    cov = _covered(3, 9, 10)
    cov[2] = False  # an image with nothing covered
    loss = MapKLLoss(tau)(s, t, cov)
    assert math.isclose(float(loss), reference_map_kl(s, t, cov, tau), rel_tol=1e-10)


def test_map_kl_zero_at_equality_and_nonnegative():
    s, t = _pair((2, 8, 5), 11)
    cov = _covered(2, 8, 11)
    loss_fn = MapKLLoss(1.0)
    assert float(loss_fn(s, s.clone(), cov)) == pytest.approx(0.0, abs=1e-12)
    # a per-channel shift over positions is invisible to a softmax over positions
    assert float(loss_fn(s, s + torch.randn(2, 1, 5, dtype=s.dtype), cov)) == pytest.approx(0.0, abs=1e-12)
    for seed in range(5):
        s, t = _pair((2, 8, 5), seed)
        assert float(loss_fn(s, t, cov)) >= 0


def test_map_kl_temperature_scaling():
    s, t = _pair((2, 8, 5), 12)
    cov = _covered(2, 8, 12)
    tau = 0.3
    assert math.isclose(float(MapKLLoss(tau)(s, t, cov)),
                        tau**2 * float(MapKLLoss(1.0)(s / tau, t / tau, cov)), rel_tol=1e-12)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_map_kl_uncovered_positions_are_excluded_exactly(garbage):
    s, t = _pair((2, 8, 5), 13)
    cov = _covered(2, 8, 13)
    cov[1] = False
    s.requires_grad_(True)
    loss = MapKLLoss(1.0)(s, t, cov)
    (grad,) = torch.autograd.grad(loss, s)

    dirty_s = s.detach().masked_fill(~cov.unsqueeze(-1), garbage).requires_grad_(True)
    dirty_t = t.masked_fill(~cov.unsqueeze(-1), garbage)
    dirty = MapKLLoss(1.0)(dirty_s, dirty_t, cov)
    (dirty_grad,) = torch.autograd.grad(dirty, dirty_s)
    assert torch.equal(loss.detach(), dirty.detach())
    assert torch.equal(grad, dirty_grad)
    assert (dirty_grad[~cov] == 0).all() and torch.isfinite(dirty_grad).all()


def test_map_kl_nothing_covered_is_zero_and_finite():
    s, t = _pair((2, 6, 3), 14)
    s.requires_grad_(True)
    cov = torch.zeros(2, 6, dtype=torch.bool)
    loss = MapKLLoss(1.0)(s.masked_fill(~cov.unsqueeze(-1), float("nan")), t, cov)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_map_kl_empty_image_does_not_dilute_the_mean():
    s, t = _pair((2, 6, 3), 15)
    cov = torch.ones(2, 6, dtype=torch.bool)
    cov[1] = False
    assert math.isclose(float(MapKLLoss(1.0)(s, t, cov)), float(MapKLLoss(1.0)(s[:1], t[:1], cov[:1])),
                        rel_tol=1e-12)


def test_map_kl_single_covered_position_is_zero():
    s, t = _pair((1, 6, 3), 16)
    cov = torch.zeros(1, 6, dtype=torch.bool)
    cov[0, 4] = True  # a softmax over one position is 1 for both: nothing to match
    assert float(MapKLLoss(1.0)(s, t, cov)) == 0.0


def test_map_kl_gradient_reaches_student_not_target():
    s, t = _pair((2, 8, 5), 17)
    s.requires_grad_(True)
    t.requires_grad_(True)
    cov = _covered(2, 8, 17)
    MapKLLoss(1.0)(s, t, cov).backward()
    assert s.grad[cov].abs().sum() > 0 and (s.grad[~cov] == 0).all()
    assert t.grad is None


def test_map_kl_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        MapKLLoss(0.0)
    s, t = _pair((2, 8, 5), 18)
    cov = _covered(2, 8, 18)
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        MapKLLoss(1.0)(s, t[:, :4], cov)
    with pytest.raises(ValueError, match="bool"):
        MapKLLoss(1.0)(s, t, cov.float())
    with pytest.raises(ValueError, match="bool"):
        MapKLLoss(1.0)(s, t, cov[:, :4])
