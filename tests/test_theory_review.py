"""Review of the exact theory engine (``dpokit.theory``) against independent oracles.

Oracles: 50-digit mpmath sums, brute-force float64 enumeration of small spaces, closed forms
worked out in the docstrings. Tolerances are stated per test; random draws use fixed seeds. Each
``…_regression`` test failed before the fix it pins (its docstring says how).
"""

import itertools
import math
import random

import mpmath as mp
import pytest
import torch
from scipy import stats

import dpokit.theory.enumerate as enumerate_module
from dpokit.errors import BudgetExceededError, DpokitError
from dpokit.theory import (
    check_enumeration_budget,
    enumerate_log_partition,
    estimate_log_partition,
    full_space_kl,
    kl_divergence,
    log_partition,
    markov_log_partition,
    markov_scorer,
    optimal_policy,
    random_markov_reference,
    rejection_sample,
    rl_objective,
)
from dpokit.theory.optimal import solve_optimal

F64 = torch.float64


def mp_table(ref, rewards, beta):
    """(π*, log Z) of a table in 60-digit arithmetic (π_ref normalised here; 0 stays 0)."""
    with mp.workdps(60):
        total = mp.fsum(mp.mpf(p) for p in ref)
        weights = [mp.mpf(p) / total * mp.exp(mp.mpf(r) / mp.mpf(beta)) if p > 0 else mp.mpf(0)
                   for p, r in zip(ref, rewards, strict=True)]
        z = mp.fsum(weights)
        return [w / z for w in weights], mp.log(z)


# ------------------------------------------------------------------ π*, log Z, J, KL


@pytest.mark.parametrize("beta", [1e-4, 1e-2, 1.0, 1e2, 1e4])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_objective_identity_for_random_policies_at_extreme_beta(beta, scale):
    """J(π) = E_π[r] − β KL(π‖π_ref) equals the 60-digit β log Z − β KL(π‖π*) for random π
    (sharing π_ref's zero), to 1e-12 relative (absolute 1e-12·(1 + max|r|)); π* and log Z stay
    finite and match mpmath to 1e-12 relative (π* absolute 1e-300)."""
    generator = torch.Generator().manual_seed(int(1000 * math.log10(beta) + scale))
    ref = torch.rand(6, generator=generator, dtype=F64)
    ref[2] = 0.0
    ref /= ref.sum()
    rewards = torch.randn(6, generator=generator, dtype=F64) * scale
    star_mp, log_z_mp = mp_table(ref.tolist(), rewards.tolist(), beta)
    star = optimal_policy(ref.log(), rewards, beta)
    log_z = log_partition(ref.log(), rewards, beta)
    assert torch.isfinite(log_z)
    torch.testing.assert_close(star.exp(), torch.tensor([float(s) for s in star_mp], dtype=F64),
                               rtol=1e-12, atol=1e-300)
    assert float(log_z) == pytest.approx(float(log_z_mp), rel=1e-12, abs=1e-15)
    for _ in range(3):
        policy = torch.rand(6, generator=generator, dtype=F64)
        policy[2] = 0.0
        policy /= policy.sum()
        with mp.workdps(60):
            kl_star = mp.fsum(mp.mpf(float(p)) * mp.log(mp.mpf(float(p)) / s)
                              for p, s in zip(policy, star_mp, strict=True) if p > 0)
            expected = float(beta * log_z_mp - beta * kl_star)
        got = float(rl_objective(policy.log(), ref.log(), rewards, beta))
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12 * (1 + scale * 3))


def test_kl_conventions_for_zero_probability_outcomes():
    """0·log(0/q) = 0 (also for q = 0); p > 0 with q = 0 is +inf; J of a policy off π_ref's
    support is −inf (β KL(π‖π_ref) = inf), and β log Z − β KL(π‖π*) agrees."""
    log = torch.tensor([0.5, 0.5, 0.0], dtype=F64).log()
    assert float(kl_divergence(log, torch.tensor([0.25, 0.75, 0.0], dtype=F64).log())) == (
        pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-15))
    off = torch.tensor([0.5, 0.0, 0.5], dtype=F64).log()
    assert float(kl_divergence(off, log)) == math.inf
    assert float(kl_divergence(log, off)) == math.inf
    rewards = torch.tensor([1.0, -1.0, 5.0], dtype=F64)
    assert float(rl_objective(off, log, rewards, 0.5)) == -math.inf
    star = optimal_policy(log, rewards, 0.5)
    assert float(star[2]) == -math.inf
    assert float(kl_divergence(off, star)) == math.inf


