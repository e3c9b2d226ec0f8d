"""KL divergences against float64 brute force, numerical integration and simulation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate

from dpokit.theory import gaussian_kl, kl_divergence, kl_estimators
from tests.strategies import distributions


def brute_force_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Σ p log(p/q) over p > 0, float64, written out term by term."""
    return math.fsum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


@given(st.data())
def test_discrete_kl_matches_brute_force(data):
    """float64 agrees to 1e-12, float32 to 1e-5 (absolute, plus relative for large KL)."""
    n = data.draw(st.integers(2, 10))
    p = data.draw(distributions(size=n, allow_zeros=True))
    q = data.draw(distributions(size=n))
    expected = brute_force_kl(p, q)
    got64 = kl_divergence(torch.tensor(p).log(), torch.tensor(q).log())
    got32 = kl_divergence(torch.tensor(p).log().float(), torch.tensor(q).log().float())
    assert float(got64) == pytest.approx(expected, abs=1e-12, rel=1e-10)
    assert float(got32) == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert float(got64) >= 0


@given(distributions())
def test_kl_is_zero_iff_equal(p):
    log_p = torch.tensor(p).log()
    assert float(kl_divergence(log_p, log_p)) == pytest.approx(0.0, abs=1e-15)
    q = np.roll(p, 1)
    if not np.allclose(p, q):
        assert float(kl_divergence(log_p, torch.tensor(q).log())) > 0


def test_kl_zero_mass_and_infinite_cases():
    log_p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).log()
    log_q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64).log()
    assert float(kl_divergence(log_p, log_q)) == pytest.approx(math.log(2.0), rel=1e-14)
    # q = 0 where p > 0: KL is +inf; p = q = 0 somewhere: that term is 0, not NaN.
    assert math.isinf(float(kl_divergence(log_q, log_p)))
    both_zero = torch.tensor([1.0, 0.0], dtype=torch.float64).log()
    assert float(kl_divergence(both_zero, both_zero)) == 0.0


def test_kl_gradient_is_finite_with_zero_mass():
    log_p = torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64).log().requires_grad_()
    log_q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log().requires_grad_()
    kl_divergence(log_p, log_q).backward()
    assert torch.isfinite(log_p.grad).all() and torch.isfinite(log_q.grad).all()
    # d/d log_q_i of Σ p (log p − log q) is −p_i.
    torch.testing.assert_close(log_q.grad, -log_p.detach().exp(), rtol=0, atol=1e-15)


def test_kl_is_batched_over_leading_dims():
    generator = torch.Generator().manual_seed(0)
    log_p = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64).log_softmax(-1)
    log_q = torch.randn(4, 6, generator=generator, dtype=torch.float64).log_softmax(-1)
    batched = kl_divergence(log_p, log_q)
    assert batched.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            expected = brute_force_kl(log_p[i, j].exp().numpy(), log_q[j].exp().numpy())
            assert float(batched[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def numerical_gaussian_kl(mu_p, sigma_p, mu_q, sigma_q) -> float:
    """∫ p(y) log(p(y)/q(y)) dy by adaptive quadrature (scipy.integrate.quad)."""

    def integrand(y):
        log_p = -0.5 * ((y - mu_p) / sigma_p) ** 2 - math.log(sigma_p * math.sqrt(2 * math.pi))
        log_q = -0.5 * ((y - mu_q) / sigma_q) ** 2 - math.log(sigma_q * math.sqrt(2 * math.pi))
        return math.exp(log_p) * (log_p - log_q)

    lo, hi = mu_p - 40 * sigma_p, mu_p + 40 * sigma_p
    value, _ = integrate.quad(integrand, lo, hi, points=[mu_p, mu_q], limit=400,
                              epsabs=1e-13, epsrel=1e-11)
    return value


@given(st.floats(-5, 5), st.floats(0.2, 5), st.floats(-5, 5), st.floats(0.2, 5))
def test_gaussian_kl_matches_numerical_integration(mu_p, sigma_p, mu_q, sigma_q):
    """Closed form vs quadrature, within 1e-8 absolute + 1e-7 relative."""
    expected = numerical_gaussian_kl(mu_p, sigma_p, mu_q, sigma_q)
    got = float(gaussian_kl(mu_p, sigma_p, mu_q, sigma_q))
    assert got == pytest.approx(expected, abs=1e-8, rel=1e-7)


def test_gaussian_kl_lecture_picture_falls_to_zero():
    """π* = N(0,1), π_ref = N(μ,1) moving from −4 to 0: KL = μ²/2, decreasing, 0 at overlap."""
    means = torch.linspace(-4.0, 0.0, 41, dtype=torch.float64)
    kl = gaussian_kl(means, 1.0, 0.0, 1.0)
    torch.testing.assert_close(kl, means**2 / 2, rtol=1e-14, atol=0)
    assert (kl[1:] < kl[:-1]).all() and float(kl[-1]) == 0.0
    assert kl.dtype == torch.float64
    assert gaussian_kl(torch.zeros(2, dtype=torch.float32), 1.0, 0.0, 2.0).dtype == torch.float32


def test_gaussian_kl_keeps_precision_near_overlap():
    """σ_p = σ_q(1 + 1e-6): KL ≈ (δ²)(1 − δ + …) with δ = 1e-6 — cancellation-free."""
    delta = 1e-6
    got = float(gaussian_kl(0.0, 1.0 + delta, 0.0, 1.0))
    # Exact: ½((1+δ)² − 1) − log(1+δ) = δ + δ²/2 − (δ − δ²/2 + δ³/3 − …) = δ² − δ³/3 + …
    assert got == pytest.approx(delta**2 - delta**3 / 3, rel=1e-8)


def test_kl_estimators_unbiasedness_by_simulation():
    """Sample y ~ p: mean k1 and mean k3 equal KL(p‖q) within 5 standard errors; k2 differs."""
    generator = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float64)
    truth = brute_force_kl(p.numpy(), q.numpy())
    samples = torch.multinomial(p, 400_000, replacement=True, generator=generator)
    est = kl_estimators(p.log()[samples], q.log()[samples])
    n = len(samples)
    for values in (est.k1, est.k3):
        standard_error = float(values.std()) / math.sqrt(n)
        assert abs(float(values.mean()) - truth) < 5 * standard_error
    # k3 has lower variance than k1 here, and k2 is biased: its exact mean differs from KL.
    assert float(est.k3.var()) < float(est.k1.var())
    exact_k2_mean = float((p * 0.5 * (q.log() - p.log()) ** 2).sum())
    assert abs(exact_k2_mean - truth) > 0.05


@given(st.floats(-30, 30), st.floats(-30, 30))
def test_k3_is_nonnegative_for_every_sample(log_p, log_q):
    for dtype in (torch.float32, torch.float64):
        est = kl_estimators(torch.tensor(log_p, dtype=dtype), torch.tensor(log_q, dtype=dtype))
        assert float(est.k3) >= 0 and float(est.k2) >= 0
        assert float(est.k1) == pytest.approx(log_p - log_q, abs=1e-4)


def test_k3_small_log_ratio_is_accurate_in_float32():
    """ρ = 1 + ε: k3 ≈ ε²/2 must not cancel to 0 or go negative."""
    eps = 1e-4
    est = kl_estimators(torch.tensor(0.0), torch.tensor(eps))
    assert float(est.k3) == pytest.approx(eps**2 / 2, rel=1e-3)
