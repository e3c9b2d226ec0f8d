"""Exact samples from π* without Z: rejection sampling from π_ref (docs/theory.md §3).

When r(x,y) ≤ r_max for every y, propose y ~ π_ref and accept with probability
exp((r(x,y) − r_max)/β) ≤ 1. Accepted samples are distributed exactly as
π*(y|x) ∝ π_ref(y|x) exp(r(x,y)/β), and the acceptance rate is Z(x)·exp(−r_max/β).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpokit.errors import BudgetExceededError, DpokitError, check_beta
from dpokit.format import format_count


@dataclass(frozen=True)
class RejectionSamples:
    """Result of :func:`rejection_sample`."""

    samples: Tensor
    """``(num_samples, ...)`` exact samples from π*."""
    rewards: Tensor
    """``(num_samples,)`` their rewards."""
    num_proposals: int
    """Samples drawn from π_ref in total."""
    num_accepted: int
    """Proposals accepted in total (≥ num_samples; the surplus of the last batch is dropped)."""

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed: a consistent estimate of Z·exp(−r_max/β), not an unbiased one
        (the run stops once enough proposals were accepted; with one proposal per batch and one
        sample, E[1/N] = p·log(1/p)/(1 − p) > p). The bias fades as the batches grow."""
        return self.num_accepted / self.num_proposals


def accept_log_probability(rewards: Tensor, max_reward: float, beta: float) -> Tensor:
    """log P(accept | y) = (r(y) − r_max)/β ≤ 0, elementwise."""
    return (rewards - max_reward) / check_beta(beta)


def rejection_sample(sample_ref: Callable[[int], Tensor], reward_fn: Callable[[Tensor], Tensor],
                     *, beta: float, max_reward: float, num_samples: int,
                     batch_size: int = 4096, max_proposals: int = 10**8,
                     generator: torch.Generator | None = None,
                     progress: bool = False) -> RejectionSamples:
    """Draw ``num_samples`` exact samples from π* by rejection from π_ref.

    Args:
        sample_ref: ``sample_ref(n)`` returns n samples y ~ π_ref(·|x), leading dimension n.
        reward_fn: maps those samples to their ``(n,)`` rewards r(x, y).
        beta: β > 0.
        max_reward: an upper bound r_max on r; a proposal above it raises ``DpokitError``.
        num_samples: how many accepted samples to return.
        batch_size: proposals per round.
        max_proposals: refuse (``BudgetExceededError``) rather than propose more than this (the
            last batch is cut to fit it); ≥ 1.
        generator: random generator for the acceptance draws.
        progress: show a progress bar on stderr.
    """
    beta = check_beta(beta)
    if not math.isfinite(max_reward):
        # +inf or NaN would reject every proposal, only noticed after max_proposals of them.
        raise DpokitError(f"max_reward must be a finite bound on r, got {max_reward!r}")
    if num_samples < 1 or batch_size < 1 or max_proposals < 1:
        raise DpokitError(f"num_samples, batch_size and max_proposals must be ≥ 1, got "
                          f"{num_samples}, {batch_size}, {max_proposals}")
    kept_samples: list[Tensor] = []
    kept_rewards: list[Tensor] = []
    num_proposals = num_accepted = 0
    with tqdm(total=num_samples, unit="sample", disable=not progress, leave=False,
              desc="rejection sampling π*") as bar:
        while num_accepted < num_samples:
            if num_proposals >= max_proposals:
                rate = num_accepted / num_proposals
                needed = (num_samples / rate) if rate > 0 else math.inf
                raise BudgetExceededError(
                    f"rejection sampling accepted {num_accepted} of {format_count(num_proposals)} "
                    f"proposals (rate {rate:.3g}); {num_samples} samples need about "
                    f"{format_count(needed) if math.isfinite(needed) else 'infinitely many'} "
                    f"proposals, over max_proposals={format_count(max_proposals)}. A tighter "
                    f"max_reward or a larger beta raises the acceptance rate")
            # Never more than max_proposals in all: the last batch is cut to what is left.
            proposals = sample_ref(min(batch_size, max_proposals - num_proposals))
            rewards = reward_fn(proposals)
            # Checked in float64: a float32 reward compared with the Python float max_reward
            # would round max_reward to float32 first, and let r > r_max through (accepted with
            # probability 1 instead of exp((r − r_max)/β) > 1, so π* would be off).
            rewards64 = rewards.double()
            if bool(torch.isnan(rewards64).any()):
                # NaN < anything is False: it would be rejected silently, biasing the samples.
                raise DpokitError("a proposal has reward NaN; rejection sampling needs a "
                                  "number (or −inf) for every y")
            if bool((rewards64 > max_reward).any()):
                raise DpokitError(
                    f"a proposal has reward {float(rewards64.max())!r} above max_reward="
                    f"{max_reward!r}; rejection sampling needs r ≤ r_max for every y")
            uniforms = torch.rand(rewards.shape, generator=generator, dtype=torch.float64)
            accepted = uniforms.log().to(rewards.device) < accept_log_probability(
                rewards64, max_reward, beta)
            num_proposals += len(rewards)
            num_accepted += int(accepted.sum())
            kept_samples.append(proposals[accepted])
            kept_rewards.append(rewards[accepted])
            bar.update(min(int(accepted.sum()), num_samples - bar.n))
    return RejectionSamples(
        samples=torch.cat(kept_samples)[:num_samples],
        rewards=torch.cat(kept_rewards)[:num_samples],
        num_proposals=num_proposals,
        num_accepted=num_accepted,
    )
