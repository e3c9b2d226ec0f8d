"""Exact log Z over a sequence space by enumeration, guarded by a budget (docs/theory.md §3).

Over completions of exactly T tokens from a vocabulary of V, Z(x) sums V^T terms; over all
lengths 1..T it sums Σ_t V^t. This module enumerates them in batches through a *scorer* — any
callable that maps a batch of token sequences to (log π_ref(y|x), r(x,y)), e.g. a causal LM plus a
reward function — and refuses, before doing the work, when the space is larger than the budget,
stating V^T and the time it would take at the scorer's measured rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpokit.errors import BudgetExceededError, DpokitError, check_beta
from dpokit.format import format_count, format_duration
from dpokit.theory.optimal import log_partition

Scorer = Callable[[Tensor], tuple[Tensor, Tensor]]
"""``scorer(sequences) -> (ref_logps, rewards)``: ``(N, t)`` int64 tokens to two ``(N,)``
tensors."""

DEFAULT_MAX_SEQUENCES = 2**24
"""Default budget: about 16.8 million scorer evaluations."""


def count_sequences(vocab_size: int, length: int, *, all_lengths: bool = False) -> int:
    """Number of terms in Z: V^T, or Σ_{t=1..T} V^t with ``all_lengths`` (exact Python int)."""
    if vocab_size < 1 or length < 1:
        raise DpokitError(f"vocab_size and length must be ≥ 1, got V={vocab_size}, T={length}")
    if all_lengths:
        return sum(vocab_size**t for t in range(1, length + 1))
    return vocab_size**length


def log10_count_sequences(vocab_size: int, length: int, *, all_lengths: bool = False) -> float:
    """log10 of V^T, or of Σ_{t=1..T} V^t = V (V^T − 1)/(V − 1), without forming the count."""
    if vocab_size < 1 or length < 1:
        raise DpokitError(f"vocab_size and length must be ≥ 1, got V={vocab_size}, T={length}")
    if vocab_size == 1:
        return math.log10(length) if all_lengths else 0.0
    log10_v = math.log10(vocab_size)
    if not all_lengths:
        return length * log10_v
    # Σ_t V^t = V^T · (1 − V^−T) / (1 − 1/V)
    return (length * log10_v + math.log10(-math.expm1(-length * math.log(vocab_size)))
            - math.log10(-math.expm1(-math.log(vocab_size))))


def format_power_of_ten(log10_value: float) -> str:
    """``7.53e+300``-style text for 10^log10_value, also far past float64's range."""
    exponent = math.floor(log10_value)
    return f"{10 ** (log10_value - exponent):.3g}e{exponent:+03d}"


def iter_sequences(vocab_size: int, length: int, *, batch_size: int = 4096,
                   device: torch.device | str | None = None) -> Iterator[Tensor]:
    """Every sequence of exactly ``length`` tokens, in lexicographic order.

    Yields ``(n, length)`` int64 batches of at most ``batch_size`` rows; row i of the whole
    stream is the base-V digits of i.
    """
    if batch_size < 1:
        raise DpokitError(f"batch_size must be ≥ 1, got {batch_size}")
    total = vocab_size**length
    if total >= 2**63:
        raise BudgetExceededError(f"{vocab_size}^{length} sequences cannot be indexed in int64")
    powers = vocab_size ** torch.arange(length - 1, -1, -1, device=device, dtype=torch.int64)
    for start in range(0, total, batch_size):
        index = torch.arange(start, min(start + batch_size, total), device=device)
        yield torch.div(index[:, None], powers, rounding_mode="floor") % vocab_size


@dataclass(frozen=True)
class EnumeratedPartition:
    """Result of :func:`enumerate_log_partition`."""

    log_partition: float
    """log Z(x), accumulated in float64."""
    num_sequences: int
    """Number of sequences scored (V^T, or Σ_t V^t)."""
    seconds: float
    """Wall time of the enumeration."""


