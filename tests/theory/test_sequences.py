"""Sequence spaces: enumeration, the Markov recursion, Monte Carlo and rejection sampling."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from dpokit.errors import BudgetExceededError, DpokitError
from dpokit.theory import (
    count_sequences,
    enumerate_log_partition,
    estimate_log_partition,
    iter_scores,
    iter_sequences,
    log_partition,
    markov_log_partition,
    markov_logps,
    markov_sample,
    markov_scorer,
    optimal_policy,
    random_markov_reference,
    rejection_sample,
    token_additive_reward,
)


def test_count_sequences_is_exact():
    assert count_sequences(50257, 2) == 50257**2
    assert count_sequences(50257, 8) == 50257**8  # beyond float precision, still exact
    assert count_sequences(3, 4, all_lengths=True) == 3 + 9 + 27 + 81
    with pytest.raises(DpokitError):
        count_sequences(0, 3)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_iter_sequences_lists_every_sequence_once_in_order(batch_size):
    got = torch.cat(list(iter_sequences(4, 3, batch_size=batch_size))).tolist()
    assert got == [list(s) for s in itertools.product(range(4), repeat=3)]


def table_scorer(vocab_size, length, seed):
    """A non-Markov reference: an arbitrary normalised table over all V^T sequences, with an
    arbitrary reward table, looked up by the sequence's index — the oracle is a logsumexp over
    the whole table at once."""
    generator = torch.Generator().manual_seed(seed)
    n = vocab_size**length
    ref_table = torch.randn(n, generator=generator, dtype=torch.float64).mul(2).log_softmax(0)
    reward_table = torch.randn(n, generator=generator, dtype=torch.float64).mul(3)
    powers = vocab_size ** torch.arange(length - 1, -1, -1)

    def scorer(sequences):
        index = (sequences * powers).sum(dim=1)
        return ref_table[index], reward_table[index]

    return scorer, ref_table, reward_table


@pytest.mark.parametrize("batch_size", [1, 10, 64, 4096])
@pytest.mark.parametrize("beta", [0.05, 1.0, 30.0])
def test_enumeration_equals_full_table_logsumexp(batch_size, beta):
    """Batching and the streaming logaddexp change nothing (batch sizes that don't divide V^T)."""
    scorer, ref_table, reward_table = table_scorer(5, 3, seed=1)
    result = enumerate_log_partition(scorer, 5, 3, beta=beta, batch_size=batch_size)
    expected = float(torch.logsumexp(ref_table + reward_table / beta, dim=0))
    assert result.log_partition == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert result.num_sequences == 125


@given(st.integers(2, 5), st.integers(1, 4), st.floats(0.1, 10.0), st.integers(0, 10**6),
       st.booleans())
def test_markov_recursion_equals_enumeration(vocab_size, length, beta, seed, per_position):
    """O(T·V²) backward recursion = brute-force enumeration of all V^T sequences (1e-10)."""
    log_init, log_trans = random_markov_reference(vocab_size, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (length, vocab_size) if per_position else (vocab_size,)
    token_rewards = 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    exact = enumerate_log_partition(markov_scorer(log_init, log_trans, token_rewards),
                                    vocab_size, length, beta=beta, batch_size=17)
    recursion = markov_log_partition(log_init, log_trans, token_rewards, beta, length)
    assert float(recursion) == pytest.approx(exact.log_partition, rel=1e-10, abs=1e-10)


def test_markov_recursion_is_batched_and_handles_extreme_rewards():
    log_init, log_trans = random_markov_reference(4, seed=2)
    inits = torch.stack([log_init, log_init.flip(0), torch.full((4,), -math.log(4.0),
                                                                dtype=torch.float64)])
    token_rewards = torch.tensor([0.0, 1e6, -1e6, 3.0], dtype=torch.float64)
    batched = markov_log_partition(inits, log_trans, token_rewards, 1.0, 3)
    assert batched.shape == (3,) and torch.isfinite(batched).all()
    for i in range(3):
        exact = enumerate_log_partition(markov_scorer(inits[i], log_trans, token_rewards), 4, 3,
                                        beta=1.0)
        assert float(batched[i]) == pytest.approx(exact.log_partition, rel=1e-12)


def test_all_lengths_sums_every_length():
    """Σ over lengths 1..T of Z_t, each enumerated separately."""
    log_init, log_trans = random_markov_reference(3, seed=4)
    token_rewards = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    scorer = markov_scorer(log_init, log_trans, token_rewards)
    total = enumerate_log_partition(scorer, 3, 4, beta=0.5, all_lengths=True)
    per_length = torch.tensor([markov_log_partition(log_init, log_trans, token_rewards, 0.5, t)
                               for t in range(1, 5)])
    assert total.log_partition == pytest.approx(float(torch.logsumexp(per_length, 0)), rel=1e-12)
    assert total.num_sequences == 3 + 9 + 27 + 81


def test_budget_refuses_before_scoring_everything_and_states_the_cost():
    calls = []

    def scorer(sequences):
        calls.append(len(sequences))
        return torch.zeros(len(sequences)), torch.zeros(len(sequences))

    with pytest.raises(BudgetExceededError) as info:
        enumerate_log_partition(scorer, 50257, 2, beta=1.0, batch_size=256)
    message = str(info.value)
    assert "50257^2" in message and "2.526e+09" in message
    assert "sequences/s" in message and "would take about" in message
    assert calls == [256]  # one timing probe, nothing else was scored
    assert isinstance(info.value, DpokitError)


def test_time_budget_refuses_a_slow_scorer():
    def slow_scorer(sequences):
        import time

        time.sleep(0.02)
        return torch.zeros(len(sequences)), torch.zeros(len(sequences))

    with pytest.raises(BudgetExceededError, match=r"max_seconds"):
        enumerate_log_partition(slow_scorer, 10, 3, beta=1.0, batch_size=10, max_seconds=0.5)
    # The same space with a generous limit runs.
    ok = enumerate_log_partition(lambda s: (torch.zeros(len(s)), torch.zeros(len(s))), 10, 3,
                                 beta=1.0, max_seconds=60)
    assert ok.log_partition == pytest.approx(math.log(1000.0))


def test_iter_scores_yields_scores_that_give_the_optimal_policy():
    """Collected scores give π* over the whole space; its mass sums to 1."""
    log_init, log_trans = random_markov_reference(3, seed=5)
    token_rewards = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    batches = list(iter_scores(markov_scorer(log_init, log_trans, token_rewards), 3, 3,
                               batch_size=5))
    ref_logps = torch.cat([b[1] for b in batches])
    rewards = torch.cat([b[2] for b in batches])
    assert float(torch.logsumexp(ref_logps, 0)) == pytest.approx(0.0, abs=1e-12)
    assert float(optimal_policy(ref_logps, rewards, 0.3).exp().sum()) == pytest.approx(1.0)


def test_markov_sample_matches_reference_distribution():
    """Chi-square goodness of fit of 60k ancestral samples against exp(markov_logps)."""
    log_init, log_trans = random_markov_reference(3, seed=6)
    generator = torch.Generator().manual_seed(0)
    samples = markov_sample(60_000, 3, log_init, log_trans, generator=generator)
    index = (samples * torch.tensor([9, 3, 1])).sum(1)
    observed = torch.bincount(index, minlength=27).double()
    all_seqs = torch.cat(list(iter_sequences(3, 3)))
    expected = markov_logps(all_seqs, log_init, log_trans).exp() * len(samples)
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_token_additive_reward_by_hand():
    seqs = torch.tensor([[0, 1, 1], [2, 0, 1]])
    assert token_additive_reward(seqs, torch.tensor([1.0, 10.0, 100.0])).tolist() == [21.0, 111.0]
    per_position = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [100.0, 200.0, 300.0]])
    assert token_additive_reward(seqs, per_position).tolist() == [1 + 20 + 200, 3 + 10 + 200]
    with pytest.raises(DpokitError, match="token_rewards"):
        token_additive_reward(seqs, torch.zeros(2, 3))


