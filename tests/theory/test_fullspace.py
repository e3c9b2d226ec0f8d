"""Full-space KL(π_θ‖π*) against brute force on an output space small enough to enumerate whole.

The space is what ``generate`` can return with 3 new tokens over {EOS, a, b, c}: a, b, c strings of
length 0–2 followed by EOS, or of length 3 without EOS (40 outcomes). π_ref and π_θ are random
bigram LMs over it; S is the demo's kind of slice (two tokens from {a, b}, then EOS). Oracles:
KL, π* and Z computed over all 40 outcomes in float64. Tolerances: exact parts 1e-12; Monte
Carlo by coverage of its 95% interval (≥ 90% of 200 seeds) and unbiasedness (mean of the
estimates within 4 standard errors of the exact KL).
"""

import itertools
import math

import pytest
import torch

from dpokit.theory import kl_divergence, optimal_policy
from dpokit.theory.fullspace import constant_outside_log_partition, full_space_kl

EOS, TOKENS, T = 0, (1, 2, 3), 3
OUTCOMES = [(*w, EOS) for k in range(T) for w in itertools.product(TOKENS, repeat=k)] + [
    tuple(w) for w in itertools.product(TOKENS, repeat=T)]
IN_S = torch.tensor([len(y) == 3 and y[-1] == EOS and set(y[:2]) <= {1, 2} for y in OUTCOMES])
BETA, R_INVALID = 0.7, -3.0


def bigram_logps(seed: int, sharpness: float = 1.0) -> torch.Tensor:
    """log p(y) of every outcome under a random bigram LM (start token = EOS id)."""
    g = torch.Generator().manual_seed(seed)
    table = (sharpness * torch.randn(4, 4, generator=g, dtype=torch.float64)).log_softmax(-1)
    out = []
    for y in OUTCOMES:
        prev, total = EOS, 0.0
        for token in y:
            total += float(table[prev, token])
            prev = token
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def space():
    ref, policy = bigram_logps(0), bigram_logps(1, sharpness=2.0)
    rewards = torch.full((len(OUTCOMES),), R_INVALID, dtype=torch.float64)
    rewards[IN_S] = torch.randn(int(IN_S.sum()), generator=torch.Generator().manual_seed(2),
                                dtype=torch.float64)
    return ref, policy, rewards


def test_the_space_is_a_distribution(space):
    ref, policy, _ = space
    assert len(OUTCOMES) == 40 and int(IN_S.sum()) == 4
    for logps in (ref, policy):
        assert float(torch.logsumexp(logps, 0)) == pytest.approx(0.0, abs=1e-12)


def _exact(ref, policy, rewards):
    optimal = optimal_policy(ref, rewards, BETA)
    return float(kl_divergence(policy, optimal)), optimal


def test_exact_parts_and_constant_outside_partition(space):
    ref, policy, rewards = space
    exact, optimal = _exact(ref, policy, rewards)
    log_z_out = constant_outside_log_partition(ref[IN_S], R_INVALID, BETA)
    brute = torch.logsumexp(ref[~IN_S] + R_INVALID / BETA, 0)
    assert float(log_z_out) == pytest.approx(float(brute), abs=1e-12)
    got = full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], BETA,
                        outside_log_partition=log_z_out)
    # Lumped oracle: the KL over S plus one outcome holding all of O.
    lump = lambda p: torch.cat([p[IN_S], torch.logsumexp(p[~IN_S], 0, keepdim=True)])  # noqa: E731
    assert float(got.lower_bound) == pytest.approx(float(kl_divergence(lump(policy),
                                                                       lump(optimal))), abs=1e-12)
    in_space = float((policy[IN_S].exp() * (policy[IN_S] - optimal[IN_S])).sum())
    assert float(got.in_space) == pytest.approx(in_space, abs=1e-12)
    assert float(got.policy_mass_outside) == pytest.approx(float(policy[~IN_S].exp().sum()),
                                                           abs=1e-12)
    assert float(got.optimal_mass_outside) == pytest.approx(float(optimal[~IN_S].exp().sum()),
                                                            abs=1e-12)
    assert 0 < float(got.lower_bound) < exact  # a strict bound here: π_θ|O ≠ π*|O
    assert math.isnan(float(got.estimate))  # no samples, no estimate


