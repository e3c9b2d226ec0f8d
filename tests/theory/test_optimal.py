"""π*, log Z, J(π) and Bradley–Terry against float64 brute force and the exact identities."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpokit.errors import DpokitError
from dpokit.theory import (
    implicit_reward,
    kl_divergence,
    log_partition,
    log_preference_probability,
    optimal_policy,
    preference_probability,
    rl_objective,
)
from tests.strategies import betas, distributions, rewards


def brute_force_optimal(ref: np.ndarray, r: np.ndarray, beta: float) -> tuple[np.ndarray, float]:
    """π* and Z straight from the definition, in float64 with Python's exp (moderate r/β only)."""
    weights = np.array([p * math.exp(ri / beta) for p, ri in zip(ref, r, strict=True)])
    z = math.fsum(weights)
    return weights / z, z


@given(st.data())
def test_optimal_policy_matches_brute_force(data):
    """π* normalised, equal to the brute-force float64 computation to 1e-12 (relative)."""
    n = data.draw(st.integers(2, 8))
    ref = data.draw(distributions(size=n, allow_zeros=True))
    r = data.draw(rewards(n))
    beta = data.draw(st.floats(0.5, 20.0))  # keeps exp(r/β) inside float64 for the oracle
    expected_policy, expected_z = brute_force_optimal(ref, r, beta)
    ref_logps = torch.tensor(ref).log()
    got = optimal_policy(ref_logps, torch.tensor(r), beta).exp()
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got.numpy(), expected_policy, rtol=1e-11, atol=1e-300)
    assert float(log_partition(ref_logps, torch.tensor(r), beta)) == pytest.approx(
        math.log(expected_z), rel=1e-12, abs=1e-12)
    # Outcomes outside π_ref's support stay outside π*'s.
    assert (got.numpy()[ref == 0] == 0).all()


@given(st.data())
def test_objective_identity_for_any_policy(data):
    """J(π) = β log Z − β KL(π ‖ π*) for random π, to 1e-9 (float64)."""
    n = data.draw(st.integers(2, 8))
    ref = torch.tensor(data.draw(distributions(size=n))).log()
    policy = torch.tensor(data.draw(distributions(size=n, allow_zeros=True))).log()
    r = torch.tensor(data.draw(rewards(n)))
    beta = data.draw(betas)
    lhs = rl_objective(policy, ref, r, beta)
    rhs = beta * log_partition(ref, r, beta) - beta * kl_divergence(
        policy, optimal_policy(ref, r, beta))
    assert float(lhs) == pytest.approx(float(rhs), abs=1e-9, rel=1e-10)


@given(st.data())
def test_optimal_policy_maximises_objective(data):
    """No random perturbation of π* (in logit space) reaches a higher J; max J = β log Z."""
    n = data.draw(st.integers(2, 8))
    ref = torch.tensor(data.draw(distributions(size=n))).log()
    r = torch.tensor(data.draw(rewards(n, scale=5.0)))
    beta = data.draw(st.floats(0.1, 10.0))
    optimal = optimal_policy(ref, r, beta)
    best = rl_objective(optimal, ref, r, beta)
    assert float(best) == pytest.approx(beta * float(log_partition(ref, r, beta)), abs=1e-10)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    for scale in (1e-3, 1e-1, 1.0, 5.0):
        noise = scale * torch.randn(64, n, generator=generator, dtype=torch.float64)
        perturbed = (optimal + noise).log_softmax(dim=-1)
        assert (rl_objective(perturbed, ref, r, beta) <= best + 1e-12).all()


def test_beta_limits():
    """β → ∞ gives π_ref; β → 0 puts all mass on the argmax of r (within the support)."""
    ref = torch.tensor([0.8, 0.1, 0.06, 0.04], dtype=torch.float64)
    r = torch.tensor([1.0, 8.0, 0.5, 0.0], dtype=torch.float64)
    large = optimal_policy(ref.log(), r, 1e9).exp()
    torch.testing.assert_close(large, ref, rtol=0, atol=1e-8)
    small = optimal_policy(ref.log(), r, 1e-6).exp()
    torch.testing.assert_close(small, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # The argmax of r outside the support of π_ref is unreachable: π* stays in the support.
    ref_missing = torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    small = optimal_policy(ref_missing.log(), r, 1e-6).exp()
    assert float(small[0]) == pytest.approx(1.0, abs=1e-12) and float(small[1]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e6, 1e9, -1e6])