# ------------------------------------------------------------------------------ Monte Carlo


def small_space():
    log_init, log_trans = random_markov_reference(4, seed=7)
    token_rewards = torch.tensor([0.3, -0.4, 0.8, 0.0], dtype=torch.float64)
    return log_init, log_trans, token_rewards, 3


def test_monte_carlo_is_unbiased_and_interval_covers_at_nominal_rate():
    """2,000 independent estimates (n = 400, β = 2): the mean of Ẑ is Z within 5 standard
    errors and the 95% interval covers the exact Z in 92.5–97% of them (binomial sd ≈ 0.5%)."""
    log_init, log_trans, token_rewards, length = small_space()
    beta, repeats, n = 2.0, 2000, 400
    exact = float(markov_log_partition(log_init, log_trans, token_rewards, beta, length))
    generator = torch.Generator().manual_seed(11)
    samples = markov_sample(repeats * n, length, log_init, log_trans, generator=generator)
    rewards = token_additive_reward(samples, token_rewards).view(repeats, n)
    estimate = estimate_log_partition(rewards, beta)
    z_hat = estimate.log_partition.exp()
    standard_error = float(z_hat.std()) / math.sqrt(repeats)
    assert abs(float(z_hat.mean()) - math.exp(exact)) < 5 * standard_error
    covered = ((estimate.ci_low <= exact) & (exact <= estimate.ci_high)).double().mean()
    assert 0.925 <= float(covered) <= 0.97
    assert estimate.log_partition.shape == (repeats,)