def _estimate(ref, policy, rewards, log_z_out, seed, n=400):
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(policy.exp(), n, replacement=True, generator=g)
    out = draws[~IN_S[draws]]
    return full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], BETA,
                         outside_log_partition=log_z_out, outside_policy_logps=policy[out],
                         outside_ref_logps=ref[out], outside_rewards=rewards[out])


@pytest.mark.parametrize("outside", ["constant", "varying"])
def test_monte_carlo_estimate_is_unbiased_and_its_interval_covers(space, outside):
    ref, policy, rewards = space
    if outside == "varying":  # a reward that differs across O: π*|O is no longer π_ref|O
        rewards = rewards.clone()
        noise = torch.randn(int((~IN_S).sum()), generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
        rewards[~IN_S] = R_INVALID + noise
    exact, _ = _exact(ref, policy, rewards)
    log_z_out = torch.logsumexp(ref[~IN_S] + rewards[~IN_S] / BETA, 0)
    results = [_estimate(ref, policy, rewards, log_z_out, seed) for seed in range(200)]
    estimates = torch.tensor([float(r.estimate) for r in results])
    covered = sum(float(r.ci_low) <= exact <= float(r.ci_high) for r in results)
    assert covered >= 0.90 * len(results), covered
    std_error = float(estimates.std()) / math.sqrt(len(results))
    assert abs(float(estimates.mean()) - exact) < 4 * std_error + 1e-12
    assert all(float(r.ci_low) >= float(r.lower_bound) for r in results)


def test_all_mass_in_space_is_exact_and_batches_broadcast(space):
    ref, policy, rewards = space
    inside = torch.full_like(policy, -math.inf)
    inside[IN_S] = policy[IN_S] - torch.logsumexp(policy[IN_S], 0)
    exact, _ = _exact(ref, inside, rewards)
    log_z_out = constant_outside_log_partition(ref[IN_S], R_INVALID, BETA)
    got = full_space_kl(inside[IN_S], ref[IN_S], rewards[IN_S], BETA,
                        outside_log_partition=log_z_out)
    assert float(got.policy_mass_outside) == pytest.approx(0.0, abs=1e-12)
    for value in (got.lower_bound, got.estimate, got.ci_low, got.ci_high):
        assert float(value) == pytest.approx(exact, abs=1e-12)
    both = full_space_kl(torch.stack([policy[IN_S], inside[IN_S]]), ref[IN_S].expand(2, -1),
                         rewards[IN_S].expand(2, -1), BETA,
                         outside_log_partition=log_z_out.expand(2))
    single = full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], BETA,
                           outside_log_partition=log_z_out)
    assert both.lower_bound.tolist() == pytest.approx([float(single.lower_bound),
                                                       float(got.lower_bound)], abs=1e-12)


def test_masked_samples_and_bad_arguments(space):
    ref, policy, rewards = space
    log_z_out = constant_outside_log_partition(ref[IN_S], R_INVALID, BETA)
    out = torch.nonzero(~IN_S).squeeze(-1)[:5]
    kwargs = {"outside_log_partition": log_z_out}
    padded = full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], BETA,
                           outside_policy_logps=torch.cat([policy[out], torch.zeros(3)]),
                           outside_ref_logps=torch.cat([ref[out], torch.zeros(3)]),
                           outside_rewards=R_INVALID,
                           outside_mask=torch.tensor([True] * 5 + [False] * 3), **kwargs)
    plain = full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], BETA,
                          outside_policy_logps=policy[out], outside_ref_logps=ref[out],
                          outside_rewards=R_INVALID, **kwargs)
    assert int(padded.num_outside_samples) == 5
    assert float(padded.estimate) == pytest.approx(float(plain.estimate), abs=1e-12)
    from dpokit.errors import DpokitError

    with pytest.raises(DpokitError, match="beta"):
        full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], 0.0, **kwargs)
    with pytest.raises(DpokitError, match="outside samples need"):
        full_space_kl(policy[IN_S], ref[IN_S], rewards[IN_S], BETA,
                      outside_policy_logps=policy[out], **kwargs)