def test_solve_optimal_matches_mpmath_on_random_tables_with_zeros():
    """300 random tables (zeros in π_ref, rewards from 1e-5 to 1e5, β from 1e-6 to 1e8): where
    solve_optimal answers, π* and KL(π*‖π_ref) match 60-digit mpmath to relative 1e-9
    (absolute 1e-50), log Z to 1e-9·|log Z| + 1e-9·(|E_ref r| + max|r|)/β (its stated bound);
    where it refuses, the message names the β range."""
    rng = random.Random(0)
    answered = 0
    for _ in range(300):
        size = rng.randint(1, 6)
        ref = [rng.choice([0.0, rng.random(), 10 ** rng.uniform(-30, 0)]) for _ in range(size)]
        ref[0] = ref[0] or 0.5
        scale = 10 ** rng.uniform(-5, 5)
        rewards = [rng.choice([rng.gauss(0, 1) * scale, float(rng.randint(-3, 3))])
                   for _ in range(size)]
        beta = 10 ** rng.uniform(-6, 8)
        try:
            got = solve_optimal(torch.tensor(ref, dtype=F64), torch.tensor(rewards, dtype=F64),
                                beta)
        except DpokitError as error:
            assert "is outside [" in str(error)
            continue
        answered += 1
        star, log_z = mp_table(ref, rewards, beta)
        with mp.workdps(60):
            total = mp.fsum(mp.mpf(p) for p in ref)
            kl = mp.fsum(s * mp.log(s / (mp.mpf(p) / total))
                         for s, p in zip(star, ref, strict=True) if p > 0)
        for value, exact in zip(got.optimal_logps.exp().tolist(), star, strict=True):
            assert abs(value - float(exact)) <= 1e-9 * float(exact) + 1e-50
        assert abs(float(got.kl_optimal_ref) - float(kl)) <= 1e-9 * float(kl) + 1e-50
        mean = abs(sum(p * r for p, r in zip(ref, rewards, strict=True)) / sum(ref))
        biggest = max(abs(r) for p, r in zip(ref, rewards, strict=True) if p > 0)
        assert abs(float(got.log_partition) - float(log_z)) <= (
            1e-9 * abs(float(log_z)) + 1e-9 * (mean + biggest) / beta + 1e-50)
    assert answered > 250


# ------------------------------------------------------------------ Monte-Carlo log Z


def test_partition_estimator_is_unbiased_with_the_stated_variance():
    """Over 20000 replicates of n = 10 draws from a 5-outcome π_ref: the mean of Ẑ is within
    4 standard errors of the exact Z; n·(relative std error)² averages to the exact
    Var_ref[exp(r/β)]/Z² within 5%; log Ẑ is low on average (Jensen): its mean is within 4
    standard errors of the exact E[log Ẑ], summed over all C(14, 4) = 1001 outcome counts
    with their multinomial probabilities, which is below log Z."""
    ref = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=F64)
    rewards = torch.tensor([0.0, 1.0, -0.5, 2.0, 3.0], dtype=F64)
    beta, n, replicates = 1.5, 10, 20_000
    weights = torch.exp(rewards / beta)
    z = float((ref * weights).sum())
    variance = float((ref * weights**2).sum()) - z**2
    generator = torch.Generator().manual_seed(11)
    draws = torch.multinomial(ref, replicates * n, replacement=True, generator=generator)
    estimate = estimate_log_partition(rewards[draws].reshape(replicates, n), beta)
    z_hat = estimate.log_partition.exp()
    assert abs(float(z_hat.mean()) - z) < 4 * math.sqrt(variance / n / replicates)
    relative_variance = float((n * estimate.relative_std_error**2 * z_hat**2).mean()) / z**2
    assert relative_variance == pytest.approx(variance / z**2, rel=0.05)
    exact_log_mean = 0.0
    for cut in itertools.combinations(range(n + 4), 4):  # stars and bars: counts summing to n
        counts = [b - a - 1 for a, b in zip((-1, *cut), (*cut, n + 4), strict=True)]
        log_pmf = math.lgamma(n + 1) + sum(c * math.log(float(p)) - math.lgamma(c + 1)
                                           for c, p in zip(counts, ref, strict=True))
        mean_weight = sum(c * float(w) for c, w in zip(counts, weights, strict=True)) / n
        exact_log_mean += math.exp(log_pmf) * math.log(mean_weight)
    assert exact_log_mean < math.log(z) - 1e-3
    log_sd = float(estimate.log_partition.std()) / math.sqrt(replicates)
    assert abs(float(estimate.log_partition.mean()) - exact_log_mean) < 4 * log_sd


