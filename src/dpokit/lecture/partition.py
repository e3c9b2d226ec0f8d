"""How hard is Z? The V^T growth of its terms, and Monte Carlo against the exact value.

Used by ``dpokit partition`` and the V^T figure. Two studies:

1. Growth: the number of terms V^T (and Σ_{t≤T} V^t) for a vocabulary V, and the time to
   enumerate them at a scoring rate measured on this machine.
2. Estimation: on a small built-in space (a bigram π_ref over V tokens, T positions, a
   token-additive reward) the exact log Z — by enumeration and by the Markov recursion — beside
   unbiased Monte-Carlo estimates at several sample sizes and β, repeated to show the error.

Sizes it cannot do are refused before anything is allocated, each in one line naming the setting,
the size it would need and the limit (:func:`check_growth`, :func:`check_space`,
:func:`check_monte_carlo`, :func:`check_space_betas`): counts in the growth table stay below
10^300 (float64 holds them and their times), the built-in space and each Monte-Carlo batch fit in
:data:`MAX_STUDY_BYTES`, the space has at most ``DEFAULT_MAX_SEQUENCES`` sequences to enumerate,
and β keeps r/β finite and log Z accurate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dpokit.errors import DpokitError
from dpokit.format import format_count
from dpokit.lecture.config import GPT2_VOCAB_SIZE  # noqa: F401 (re-export)
from dpokit.theory import (
    DEFAULT_MAX_SEQUENCES,
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
from dpokit.theory.enumerate import format_power_of_ten, log10_count_sequences

MAX_STUDY_BYTES = 2 * 2**30
"""Memory limit (2 GiB) for the built-in space and for each Monte-Carlo batch of
``repeats × n`` samples, estimated by :func:`space_bytes` and :func:`monte_carlo_bytes`."""

MAX_GROWTH_LENGTH = 1000
"""Most rows (lengths T) in the growth table."""

MAX_LOG10_COUNT = 300.0
"""Counts and times of the growth table stay below 10^300, inside float64 (max ≈ 1.8e308)."""

MAX_BETA_PER_REWARD = 1e5
"""``dpokit partition`` takes β ≤ 1e5·max|r(y)|: log Z → E_ref[r]/β as β grows, and the
float64 rounding of π_ref (sums to 1 within ~1e-16, absolute) would pass 1e-9 of it."""


def check_growth(vocab_size: int, max_length: int, rate: float | None = None) -> None:
    """Refuse a growth table whose counts, or times at ``rate``, would pass 10^300.

    Raises :class:`DpokitError` naming ``max_length`` (``--max-length``), the count it would
    need and the largest ``max_length`` this ``vocab_size`` allows (or ``rate``).
    """
    if max_length > MAX_GROWTH_LENGTH:
        raise DpokitError(f"max_length = {max_length:,} (--max-length) would print "
                          f"{max_length:,} rows; the limit is {MAX_GROWTH_LENGTH:,}")
    needed = log10_count_sequences(vocab_size, max_length, all_lengths=True)
    if needed > MAX_LOG10_COUNT:
        allowed = 0
        while (allowed < max_length and log10_count_sequences(
                vocab_size, allowed + 1, all_lengths=True) <= MAX_LOG10_COUNT):
            allowed += 1
        limit = (f"max_length ≤ {allowed} for vocab_size = {vocab_size:,}" if allowed else
                 f"vocab_size ≤ 10^{MAX_LOG10_COUNT:g}")
        raise DpokitError(
            f"max_length = {max_length:,} (--max-length) needs Σ_(t≤T) V^t ≈ "
            f"{format_power_of_ten(needed)} terms for V = {vocab_size:,}; the growth table keeps "
            f"counts and times in float64 up to 1e+{MAX_LOG10_COUNT:g}: {limit}")
    if rate is not None and needed - math.log10(rate) > MAX_LOG10_COUNT:
        raise DpokitError(
            f"rate = {rate:g} (--rate) makes the enumeration time of {format_power_of_ten(needed)} "
            f"sequences ≈ {format_power_of_ten(needed - math.log10(rate))} s, past float64's range "
            f"(limit 1e+{MAX_LOG10_COUNT:g} s); give a rate ≥ "
            f"{10 ** (needed - MAX_LOG10_COUNT):.3g}")


def space_bytes(vocab_size: int, length: int) -> int:
    """Estimated peak bytes of building and enumerating the built-in space: ~8 float64 V×V
    matrices (the random reference, its transitions, the recursion) and 4 int64 copies of one
    batch of 4,096 sequences of length T."""
    return 8 * 8 * vocab_size**2 + 4 * 8 * min(4096, vocab_size**min(length, 64)) * length


def monte_carlo_bytes(vocab_size: int, length: int, num_samples: int, repeats: int) -> int:
    """Estimated peak bytes of one Monte-Carlo batch of ``repeats × num_samples`` sequences:
    per sample, two int64 copies of its T tokens (the columns and their concatenation), the
    (V,) transition row it is drawn from and the sampler's working copy, and four float64
    scalars (reward, weight, its square, the mean)."""
    return repeats * num_samples * 8 * (2 * length + 2 * vocab_size + 4)


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB"


def check_space(vocab_size: int, length: int) -> None:
    """Refuse a built-in space with more than ``DEFAULT_MAX_SEQUENCES`` sequences to enumerate
    or over :data:`MAX_STUDY_BYTES`, naming ``space_vocab``/``space_length``."""
    where = f"space_vocab = {vocab_size:,}, space_length = {length:,} (--space-vocab, " \
            f"--space-length)"
    log10_count = log10_count_sequences(vocab_size, length)
    if log10_count > 30 or vocab_size**length > DEFAULT_MAX_SEQUENCES:
        raise DpokitError(
            f"{where}: V^T ≈ {format_power_of_ten(log10_count)} sequences to enumerate for "
            f"the exact log Z; the limit is {format_count(DEFAULT_MAX_SEQUENCES)} (2^24)")
    needed = space_bytes(vocab_size, length)
    if needed > MAX_STUDY_BYTES:
        raise DpokitError(f"{where}: the space needs about {_gib(needed)} of memory; the limit "
                          f"is {_gib(MAX_STUDY_BYTES)}")


def check_monte_carlo(vocab_size: int, length: int, sample_sizes: Sequence[int],
                      repeats: int) -> None:
    """Refuse Monte-Carlo batches over :data:`MAX_STUDY_BYTES`, naming ``samples`` and
    ``repeats``, the memory the largest would need, and the largest n that fits."""
    largest = max(sample_sizes)
    needed = monte_carlo_bytes(vocab_size, length, largest, repeats)
    if needed > MAX_STUDY_BYTES:
        fits = MAX_STUDY_BYTES // monte_carlo_bytes(vocab_size, length, 1, 1)
        raise DpokitError(
            f"samples = {largest:,} (--samples) with repeats = {repeats:,} (--repeats) draws "
            f"{repeats * largest:,} sequences at once, about {_gib(needed)} of memory; the "
            f"limit is {_gib(MAX_STUDY_BYTES)}, i.e. samples × repeats ≤ {fits:,} for this "
            f"space")


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
    """One row per T = 1..max_length; refused by :func:`check_growth` past 10^300 terms."""
    check_growth(vocab_size, max_length, rate)
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
    Refused by :func:`check_space` when too large.
    """
    check_space(vocab_size, length)
    log_init, log_trans = random_markov_reference(vocab_size, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    token_rewards = torch.randn(vocab_size, generator=generator, dtype=torch.float64)
    return BuiltinSpace(vocab_size, length, log_init, log_trans, token_rewards)


def space_beta_range(space: BuiltinSpace) -> tuple[float, float]:
    """The β ``dpokit partition`` takes for ``space``: [R/1e308, 1e5·R], R = max_y |r(y)| =
    Σ_t max_v |r(v)| (a bound on |r| of every sequence).

    Below, r/β overflows float64; above, log Z → E_ref[r]/β is swamped by float64's ~1e-16
    rounding of π_ref (measured: relative error 3e-10 at β = 1e6 for the default space, 2e-8
    at 1e8).
    """
    bound = space.length * float(space.token_rewards.abs().max())
    return bound / 1e308, MAX_BETA_PER_REWARD * max(bound, 1e-300)


def check_space_betas(space: BuiltinSpace, betas: Sequence[float]) -> None:
    """Refuse a β outside :func:`space_beta_range`, naming ``beta`` (``--beta``) and the range."""
    low, high = space_beta_range(space)
    for beta in betas:
        if not low <= beta <= high:
            why = ("r/β overflows float64" if beta < low else
                   "log Z → E_ref[r]/β and float64's ~1e-16 rounding of π_ref passes 1e-9 of it")
            raise DpokitError(f"beta = {beta:g} (--beta) is outside [{low:.3g}, {high:.3g}], the "
                              f"range for the built-in space (max |r(y)| = "
                              f"{high / MAX_BETA_PER_REWARD:.4g}): {why}")


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
    check_space_betas(space, betas)
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
    """Estimate log Z ``repeats`` times at each (β, n) from fresh π_ref samples.

    Refused (:func:`check_monte_carlo`, :func:`check_space_betas`) before sampling when a batch
    of ``repeats × n`` samples would not fit in :data:`MAX_STUDY_BYTES` or a β is out of range.

    The errors are taken in a frame shifted by the best reward c = T·max_v r(v) (token rewards
    r(v) − max_v r(v) ≤ 0, exactly 0 on the best sequence): log Ẑ − log Z = (log Ẑ − c/β) −
    (log Z − c/β), both parts of moderate size. Subtracting the absolute values instead loses
    everything once |log Z| ≈ c/β passes ~1e16 times the error (β ≲ 1e-14·|r|), where
    float64's rounding of log Z swallows the error and the study would report RMSE 0 and full
    coverage for estimates that are off by tens of percent.
    """
    check_space_betas(space, betas)
    check_monte_carlo(space.vocab_size, space.length, sample_sizes, repeats)
    generator = torch.Generator().manual_seed(seed)
    top = float(space.token_rewards.max())
    below_top = space.token_rewards - top  # ≤ 0, exactly 0 at the best token
    rows = []
    for beta in betas:
        exact = float(markov_log_partition(space.log_init, space.log_trans, space.token_rewards,
                                           beta, space.length))
        exact_rest = float(markov_log_partition(space.log_init, space.log_trans, below_top, beta,
                                                space.length))  # log Z − c/β
        for n in sample_sizes:
            samples = markov_sample(repeats * n, space.length, space.log_init, space.log_trans,
                                    generator=generator)
            shifted = token_additive_reward(samples, below_top).view(repeats, n)  # r − c ≤ 0
            gap = shifted.amax(dim=-1, keepdim=True)  # best sampled r − c, ≤ 0
            # Ẑ of the rewards r − c − gap (best sample at 0), then gap/β back: log Ẑ − c/β.
            estimate = estimate_log_partition(shifted - gap, beta, confidence=confidence)
            offset = gap.squeeze(-1) / beta
            log_error = offset + estimate.log_partition - exact_rest
            covered = ((offset + estimate.ci_low <= exact_rest)
                       & (exact_rest <= offset + estimate.ci_high))
            scale = float(log_error.abs().max())
            rmse = (scale * float((log_error / scale).pow(2).mean().sqrt())
                    if 0 < scale < math.inf else scale)  # no overflow of the squares
            rows.append(EstimateRow(
                beta=beta,
                num_samples=n,
                exact_log_partition=exact,
                mean_log_estimate=float(exact + log_error.mean()),
                rmse_log=rmse,
                mean_abs_relative_error=float(torch.expm1(log_error).abs().mean()),
                coverage=float(covered.double().mean()),
                mean_ess=float(estimate.effective_sample_size.mean()),
            ))
    return rows