def check_enumeration_budget(scorer: Scorer, vocab_size: int, length: int, *,
                             all_lengths: bool = False, batch_size: int = 4096,
                             max_sequences: int | None = DEFAULT_MAX_SEQUENCES,
                             max_seconds: float | None = None,
                             device: torch.device | str | None = None) -> int:
    """Return the number of sequences, or raise :class:`BudgetExceededError` if over budget.

    When the count exceeds ``max_sequences`` or a time limit is set, the scorer is timed on one
    batch of the longest sequences, built on ``device`` as the enumeration's are, to estimate
    the total time, which the message states. A space of 2^63 sequences or more (beyond int64
    indexing) is refused from its log-space size alone.
    """
    space = f"Σ_(t=1..{length}) {vocab_size}^t" if all_lengths else f"{vocab_size}^{length}"
    log10_count = log10_count_sequences(vocab_size, length, all_lengths=all_lengths)
    if log10_count >= 63 * math.log10(2):
        # Checked in log space first: the exact count may be a huge integer, and iter_sequences
        # could not index it anyway.
        raise BudgetExceededError(
            f"exact log Z needs {space} ≈ {format_power_of_ten(log10_count)} sequences, more "
            f"than int64 can index (2^63 ≈ 9.2e18); use markov_log_partition (bigram "
            f"reference, additive reward) or estimate_log_partition (Monte Carlo)")
    count = count_sequences(vocab_size, length, all_lengths=all_lengths)
    over_count = max_sequences is not None and count > max_sequences
    if not over_count and max_seconds is None:
        return count
    # Time one batch of the longest sequences end to end: build, score, reduce (≤ 32 MB).
    probe_size = max(1, min(batch_size, vocab_size**length, 2**20, 2**22 // length))
    start = time.perf_counter()
    probe = next(iter_sequences(vocab_size, length, batch_size=probe_size, device=device))
    ref_logps, rewards = scorer(probe)
    torch.logsumexp(ref_logps.detach().double().cpu() + rewards.detach().double().cpu(), dim=0)
    rate = probe_size / max(time.perf_counter() - start, 1e-9)
    estimate = count / rate
    if over_count or (max_seconds is not None and estimate > max_seconds):
        limits = []
        if max_sequences is not None:
            limits.append(f"max_sequences={format_count(max_sequences)}")
        if max_seconds is not None:
            limits.append(f"max_seconds={format_duration(max_seconds)}")
        raise BudgetExceededError(
            f"exact log Z needs {space} = {format_count(count)} sequences; at the measured "
            f"{rate:.3g} sequences/s that would take about {format_duration(estimate)}, over the "
            f"budget ({', '.join(limits)}). Raise the budget, or use markov_log_partition "
            f"(bigram reference, additive reward) or estimate_log_partition (Monte Carlo)"
        )
    return count


def iter_scores(scorer: Scorer, vocab_size: int, length: int, *, all_lengths: bool = False,
                batch_size: int = 4096, max_sequences: int | None = DEFAULT_MAX_SEQUENCES,
                max_seconds: float | None = None, progress: bool = False,
                device: torch.device | str | None = None,
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Score the whole space in batches: yields ``(sequences, ref_logps, rewards)``.

    Lengths run from 1 to T with ``all_lengths`` (shorter first), otherwise only T. The budget is
    checked once, before anything is scored.
    """
    count = check_enumeration_budget(
        scorer, vocab_size, length, all_lengths=all_lengths, batch_size=batch_size,
        max_sequences=max_sequences, max_seconds=max_seconds, device=device)
    lengths = range(1, length + 1) if all_lengths else (length,)
    with tqdm(total=count, unit="seq", unit_scale=True, disable=not progress,
              desc="enumerating Z", leave=False) as bar:
        for t in lengths:
            for sequences in iter_sequences(vocab_size, t, batch_size=batch_size, device=device):
                ref_logps, rewards = scorer(sequences)
                yield sequences, ref_logps, rewards
                bar.update(len(sequences))


def enumerate_log_partition(scorer: Scorer, vocab_size: int, length: int, *, beta: float,
                            all_lengths: bool = False, batch_size: int = 4096,
                            max_sequences: int | None = DEFAULT_MAX_SEQUENCES,
                            max_seconds: float | None = None, progress: bool = False,
                            device: torch.device | str | None = None) -> EnumeratedPartition:
    """Exact log Z(x) = log Σ_y π_ref(y|x) exp(r(x,y)/β) by scoring every sequence.

    The sum runs over all V^T sequences of length T (or all lengths 1..T with ``all_lengths``);
    batches are combined with ``logaddexp`` in float64, so nothing overflows and memory stays
    O(batch_size).

    Args:
        scorer: maps ``(N, t)`` int64 tokens to ``(ref_logps, rewards)``, two ``(N,)`` tensors.
        vocab_size: V.
        length: T.
        beta: β > 0.
        all_lengths: sum over lengths 1..T instead of exactly T.
        batch_size: sequences per scorer call.
        max_sequences: refuse (``BudgetExceededError``) when the space is larger; None: no limit.
        max_seconds: also refuse when the estimated time exceeds this.
        progress: show a progress bar on stderr.
        device: where the token batches are built.

    Raises:
        BudgetExceededError: the space is over the budget (before anything is scored).
        DpokitError: the scorer gave a NaN or +inf log π_ref(y), or a NaN reward where
            π_ref(y) > 0 (log Z would be NaN); the message names the sequence.
    """
    beta = check_beta(beta)
    start = time.perf_counter()
    total = torch.tensor(-math.inf, dtype=torch.float64)
    count = 0
    for sequences, ref_logps, rewards in iter_scores(
            scorer, vocab_size, length, all_lengths=all_lengths, batch_size=batch_size,
            max_sequences=max_sequences, max_seconds=max_seconds, progress=progress,
            device=device):
        ref_logps, rewards = ref_logps.detach().double().cpu(), rewards.detach().double().cpu()
        _check_scores(sequences, ref_logps, rewards)
        batch = log_partition(ref_logps, rewards, beta)
        total = torch.logaddexp(total, batch)
        count += len(sequences)
    return EnumeratedPartition(float(total), count, time.perf_counter() - start)


def _check_scores(sequences: Tensor, ref_logps: Tensor, rewards: Tensor) -> None:
    """Refuse scores that would make log Z NaN, naming the first such sequence.

    log π_ref must be finite or −inf (outside the support, where any reward plays no part); a
    reward must not be NaN where π_ref(y) > 0 (±inf rewards are honest limits: log Z = +inf, or
    y gets no mass).
    """
    ref_logps, rewards = torch.broadcast_tensors(ref_logps, rewards)
    bad_ref = torch.isnan(ref_logps) | (ref_logps == math.inf)
    bad_reward = torch.isnan(rewards) & (ref_logps > -math.inf)
    for bad, name, values in ((bad_ref, "log π_ref", ref_logps), (bad_reward, "reward", rewards)):
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise DpokitError(
                f"the scorer gave {name} = {float(values[row])!r} for sequence "
                f"{sequences[row].tolist()}; exact log Z needs a finite log π_ref (or −inf) and "
                f"a reward that is not NaN wherever π_ref(y) > 0")