@pytest.mark.parametrize("beta", [1e-4, 1e4])
def test_partition_estimator_stays_finite_at_extreme_beta(beta):
    """With every reward equal to r, Ẑ = exp(r/β) exactly, whatever β: log Ẑ = r/β to 1e-15
    relative, a zero-width interval, ESS = n."""
    rewards = torch.full((2, 8), 37.5, dtype=F64)
    estimate = estimate_log_partition(rewards, beta)
    torch.testing.assert_close(estimate.log_partition, torch.full((2,), 37.5 / beta, dtype=F64),
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(estimate.ci_low, estimate.ci_high, rtol=1e-15, atol=0)
    torch.testing.assert_close(estimate.effective_sample_size, torch.full((2,), 8.0, dtype=F64))


# ------------------------------------------------------------------ enumeration and its guard


def test_enumeration_refuses_nan_scores_naming_the_sequence_regression():
    """A scorer that gives NaN (a broken model) must stop the enumeration with a one-line
    error naming the sequence. Before the fix the NaN went into logaddexp and
    enumerate_log_partition returned log Z = NaN. A NaN reward where π_ref(y) = 0 plays no
    part and is accepted (log Z matches the 3-outcome brute force to 1e-14)."""
    log_init, log_trans = random_markov_reference(3, seed=1)
    good = markov_scorer(log_init, log_trans, torch.tensor([0.5, -1.0, 2.0], dtype=F64))

    def nan_reward(sequences):
        ref_logps, rewards = good(sequences)
        return ref_logps, torch.where((sequences == torch.tensor([2, 1])).all(-1),
                                      math.nan, rewards)

    with pytest.raises(DpokitError, match=r"reward = nan for sequence \[2, 1\]"):
        enumerate_log_partition(nan_reward, 3, 2, beta=1.0)

    def nan_ref(sequences):
        ref_logps, rewards = good(sequences)
        return torch.where(sequences[:, 0] == 1, math.nan, ref_logps), rewards

    with pytest.raises(DpokitError, match=r"log π_ref = nan for sequence \[1, 0\]"):
        enumerate_log_partition(nan_ref, 3, 2, beta=1.0)

    ref = torch.tensor([0.5, 0.5, 0.0], dtype=F64).log()
    reward = torch.tensor([1.0, 2.0, math.nan], dtype=F64)
    result = enumerate_log_partition(lambda s: (ref[s[:, 0]], reward[s[:, 0]]), 3, 1, beta=1.0)
    assert result.log_partition == pytest.approx(math.log(0.5 * math.e + 0.5 * math.e**2),
                                                 rel=1e-14)


def test_budget_probe_is_built_on_the_enumeration_device_regression(monkeypatch):
    """The timing probe must be built where the enumeration's batches are (a model on a GPU
    cannot score CPU tokens). Before the fix check_enumeration_budget built it with the default
    device whatever ``device`` enumerate_log_partition was given, so a time budget on a GPU
    scorer crashed with a device-mismatch traceback."""
    seen = []
    original = enumerate_module.iter_sequences

    def recording(*args, device=None, **kwargs):
        seen.append(device)
        return original(*args, device=device, **kwargs)

    monkeypatch.setattr(enumerate_module, "iter_sequences", recording)
    log_init, log_trans = random_markov_reference(3, seed=2)
    rewards = torch.tensor([0.0, 1.0, -1.0], dtype=F64)
    result = enumerate_log_partition(markov_scorer(log_init, log_trans, rewards), 3, 4,
                                     beta=0.5, max_seconds=1e6, device="cpu")
    assert seen and all(device == "cpu" for device in seen)
    assert result.log_partition == pytest.approx(
        float(markov_log_partition(log_init, log_trans, rewards, 0.5, 4)), rel=1e-13)
    with pytest.raises(BudgetExceededError, match=r"3\^4 = 81 sequences"):
        check_enumeration_budget(markov_scorer(log_init, log_trans, rewards), 3, 4,
                                 max_sequences=80, device="cpu")


def test_enumeration_refuses_a_batch_size_below_one_regression():
    """batch_size=0 crashed with a bare ValueError traceback from range() (not a
    DpokitError, so no one-line message); now it names the argument, and batch_size=1 gives
    the same log Z as one batch (brute force over 2^3 sequences, 1e-14)."""
    log_init, log_trans = random_markov_reference(2, seed=4)
    scorer = markov_scorer(log_init, log_trans, torch.tensor([0.3, -0.4], dtype=F64))
    with pytest.raises(DpokitError, match="batch_size must be ≥ 1, got 0"):
        enumerate_log_partition(scorer, 2, 3, beta=1.0, batch_size=0)
    one = enumerate_log_partition(scorer, 2, 3, beta=1.0, batch_size=1).log_partition
    sequences = torch.tensor(list(itertools.product(range(2), repeat=3)))
    assert one == pytest.approx(float(log_partition(*scorer(sequences), 1.0)), rel=1e-14)


def test_markov_partition_refuses_rewards_of_the_wrong_vocabulary_regression():
    """A (1,) token-reward vector for V = 3 broadcast silently: every token got the same reward
    and a wrong log Z came back (here log Z = 2·0.7/β instead of the enumeration's value).
    Now it is a one-line error naming the shapes; the right shape matches brute force."""
    log_init, log_trans = random_markov_reference(3, seed=5)
    with pytest.raises(DpokitError, match=r"token_rewards \(1,\)"):
        markov_log_partition(log_init, log_trans, torch.tensor([0.7], dtype=F64), 1.0, 2)
    with pytest.raises(DpokitError, match=r"token_rewards \(2, 1\)"):
        markov_log_partition(log_init, log_trans, torch.tensor([[0.7], [0.1]], dtype=F64), 1.0,
                             2)
    rewards = torch.tensor([0.7, -0.2, 1.1], dtype=F64)
    sequences = torch.tensor(list(itertools.product(range(3), repeat=2)))
    brute = torch.logsumexp(log_init[sequences[:, 0]] + log_trans[sequences[:, 0], sequences[:, 1]]
                            + rewards[sequences].sum(-1), dim=0)
    assert float(markov_log_partition(log_init, log_trans, rewards, 1.0, 2)) == pytest.approx(
        float(brute), rel=1e-14)


# ------------------------------------------------------------------ exact sampling from π*


def sample_from(probs, generator):
    return lambda n: torch.multinomial(probs, n, replacement=True, generator=generator)


@pytest.mark.parametrize("beta", [1e-4, 1.0, 1e4])
def test_rejection_samples_pass_chi_square_at_extreme_beta(beta):
    """Rewards r = β·u (u fixed) keep π* spread at any β, so the test has power: 20k samples
    against the exact π* (from 50-digit weights), Pearson p-value > 1e-4 with seed 5; the
    acceptance rate is within 5 sd of Z·exp(−r_max/β)."""
    ref = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=F64)
    units = torch.tensor([0.0, -0.5, -2.0, -0.1, -1.0], dtype=F64)
    rewards, r_max = beta * units, 0.0
    generator = torch.Generator().manual_seed(5)
    result = rejection_sample(sample_from(ref, generator), lambda y: rewards[y], beta=beta,
                              max_reward=r_max, num_samples=20_000, batch_size=8192,
                              generator=generator)
    star, log_z = mp_table(ref.tolist(), rewards.tolist(), beta)
    expected = torch.tensor([float(s) for s in star], dtype=F64) * 20_000
    observed = torch.bincount(result.samples, minlength=5).double()
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-4
    rate = math.exp(float(log_z) - r_max / beta)
    assert abs(result.acceptance_rate - rate) < 5 * math.sqrt(
        rate * (1 - rate) / result.num_proposals)