def test_extreme_reward_over_beta_is_finite_and_normalised(dtype, scale):
    """|r/β| ≥ 10⁶: finite, normalised π* and log Z; matches the float64 answer."""
    ref = torch.tensor([0.8, 0.1, 0.06, 0.04], dtype=torch.float64).log()
    r = torch.tensor([1.0, 8.0, 0.5, 8.0 - 1e-6 * abs(scale)], dtype=torch.float64) * scale
    beta = 1.0
    got = optimal_policy(ref.to(dtype), r.to(dtype), beta)
    z = log_partition(ref.to(dtype), r.to(dtype), beta)
    assert torch.isfinite(z) and not torch.isnan(got).any()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    assert float(got.exp().sum()) == pytest.approx(1.0, abs=tolerance)
    reference = optimal_policy(ref, r.to(dtype).double(), beta).exp()
    torch.testing.assert_close(got.exp().double(), reference, rtol=1e-5, atol=1e-6)
    assert float(z) == pytest.approx(float(log_partition(ref, r.to(dtype).double(), beta)),
                                     rel=1e-6)


def test_extreme_values_keep_relative_precision_of_leading_outcomes():
    """Two outcomes tied on a huge reward share π* in the ratio of π_ref, also in float32."""
    ref = torch.tensor([0.3, 0.6, 0.1]).log()
    r = torch.tensor([1e7, 1e7, 0.0])
    got = optimal_policy(ref, r, 1.0).exp()
    torch.testing.assert_close(got, torch.tensor([1 / 3, 2 / 3, 0.0]), rtol=1e-6, atol=1e-7)


def test_functions_are_batched_over_prompts():
    generator = torch.Generator().manual_seed(3)
    ref = torch.randn(5, 7, generator=generator, dtype=torch.float64).log_softmax(-1)
    r = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    policy = torch.randn(5, 7, generator=generator, dtype=torch.float64).log_softmax(-1)
    batched = (optimal_policy(ref, r, 0.7), log_partition(ref, r, 0.7),
               rl_objective(policy, ref, r, 0.7))
    for i in range(5):
        torch.testing.assert_close(batched[0][i], optimal_policy(ref[i], r[i], 0.7))
        torch.testing.assert_close(batched[1][i], log_partition(ref[i], r[i], 0.7))
        torch.testing.assert_close(batched[2][i], rl_objective(policy[i], ref[i], r[i], 0.7))
    assert batched[1].shape == (5,) and batched[2].shape == (5,)


@given(st.data())
def test_implicit_reward_recovers_reward_up_to_log_partition(data):
    """At π = π*: β log(π*/π_ref) = r − β log Z (docs/theory.md §4), for every outcome."""
    n = data.draw(st.integers(2, 8))
    ref = torch.tensor(data.draw(distributions(size=n))).log()
    r = torch.tensor(data.draw(rewards(n)))
    beta = data.draw(betas)
    recovered = implicit_reward(optimal_policy(ref, r, beta), ref, beta)
    torch.testing.assert_close(recovered, r - beta * log_partition(ref, r, beta),
                               rtol=1e-10, atol=1e-9)


@given(st.floats(-50, 50), st.floats(-50, 50))
def test_bradley_terry(r_a, r_b):
    a, b = torch.tensor(r_a, dtype=torch.float64), torch.tensor(r_b, dtype=torch.float64)
    p = float(preference_probability(a, b))
    assert p == pytest.approx(1.0 / (1.0 + math.exp(r_b - r_a)), rel=1e-12, abs=1e-300)
    assert p + float(preference_probability(b, a)) == pytest.approx(1.0, abs=1e-15)
    assert float(log_preference_probability(a, b)) == pytest.approx(
        -math.log1p(math.exp(r_b - r_a)), rel=1e-12, abs=1e-300)


def test_log_preference_is_finite_for_huge_margins():
    margins = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4])
    logp = log_preference_probability(margins, torch.zeros(5))
    assert torch.isfinite(logp).all()
    assert float(logp[0]) == pytest.approx(-1e4) and float(logp[-1]) == 0.0


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_beta_is_a_user_error(beta):
    with pytest.raises(DpokitError, match="beta must be"):
        optimal_policy(torch.zeros(2), torch.zeros(2), beta)