def test_monte_carlo_variance_explodes_as_beta_shrinks():
    log_init, log_trans, token_rewards, length = small_space()
    generator = torch.Generator().manual_seed(12)
    samples = markov_sample(200 * 100, length, log_init, log_trans, generator=generator)
    rewards = token_additive_reward(samples, token_rewards).view(200, 100)
    errors, ess = [], []
    for beta in (5.0, 0.5, 0.05):
        exact = float(markov_log_partition(log_init, log_trans, token_rewards, beta, length))
        estimate = estimate_log_partition(rewards, beta)
        errors.append(float((estimate.log_partition - exact).pow(2).mean().sqrt()))
        ess.append(float(estimate.effective_sample_size.mean()))
    assert errors[0] < errors[1] < errors[2]
    assert ess[0] > ess[1] > ess[2]


def test_effective_sample_size_extremes_and_huge_rewards():
    flat = estimate_log_partition(torch.full((50,), 3.0), 1.0)
    assert float(flat.effective_sample_size) == pytest.approx(50.0)
    assert float(flat.log_partition) == pytest.approx(3.0, rel=1e-6)
    assert float(flat.relative_std_error) == 0.0
    spiky = estimate_log_partition(torch.tensor([0.0] * 9 + [1e6], dtype=torch.float64), 1.0)
    assert float(spiky.effective_sample_size) == pytest.approx(1.0)
    assert float(spiky.log_partition) == pytest.approx(1e6 - math.log(10.0), rel=1e-12)
    assert torch.isfinite(spiky.ci_high)
    with pytest.raises(DpokitError, match="at least 2"):
        estimate_log_partition(torch.zeros(1), 1.0)


# ---------------------------------------------------------------------- rejection sampling


def discrete_problem():
    ref = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, -0.5, 2.0, 3.0], dtype=torch.float64)
    return ref, rewards


def test_rejection_samples_follow_the_optimal_policy():
    """Chi-square of 20k rejection samples against π*; acceptance rate = Z·exp(−r_max/β)."""
    ref, rewards = discrete_problem()
    beta, r_max = 0.8, 3.0
    generator = torch.Generator().manual_seed(3)
    result = rejection_sample(
        lambda n: torch.multinomial(ref, n, replacement=True, generator=generator),
        lambda y: rewards[y], beta=beta, max_reward=r_max, num_samples=20_000,
        batch_size=5000, generator=generator)
    assert result.samples.shape == (20_000,)
    assert torch.equal(result.rewards, rewards[result.samples])
    optimal = optimal_policy(ref.log(), rewards, beta).exp()
    observed = torch.bincount(result.samples, minlength=5).double()
    assert stats.chisquare(observed.numpy(), (optimal * 20_000).numpy()).pvalue > 1e-3
    expected_rate = math.exp(float(log_partition(ref.log(), rewards, beta)) - r_max / beta)
    sd = math.sqrt(expected_rate * (1 - expected_rate) / result.num_proposals)
    assert abs(result.acceptance_rate - expected_rate) < 5 * sd


def test_rejection_refuses_unbounded_rewards_and_reports_budget():
    ref, rewards = discrete_problem()
    generator = torch.Generator().manual_seed(4)

    def sample(n):
        return torch.multinomial(ref, n, replacement=True, generator=generator)

    with pytest.raises(DpokitError, match="above max_reward"):
        rejection_sample(sample, lambda y: rewards[y], beta=1.0, max_reward=2.0, num_samples=10)
    with pytest.raises(BudgetExceededError, match="max_proposals"):
        rejection_sample(sample, lambda y: rewards[y], beta=0.01, max_reward=3.0,
                         num_samples=10_000, batch_size=100, max_proposals=1000)