def test_rejection_sampling_never_proposes_past_max_proposals_regression():
    """``max_proposals`` is a hard cap: "refuse rather than propose more than this". Before the
    fix the check ran only between batches, so max_proposals=10 with the default batch of 4096
    drew 4096 proposals (409 times the budget) before refusing."""
    drawn = []
    generator = torch.Generator().manual_seed(0)

    def sample_ref(n):
        drawn.append(n)
        return torch.zeros(n, dtype=torch.long)

    with pytest.raises(BudgetExceededError, match="max_proposals=10"):
        rejection_sample(sample_ref, lambda y: torch.full(y.shape, -math.inf), beta=1.0,
                         max_reward=0.0, num_samples=1, max_proposals=10, generator=generator)
    assert sum(drawn) == 10


def test_rejection_sampling_refuses_max_proposals_below_one_regression():
    """max_proposals=0 crashed with ZeroDivisionError (rate = 0/0 in the budget message);
    now a one-line DpokitError naming the argument."""
    with pytest.raises(DpokitError, match="max_proposals must be ≥ 1"):
        rejection_sample(lambda n: torch.zeros(n, dtype=torch.long), lambda y: y.double(),
                         beta=1.0, max_reward=0.0, num_samples=1, max_proposals=0)


def test_rejection_sampling_refuses_a_float32_reward_above_the_bound_regression():
    """r = 1.0 in float32 is above max_reward = 0.99999999 by 1e-8, which at β = 1e-9 is a
    factor e^10 in π*. Before the fix the check compared in float32, where max_reward rounds
    to 1.0, so the proposal passed, was accepted with probability 1 instead of e^10 relative
    to the others, and π* came out wrong without a word."""
    rewards = torch.tensor([1.0, 0.5], dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(DpokitError, match="above max_reward"):
        rejection_sample(sample_from(torch.tensor([0.5, 0.5]), generator), lambda y: rewards[y],
                         beta=1e-9, max_reward=0.99999999, num_samples=10, generator=generator)


def test_acceptance_rate_is_consistent_not_unbiased():
    """The docstring's closed form: one sample, one proposal per batch, acceptance p = 1/2 gives
    E[accepted/proposed] = E[1/N] = p·log(1/p)/(1 − p) = log 2 ≈ 0.693, not p (3000 runs,
    within 5 standard errors ≈ 0.026)."""
    generator = torch.Generator().manual_seed(9)
    rewards = torch.tensor([0.0, -math.inf])
    rates = [rejection_sample(sample_from(torch.tensor([0.5, 0.5]), generator),
                              lambda y: rewards[y], beta=1.0, max_reward=0.0, num_samples=1,
                              batch_size=1, generator=generator).acceptance_rate
             for _ in range(3000)]
    mean = sum(rates) / len(rates)
    sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1) / len(rates))
    assert abs(mean - math.log(2)) < 5 * sd
    assert abs(mean - 0.5) > 20 * sd


