"""How hard is Z? The V^T growth of its terms, and Monte Carlo against the exact value.

Used by ``dpokit partition`` and the V^T figure. Two studies:

1. Growth: the number of terms V^T (and Σ_{t≤T} V^t) for a vocabulary V, and the time to
   enumerate them at a scoring rate measured on this machine.
2. Estimation: on a small built-in space (a bigram π_ref over V tokens, T positions, a
   token-additive reward) the exact log Z — by enumeration and by the Markov recursion — beside
   unbiased Monte-Carlo estimates at several sample sizes and β, repeated to show the error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dpokit.theory import (
    count_sequences,
    enumerate_log_partition,
    estimate_log_partition,
    iter_sequences,
    markov_log_partition,
    markov_sample,
    markov_scorer,
    random_markov_reference,
    token_additive_reward,
)

GPT2_VOCAB_SIZE = 50257


def measure_scoring_rate(*, vocab_size: int = 64, length: int = 4, batch_size: int = 16384,
                         min_seconds: float = 0.2) -> float:
    """Sequences per second that exact enumeration scores on this machine, with a bigram scorer.

    A table-lookup scorer is far faster than any neural language model, so times computed from
    this rate are lower bounds for a real π_ref.
    """
    log_init, log_trans = random_markov_reference(vocab_size, seed=0, dtype=torch.float32)
    scorer = markov_scorer(log_init, log_trans, torch.zeros(vocab_size))
    scored, start = 0, time.perf_counter()
    while True:
        for sequences in iter_sequences(vocab_size, length, batch_size=batch_size):
            ref_logps, _ = scorer(sequences)
            torch.logsumexp(ref_logps, dim=0)
            scored += len(sequences)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return scored / elapsed


@dataclass(frozen=True)
class GrowthRow:
    """Terms of Z for sequences of length T, and the time to enumerate them at ``rate``."""

    length: int
    exactly: int
    """V^T."""
    up_to: int
    """Σ_{t=1..T} V^t."""
    seconds_exactly: float
    seconds_up_to: float


def growth_table(vocab_size: int, max_length: int, rate: float) -> list[GrowthRow]:
    """One row per T = 1..max_length."""
    rows = []
    for length in range(1, max_length + 1):
        exactly = count_sequences(vocab_size, length)
        up_to = count_sequences(vocab_size, length, all_lengths=True)
        rows.append(GrowthRow(length, exactly, up_to, exactly / rate, up_to / rate))
    return rows


@dataclass(frozen=True)
class BuiltinSpace:
    """A small sequence space with exactly known Z: bigram π_ref, token-additive reward."""

    vocab_size: int
    length: int
    log_init: Tensor
    log_trans: Tensor
    token_rewards: Tensor

    @property
    def num_sequences(self) -> int:
        return count_sequences(self.vocab_size, self.length)


def builtin_space(vocab_size: int = 6, length: int = 5, *, seed: int = 0) -> BuiltinSpace:
    """The space of ``dpokit partition``: V = 6, T = 5 (7,776 sequences) by default.

    Token rewards are i.i.d. standard normal per token (seeded), summed over positions.
    """
    log_init, log_trans = random_markov_reference(vocab_size, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    token_rewards = torch.randn(vocab_size, generator=generator, dtype=torch.float64)
    return BuiltinSpace(vocab_size, length, log_init, log_trans, token_rewards)


@dataclass(frozen=True)
class EstimateRow:
    """Monte Carlo vs exact log Z at one (β, n), summarised over independent repeats."""

    beta: float
    num_samples: int
    exact_log_partition: float
    mean_log_estimate: float
    rmse_log: float
    """Root-mean-square error of log Ẑ against the exact log Z."""
    mean_abs_relative_error: float
    """Mean of |Ẑ/Z − 1|."""
    coverage: float
    """Fraction of repeats whose confidence interval contains the exact Z."""
    mean_ess: float
    """Mean effective sample size (Σw)²/Σw²."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExactPartition:
    """log Z of the built-in space by both exact routes."""

    beta: float
    enumerated: float
    recursion: float
    enumeration_seconds: float


def exact_partitions(space: BuiltinSpace, betas: Sequence[float]) -> list[ExactPartition]:
    """log Z by enumerating all V^T sequences and by the O(T·V²) recursion, per β."""
    scorer = markov_scorer(space.log_init, space.log_trans, space.token_rewards)
    results = []
    for beta in betas:
        enumerated = enumerate_log_partition(scorer, space.vocab_size, space.length, beta=beta)
        recursion = markov_log_partition(space.log_init, space.log_trans, space.token_rewards,
                                         beta, space.length)
        results.append(ExactPartition(beta, enumerated.log_partition, float(recursion),
                                      enumerated.seconds))
    return results


def monte_carlo_study(space: BuiltinSpace, betas: Sequence[float], sample_sizes: Sequence[int],
                      *, repeats: int = 20, seed: int = 0,
                      confidence: float = 0.95) -> list[EstimateRow]:
    """Estimate log Z ``repeats`` times at each (β, n) from fresh π_ref samples."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for beta in betas:
        exact = float(markov_log_partition(space.log_init, space.log_trans, space.token_rewards,
                                           beta, space.length))
        for n in sample_sizes:
            samples = markov_sample(repeats * n, space.length, space.log_init, space.log_trans,
                                    generator=generator)
            rewards = token_additive_reward(samples, space.token_rewards).view(repeats, n)
            estimate = estimate_log_partition(rewards, beta, confidence=confidence)
            log_error = estimate.log_partition - exact
            covered = (estimate.ci_low <= exact) & (exact <= estimate.ci_high)
            rows.append(EstimateRow(
                beta=beta,
                num_samples=n,
                exact_log_partition=exact,
                mean_log_estimate=float(estimate.log_partition.mean()),
                rmse_log=float(log_error.pow(2).mean().sqrt()),
                mean_abs_relative_error=float(torch.expm1(log_error).abs().mean()),
                coverage=float(covered.double().mean()),
                mean_ess=float(estimate.effective_sample_size.mean()),
            ))
    return rows

