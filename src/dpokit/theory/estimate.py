"""Unbiased Monte-Carlo estimate of the partition function from reference samples
(docs/theory.md §3).

    Z(x) = E_{y~π_ref}[exp(r(x,y)/β)]    ⇒    Ẑ = (1/n) Σ_i exp(r(x,y_i)/β),  y_i ~ π_ref

Ẑ is unbiased for Z (log Ẑ is not unbiased for log Z: by Jensen it is low on average). Its
relative variance is Var_{π_ref}[exp(r/β)]/(n Z²), which explodes as β shrinks: a few samples
with the largest reward carry all the weight, as the effective sample size shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dpokit.errors import DpokitError, check_beta


@dataclass(frozen=True)
class PartitionEstimate:
    """Monte-Carlo estimate of log Z with a normal (CLT) confidence interval for Z.

    Every field has the batch shape of the rewards without their last (sample) dimension.
    """

    log_partition: Tensor
    """log Ẑ."""
    ci_low: Tensor
    """log of the lower end of the interval for Z (−inf when it reaches 0)."""
    ci_high: Tensor
    """log of the upper end of the interval for Z."""
    relative_std_error: Tensor
    """Estimated standard error of Ẑ divided by Ẑ."""
    effective_sample_size: Tensor
    """(Σ w)² / Σ w² with w = exp(r/β): n when all weights are equal, 1 when one dominates."""
    num_samples: int
    confidence: float


def estimate_log_partition(rewards: Tensor, beta: float, *,
                           confidence: float = 0.95) -> PartitionEstimate:
    """Estimate log Z from rewards of samples y_i ~ π_ref(·|x).

    The weights w_i = exp(r_i/β) are computed as exp((r_i − r_max)/β), r_max = max_i r_i, so
    they lie in (0, 1], nothing overflows, and (r_i − r_max)/β stays exact enough even when r_i/β
    itself would overflow; m = r_max/β is added back in log space. The interval is
    Ẑ ± z·s/√n (s the sample standard deviation of w, z the normal quantile), mapped to log space.

    Args:
        rewards: ``(..., n)`` rewards of n ≥ 2 independent samples from π_ref.
        beta: β > 0.
        confidence: two-sided confidence level of the interval, in (0, 1).

    Raises:
        DpokitError: a reward that is NaN or +inf (−inf is a weight of 0), or β so small that
            r_max/β overflows float64 (log Ẑ is then not representable): β ≥ |r_max|/1e308.
    """
    beta = check_beta(beta)
    if not 0.0 < confidence < 1.0:
        raise DpokitError(f"confidence must be in (0, 1), got {confidence}")
    n = rewards.shape[-1]
    if n < 2:
        raise DpokitError(f"estimate_log_partition needs at least 2 samples, got {n}")
    rewards64 = rewards.double()
    bad = torch.isnan(rewards64) | (rewards64 == math.inf)
    if bad.any():
        raise DpokitError(f"estimate_log_partition: rewards must be finite or −inf (weight 0), "
                          f"got {float(rewards64[bad][0])}")
    r_max = rewards64.amax(dim=-1, keepdim=True)
    r_max = torch.where(torch.isfinite(r_max), r_max, torch.zeros_like(r_max))  # all −inf: Ẑ = 0
    shift = r_max / beta
    if not torch.isfinite(shift).all():
        largest = float(r_max.abs().max())
        raise DpokitError(f"beta = {beta:g} is below {largest / 1e308:.3g}, the range where "
                          f"r_max/β and log Ẑ are finite in float64 (max |r| = {largest:g})")
    weights = torch.exp((rewards64 - r_max) / beta)  # in [0, 1]: guarded by the shift
    mean = weights.mean(dim=-1)
    std_error = weights.std(dim=-1) / math.sqrt(n)
    z = float(torch.special.ndtri(torch.tensor(0.5 + confidence / 2, dtype=torch.float64)))
    shift = shift.squeeze(-1)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float64
    return PartitionEstimate(
        log_partition=(shift + mean.log()).to(dtype),
        ci_low=(shift + (mean - z * std_error).clamp(min=0).log()).to(dtype),
        ci_high=(shift + (mean + z * std_error).log()).to(dtype),
        relative_std_error=(std_error / mean).to(dtype),
        effective_sample_size=(weights.sum(dim=-1) ** 2 / (weights**2).sum(dim=-1)).to(dtype),
        num_samples=n,
        confidence=confidence,
    )