# ------------------------------------------------------------------ full space vs slice (§6)


def test_full_space_lower_bound_and_renormalised_slice_against_brute_force():
    """A universe of 8 outcomes, S = the first 5, a non-constant reward on O, π_ref zero on one
    outcome of S and one of O. Against brute force (float64, 1e-12): log Z = log(Z_S + Z_O); the
    lower bound is KL with O lumped into one outcome; the full KL is lower bound + m·KL(π|O ‖
    π*|O); the renormalised-slice KL (π and π* restricted to S and rescaled) is a different
    number that ignores m (§6), and a 200k-sample outside estimate lands within its interval
    of the exact full KL."""
    generator = torch.Generator().manual_seed(21)
    policy = torch.rand(2, 8, generator=generator, dtype=F64)
    ref = torch.rand(2, 8, generator=generator, dtype=F64)
    ref[:, 1] = ref[:, 6] = 0.0
    policy[:, 1] = policy[:, 6] = 0.0
    policy /= policy.sum(-1, keepdim=True)
    ref /= ref.sum(-1, keepdim=True)
    rewards = torch.randn(2, 8, generator=generator, dtype=F64)
    beta = 0.7
    star = optimal_policy(ref.log(), rewards, beta)
    full = kl_divergence(policy.log(), star)
    log_z_out = torch.logsumexp(ref[:, 5:].log() + rewards[:, 5:] / beta, -1)
    result = full_space_kl(policy.log()[:, :5], ref.log()[:, :5], rewards[:, :5], beta,
                           outside_log_partition=log_z_out)
    torch.testing.assert_close(result.log_partition, log_partition(ref.log(), rewards, beta),
                               rtol=1e-12, atol=1e-12)
    lumped_p = torch.cat([policy[:, :5], policy[:, 5:].sum(-1, keepdim=True)], -1).log()
    lumped_s = torch.cat([star[:, :5], torch.logsumexp(star[:, 5:], -1, keepdim=True)], -1)
    torch.testing.assert_close(result.lower_bound, kl_divergence(lumped_p, lumped_s),
                               rtol=1e-12, atol=1e-12)
    m = policy[:, 5:].sum(-1)
    torch.testing.assert_close(result.policy_mass_outside, m, rtol=1e-12, atol=0)
    outside = kl_divergence(policy[:, 5:].log() - m.log()[:, None],
                            star[:, 5:] - torch.logsumexp(star[:, 5:], -1, keepdim=True))
    torch.testing.assert_close(result.lower_bound + m * outside, full, rtol=1e-12, atol=1e-12)
    slice_kl = kl_divergence(policy[:, :5].log() - (1 - m).log()[:, None],
                             star[:, :5] - torch.logsumexp(star[:, :5], -1, keepdim=True))
    assert bool(((slice_kl - full).abs() > 1e-3).all())

    conditional = policy[:, 5:] / m[:, None]
    index = torch.multinomial(conditional, 200_000, replacement=True, generator=generator)
    sampled = full_space_kl(
        policy.log()[:, :5], ref.log()[:, :5], rewards[:, :5], beta,
        outside_log_partition=log_z_out,
        outside_policy_logps=policy[:, 5:].log().gather(-1, index),
        outside_ref_logps=ref[:, 5:].log().gather(-1, index),
        outside_rewards=rewards[:, 5:].gather(-1, index), confidence=0.999)
    assert bool(((sampled.ci_low <= full) & (full <= sampled.ci_high)).all())


@pytest.mark.parametrize("sigma_p,sigma_q", [(1.0, 0.0), (0.0, 1.0), (-1.0, 1.0), (1.0, -2.0),
                                             (float("nan"), 1.0), (1.0, float("inf"))])
def test_gaussian_kl_refuses_a_standard_deviation_that_is_not_positive(sigma_p, sigma_q):
    """σ_q = 0 gave NaN (the KL to a point mass is +inf) and σ < 0 a finite number: both are
    not standard deviations; refused with one line naming the argument."""
    from dpokit.theory import gaussian_kl

    name = "sigma_p" if not (sigma_p > 0 and math.isfinite(sigma_p)) else "sigma_q"
    with pytest.raises(DpokitError, match=f"gaussian_kl: {name} must be"):
        gaussian_kl(0.0, torch.tensor([1.0, sigma_p]), 0.5, sigma_q)
    assert float(gaussian_kl(0.0, 1.0, 0.0, 1.0)) == 0.0


def test_full_space_refuses_probabilities_of_s_that_sum_past_one():
    """Σ_S π_θ > 1 was clamped to an outside mass of 0 without a word: such log-probs are not
    one distribution over S ∪ O. Sums within float32 rounding of 1 are still taken (m = 0)."""
    from dpokit.theory.fullspace import constant_outside_log_partition, full_space_kl

    rewards = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ref = torch.log(torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64))
    log_z_out = constant_outside_log_partition(ref, -1.0, 0.5)
    over = torch.log(torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64))  # sums to 1.2
    with pytest.raises(DpokitError, match=r"policy_logps: the probabilities of S sum to 1\.2 "):
        full_space_kl(over, ref, rewards, 0.5, outside_log_partition=log_z_out)
    with pytest.raises(DpokitError, match=r"ref_logps_in_space: .* sum to 1\.2 "):
        constant_outside_log_partition(over, -1.0, 0.5)
    whole = torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float32)) + 3e-7
    result = full_space_kl(whole, ref, rewards, 0.5, outside_log_partition=log_z_out)
    pi = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)  # m = 0: the lumped term is 0
    log_z = torch.logaddexp(torch.logsumexp(ref + rewards / 0.5, -1), log_z_out)
    brute = (pi * (pi.log() - (ref + rewards / 0.5 - log_z))).sum()
    assert float(result.lower_bound) == pytest.approx(float(brute), abs=1e-5)
