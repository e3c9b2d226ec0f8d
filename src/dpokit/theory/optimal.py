"""The closed-form optimum of the KL-regularised objective (docs/theory.md §2 and §4).

    Z(x)    = Σ_y π_ref(y|x) exp(r(x,y)/β)
    π*(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x)
    J_x(π)  = E_π[r] − β KL(π ‖ π_ref) = β log Z(x) − β KL(π ‖ π*)

Pure functions, batched over leading dimensions, ``dim=-1`` the outcome axis. Everything is in
log space; rewards are shifted by their maximum before they meet ``ref_logps`` so that the
dominant outcomes keep full precision even for |r/β| ≥ 10⁶ in float32.

:func:`solve_optimal` computes π*, log Z, KL(π*‖π_ref), E_π*[r] and J(π*) of outcome tables to
a stated float64 tolerance (relative 1e-9) over the whole β range where float64 allows it
(:func:`optimal_beta_range`), and refuses β outside it; the differentiable functions above keep
absolute, not relative, precision as β → ∞.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dpokit.errors import DpokitError, check_beta
from dpokit.theory.kl import _power_series, kl_divergence, kl_from_log_ratio


def _shifted_scores(ref_logps: Tensor, rewards: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Split log π_ref + r/β into ``(shift, log π_ref + (r − r_max)/β)`` with shift = r_max/β.

    ``r_max`` (shape ``(..., 1)``) is the largest reward among outcomes in the support of π_ref.
    Subtracting it *before* dividing by β keeps (r − r_max)/β exact enough even when r/β itself
    overflows (β → 0: r/β = ±inf but (r − r_max)/β ≤ 0 is −inf only for outcomes that lose all
    their mass), and the shifted scores of the leading outcomes stay O(log π_ref), so rounding
    never absorbs them.

    Outcomes outside the support score −inf whatever their reward (a NaN, ±inf or huge reward
    there plays no part: −inf + r/β would be NaN). An r_max of +inf is kept: the outcomes with
    r = +inf share all of π*'s mass in the ratio of π_ref (the β → 0 limit) and log Z = +inf.
    """
    beta = check_beta(beta)
    ref_logps, rewards = torch.broadcast_tensors(ref_logps, rewards)
    in_support = ref_logps > float("-inf")
    r_max = torch.where(in_support, rewards, torch.full_like(rewards, float("-inf")))
    r_max = r_max.amax(dim=-1, keepdim=True)
    r_max = torch.where(r_max > float("-inf"), r_max, torch.zeros_like(r_max)).detach()
    gap = rewards - r_max
    # +inf − (+inf): a best outcome when r_max = +inf (gap 0); elsewhere the gradient is kept.
    gap = torch.where(torch.isnan(gap) & (rewards == r_max), torch.zeros_like(gap), gap)
    shifted = torch.where(in_support, ref_logps + gap / beta, torch.full_like(ref_logps,
                                                                            float("-inf")))
    return r_max / beta, shifted


def log_partition(ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Log partition function log Z = log Σ_y π_ref(y) exp(r(y)/β).

    Computed as ``m + logsumexp(log π_ref + (r − r_max)/β)`` with m = r_max/β, r_max the largest
    reward over the support, so it is finite whenever r_max/β is (``inf`` past float64's range,
    never NaN). Errors are absolute, ~1e-16·(|m| + |log π_ref|): for β ≫ |r| (log Z → 0) use
    :func:`solve_optimal`, which keeps relative precision.

    Args:
        ref_logps: ``(..., Y)`` log π_ref(y|x) over the whole outcome space.
        rewards: ``(..., Y)`` r(x, y), broadcastable against ``ref_logps``.
        beta: β > 0.

    Returns:
        ``(...)`` log Z(x).
    """
    shift, shifted = _shifted_scores(ref_logps, rewards, beta)
    return (shift + torch.logsumexp(shifted, dim=-1, keepdim=True)).squeeze(-1)


def optimal_policy(ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Log-probabilities of the optimal policy, the reward-weighted reference.

        log π*(y) = log π_ref(y) + r(y)/β − log Z

    Args:
        ref_logps: ``(..., Y)`` log π_ref(y|x).
        rewards: ``(..., Y)`` r(x, y), broadcastable against ``ref_logps``.
        beta: β > 0.

    Returns:
        ``(..., Y)`` log π*(y|x); exp of each row sums to 1. Outcomes outside the support of
        π_ref stay at −inf.
    """
    _, shifted = _shifted_scores(ref_logps, rewards, beta)
    return shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)


def expected_reward(policy_logps: Tensor, rewards: Tensor) -> Tensor:
    """E_{y~π}[r(y)] = Σ_y π(y) r(y) over ``dim=-1`` (outcomes with π(y) = 0 contribute 0)."""
    policy_logps, rewards = torch.broadcast_tensors(policy_logps, rewards)
    probs = policy_logps.exp()
    terms = torch.where(probs > 0, probs * rewards, torch.zeros_like(probs))
    return terms.sum(dim=-1)


def rl_objective(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """The KL-regularised RL objective of one prompt, computed exactly over the outcome space.

        J(π) = E_{y~π}[r(x,y)] − β KL(π(·|x) ‖ π_ref(·|x))

    Its maximum over π is β log Z(x), reached only at π* (see :func:`optimal_policy`), and
    J(π) = β log Z − β KL(π ‖ π*) for every π.

    Args:
        policy_logps: ``(..., Y)`` log π(y|x).
        ref_logps: ``(..., Y)`` log π_ref(y|x).
        rewards: ``(..., Y)`` r(x, y).
        beta: β > 0.

    Returns:
        ``(...)`` J(π).
    """
    beta = check_beta(beta)
    return expected_reward(policy_logps, rewards) - beta * kl_divergence(policy_logps, ref_logps)


def implicit_reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward r̂(x,y) = β log(π(y|x)/π_ref(y|x)), elementwise.

    At π = π* it equals r(x,y) − β log Z(x): the true reward up to a per-prompt constant.
    """
    return check_beta(beta) * (policy_logps - ref_logps)


def preference_probability(r_a: Tensor, r_b: Tensor) -> Tensor:
    """Bradley–Terry probability that a is preferred to b: p(a ≻ b) = σ(r_a − r_b), elementwise."""
    return torch.sigmoid(r_a - r_b)


def log_preference_probability(r_a: Tensor, r_b: Tensor) -> Tensor:
    """log p(a ≻ b) = log σ(r_a − r_b), stable for any margin (the DPO log-likelihood term)."""
    return torch.nn.functional.logsigmoid(r_a - r_b)


# ------------------------------------------------------------------ exact solve of one table

SOLVE_RTOL = 1e-9
"""Relative tolerance :func:`solve_optimal` guarantees inside :func:`optimal_beta_range`."""

MAX_ABS_REWARD = 1e300
"""Largest |r| (and π_ref before normalising) :func:`solve_optimal` takes: differences of two
rewards stay finite."""

MAX_SCALED_REWARD = 1e308
"""Largest |r_max|/β: log Z = r_max/β + O(745) must be a finite float64 (max ≈ 1.8e308)."""

KL_UNDERFLOW_FACTOR = 1e150
"""β ≤ σ_ref(r)·1e150 keeps KL(π*‖π_ref) ≈ Var_ref(r)/(2β²) ≥ 5e-301, a normal float64."""

_CENTRED_LIMIT = 600.0
"""The centred form sums π_ref·exp((r − c)/β) directly while its logs stay ≤ 600."""

_PHI_COEFFICIENTS = tuple(1.0 / math.factorial(k) for k in range(2, 24))
"""1/k! for k = 2..23: φ(x) = eˣ − 1 − x = Σ_k xᵏ/k!, used for |x| < 1 (error < 1/24! ≈ 2e-24)."""


class ExactOptimum(NamedTuple):
    """π* of outcome tables and the quantities of the derivation, from :func:`solve_optimal`."""

    optimal_logps: Tensor
    """``(..., Y)`` log π*(y); −inf outside the support of π_ref."""
    log_partition: Tensor
    """``(...)`` log Z."""
    kl_optimal_ref: Tensor
    """``(...)`` KL(π* ‖ π_ref)."""
    expected_reward: Tensor
    """``(...)`` E_π*[r]."""
    objective: Tensor
    """``(...)`` J(π*) = E_π*[r] − β KL(π* ‖ π_ref), computed directly (it equals β log Z)."""


def optimal_beta_range(ref_probs: Tensor, rewards: Tensor) -> tuple[float, float]:
    """The β for which :func:`solve_optimal` is correct to :data:`SOLVE_RTOL` in float64.

        β_min = |r_max| / 1e308        below it r_max/β, and with it log Z, overflows float64
        β_max = σ_ref(r) · 1e150       above it KL(π*‖π_ref) ≈ Var_ref(r)/(2β²) underflows

    with r_max the largest reward on the support of π_ref and σ_ref(r) the standard deviation
    of r under π_ref, taken from a lower bound that is exact unless r sits within a few ulps of
    its mean (β_min = 0 when r_max = 0; β_max = inf when r is constant on the support,
    where π* = π_ref and KL = 0 exactly for every β). Over a batch, the intersection of the rows'
    ranges. Inputs as for :func:`solve_optimal`.
    """
    probs, rewards, support = _checked_table(ref_probs, rewards)
    return _beta_range(probs, rewards, support, _exact_mean(probs, rewards))


def _beta_range(probs: Tensor, rewards: Tensor, support: Tensor,
                mean: Tensor) -> tuple[float, float]:
    """:func:`optimal_beta_range` of a checked table with its exact mean ``(..., 1)``."""
    ref = probs / probs.sum(dim=-1, keepdim=True)
    r_max = torch.where(support, rewards, torch.full_like(rewards, -math.inf)).amax(dim=-1)
    # σ from a lower bound that survives the rounding of c: |r − E r| ≥ |r − c| − |c − E r| with
    # c − E r = −Σ π_ref (r − c) (exact), so outcomes within 2|c − E r| of c are left out.
    offset = _exact_deviation(probs, rewards, mean, support).abs()
    deviation = (rewards - mean).abs()
    deviation = torch.where(support & (deviation >= 2 * offset), deviation - offset,
                            torch.zeros_like(deviation))
    scale = deviation.amax(dim=-1, keepdim=True)  # σ = scale·√(Σ π_ref (dev/scale)²)
    unit = deviation / torch.where(scale > 0, scale, torch.ones_like(scale))
    std = scale.squeeze(-1) * (ref * unit**2).sum(dim=-1).sqrt()
    low = float((r_max.abs() / MAX_SCALED_REWARD).max())
    high = torch.where(std > 0, std * KL_UNDERFLOW_FACTOR, torch.full_like(std, math.inf))
    return low, float(high.min())


def solve_optimal(ref_probs: Tensor, rewards: Tensor, beta: float) -> ExactOptimum:
    """π*, log Z, KL(π*‖π_ref), E_π*[r] and J(π*) of outcome tables, to relative 1e-9.

    π_ref = ``ref_probs / Σ ref_probs`` (normalised here). With c = E_ref[r] (summed exactly,
    then rounded), d = (r − c)/β and t = log(π*/π_ref) = r/β − log Z:

        log Z = c/β + K,     K = log Σ π_ref e^d = log1p(x)
        x     = Σ_{|d|<1} π_ref·d  +  Σ_{|d|<1} π_ref·φ(d)  +  Σ_{|d|≥1} π_ref·expm1(d)
        t     = d − K,       log π* = log π_ref + t
        KL    = Σ π_ref·g(t),     g(t) = 1 + (t − 1)eᵗ ≥ 0            (:func:`kl_from_log_ratio`)
        E     = c + Σ π_ref·(r − c) + Σ π_ref·expm1(t)·(r − c),       J = E − β·KL

    with φ(x) = eˣ − 1 − x ≥ 0. The first sum of x, and Σ π_ref·(r − c), are summed exactly
    (two-products and ``math.fsum``); the others have terms ≥ 0 or bounded cancellation. So
    nothing cancels as β → ∞, where KL ≈ Var_ref(r)/(2β²) and the textbook
    Σ π*·(r/β − log Z) keeps only rounding noise (30% off at β = 1e8, negative by 1e15).
    As β → 0 the centred sums would overflow (π_ref·e^d past e^600) and c itself is off by its
    rounding (|Σ π_ref d| > 1); there, and wherever it cancels less, the form shifted by the
    best reward is used: e = (r − r_max)/β ≤ 0, L = log Σ π_ref eᵉ (log1p of Σ π_ref·expm1(e),
    or logsumexp when the best outcomes hold under half of π_ref), log Z = r_max/β + L,
    t = e − L, E = r_max + Σ π*·(r − r_max). Only r_max/β needs to be finite.

    Tolerance, inside :func:`optimal_beta_range`, checked against 50-digit mpmath: each π*(y)
    and KL(π*‖π_ref) to relative 1e-9 (absolute 2.3e-308, the smallest normal float64, for
    values below it); log Z, E_π*[r] and J likewise, except near a value 0 that the sum only
    reaches by cancellation (log Z crossing 0 as β varies; E_π*[r] of rewards of both signs),
    where the error bound is 1e-9·(|E_ref r| + |r_max|)/β for log Z and 1e-9·max|r| for
    E_π*[r] and J.

    Args:
        ref_probs: ``(..., Y)`` π_ref(y) ≥ 0, finite, ≤ 1e300, at least one > 0 per row.
        rewards: ``(..., Y)`` r(y), finite, |r| ≤ 1e300; ignored where π_ref(y) = 0.
        beta: β inside :func:`optimal_beta_range`.

    Returns:
        :class:`ExactOptimum` in float64. Not differentiable (use :func:`optimal_policy`).

    Raises:
        DpokitError: an input outside those ranges; the message names the range.
    """
    beta = check_beta(beta)
    probs, rewards, support = _checked_table(ref_probs, rewards)
    mean = _exact_mean(probs, rewards)
    low, high = _beta_range(probs, rewards, support, mean)
    if not low <= beta <= high:
        raise DpokitError(_beta_range_message(beta, low, high))
    zeros = torch.zeros_like(probs)
    total = probs.sum(dim=-1, keepdim=True)
    ref = probs / total
    log_ref = torch.where(support, probs.log() - total.log(), torch.full_like(probs, -math.inf))

    # Centred form.
    d = (rewards - mean) / beta
    small = support & (d.abs() < 1.0)
    large = support & ~small
    near = torch.where(small, d, zeros)
    far = torch.where(large, torch.where(d < 0, ref * torch.expm1(d), (log_ref + d).exp() - ref),
                      zeros)
    x = (_exact_deviation(probs, rewards, mean, small) / beta
         + (ref * _power_series(near, _PHI_COEFFICIENTS)).sum(dim=-1, keepdim=True)
         + far.sum(dim=-1, keepdim=True))
    centred_k = torch.log1p(x)
    mean_deviation = _exact_deviation(probs, rewards, mean, support)  # Σ π_ref (r − c)
    centred = (~support | (torch.isfinite(d) & (log_ref + d <= _CENTRED_LIMIT))).all(
        dim=-1, keepdim=True) & (mean_deviation.abs() <= beta)

    # Shifted form.
    r_max = torch.where(support, rewards, torch.full_like(rewards, -math.inf)).amax(
        dim=-1, keepdim=True)
    e = (rewards - r_max) / beta
    below = torch.where(support, ref * torch.expm1(e), zeros).sum(dim=-1, keepdim=True)
    shifted_l = torch.where(below >= -0.5, torch.log1p(below.clamp(min=-0.5)),
                            torch.logsumexp(log_ref + e, dim=-1, keepdim=True))

    log_ratio = torch.where(support, torch.where(centred, d - centred_k, e - shifted_l), zeros)
    optimal_logps = log_ref + log_ratio
    optimal = optimal_logps.exp()
    kl = kl_from_log_ratio(log_ref, log_ratio)

    # log Z and E: each form is shift + rest, good to ~1e-16·(|shift| + |rest|); take the
    # one that cancels less.
    log_partition = _less_cancelling(centred, mean / beta, centred_k, r_max / beta, shifted_l)
    moved = torch.where(log_ratio < 1.0, ref * torch.expm1(log_ratio), optimal - ref)
    centred_rest = mean_deviation + torch.where(support, moved * (rewards - mean), zeros).sum(
        dim=-1, keepdim=True)
    shifted_rest = torch.where(support, optimal * (rewards - r_max), zeros).sum(
        dim=-1, keepdim=True)
    expected = _less_cancelling(torch.ones_like(centred), mean, centred_rest, r_max,
                                shifted_rest)
    return ExactOptimum(
        optimal_logps=optimal_logps,
        log_partition=log_partition,
        kl_optimal_ref=kl,
        expected_reward=expected,
        objective=expected - beta * kl,
    )


def _beta_range_message(beta: float, low: float, high: float) -> str:
    """One line: β, the range, and what overflows or underflows outside it."""
    if beta < low:
        log10_scaled = math.log10(low) + math.log10(MAX_SCALED_REWARD) - math.log10(beta)
        why = (f"below it |r_max|/β ≈ 10^{log10_scaled:.1f} exceeds {MAX_SCALED_REWARD:.0e} "
               f"and log Z ≈ r_max/β overflows")
    else:
        log10_std = math.log10(high) - math.log10(KL_UNDERFLOW_FACTOR)
        log10_kl = 2 * (log10_std - math.log10(beta)) - math.log10(2.0)
        why = (f"above it (σ_ref(r)·{KL_UNDERFLOW_FACTOR:.0e}) KL(π*‖π_ref) ≈ "
               f"Var_ref(r)/(2β²) ≈ 10^{log10_kl:.1f} underflows")
    return (f"beta = {beta:.6g} is outside [{low:.6g}, {high:.6g}], the range of β where float64 "
            f"gives this table's π*, log Z and KL(π*‖π_ref) to relative 1e-9; {why}")


def _less_cancelling(allowed: Tensor, shift_a: Tensor, rest_a: Tensor, shift_b: Tensor,
                     rest_b: Tensor) -> Tensor:
    """``(...)`` shift + rest of form a where ``allowed`` and it cancels less, else of form b."""
    use_a = allowed & (shift_a.abs() + rest_a.abs() <= shift_b.abs() + rest_b.abs())
    return torch.where(use_a, shift_a + rest_a, shift_b + rest_b).squeeze(-1)


def _checked_table(ref_probs: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``(probs, rewards, support)`` after the input checks of :func:`solve_optimal`;
    rewards outside the support are set to 0 (they play no part)."""
    probs, rewards = torch.broadcast_tensors(torch.as_tensor(ref_probs, dtype=torch.float64),
                                             torch.as_tensor(rewards, dtype=torch.float64))
    if probs.dim() == 0:
        raise DpokitError("solve_optimal needs an outcome axis: ref_probs of shape (..., Y)")
    for name, values, rule in (("ref_probs", probs, "finite, ≥ 0 and ≤ 1e300"),
                               ("rewards", rewards, "finite with |r| ≤ 1e300")):
        bad = ~(torch.isfinite(values) & (values.abs() <= MAX_ABS_REWARD))
        if name == "ref_probs":
            bad |= values < 0
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise DpokitError(f"{name}[{', '.join(map(str, index))}] = {float(values[index])!r}:"
                              f" must be {rule}")
    support = probs > 0
    if not support.any(dim=-1).all():
        raise DpokitError("ref_probs: a row has no outcome with π_ref(y) > 0")
    return probs, torch.where(support, rewards, torch.zeros_like(rewards)), support


def _exact_mean(probs: Tensor, rewards: Tensor) -> Tensor:
    """``(..., 1)`` c = Σ p r / Σ p, correctly rounded (up to ties): the exactly summed quotient,
    then one correction by the exact remainder Σ p (r − c)/Σ p (see :func:`_exact_deviation`).
    """
    p, r, r_exponent = _unit_scaled(probs, rewards)
    product, product_error = _two_product(p, r)
    rows = [math.fsum(high + low) / math.fsum(weights) for high, low, weights in
            _rows(product, product_error, p)]
    mean = _ldexp(torch.tensor(rows, dtype=torch.float64).reshape(r_exponent.shape), r_exponent)
    return mean + _exact_deviation(probs, rewards, mean, probs > 0)


def _exact_deviation(probs: Tensor, rewards: Tensor, mean: Tensor, mask: Tensor) -> Tensor:
    """``(..., 1)`` Σ_{mask} p·(r − c) / Σ p, correctly rounded from the exact value.

    p and r are scaled by powers of two (exact) so that their largest entries are ~1 and no
    product underflows; each product is split into two floats whose sum is exact (Dekker's
    two-product) and ``math.fsum`` adds all of them without error. (Entries below ~1e-300 of
    the largest lose bits: a relative 1e-300 at most.)
    """
    p, r, r_exponent = _unit_scaled(probs, rewards)
    c = _ldexp(mean, -r_exponent).expand_as(p)
    p_masked = torch.where(mask, p, torch.zeros_like(p))
    pieces = (*_two_product(p_masked, r), *_two_product(p_masked, -c))
    rows = [math.fsum(a + b + c_ + d) / math.fsum(weights)
            for a, b, c_, d, weights in _rows(*pieces, p)]
    return _ldexp(torch.tensor(rows, dtype=torch.float64).reshape(r_exponent.shape), r_exponent)


def _rows(*tensors: Tensor):
    """Zip the rows (last axis) of same-shaped tensors as Python lists."""
    y = tensors[0].shape[-1]
    return zip(*(t.reshape(-1, y).tolist() for t in tensors), strict=True)


def _unit_scaled(probs: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(p·2^−a, r·2^−b, b)`` with per-row powers of two that bring each maximum near 1."""
    r_exponent = _exponent(rewards)
    return _ldexp(probs, -_exponent(probs)), _ldexp(rewards, -r_exponent), r_exponent


def _exponent(values: Tensor) -> Tensor:
    """``(..., 1)`` int k per row with max |values|·2^−k in [½, 1) (0 for an all-zero row)."""
    largest = values.abs().amax(dim=-1, keepdim=True)
    return torch.frexp(torch.where(largest > 0, largest, torch.ones_like(largest)))[1]


def _ldexp(values: Tensor, exponent: Tensor) -> Tensor:
    """values·2^exponent, exact (barring over/underflow of the result) even where 2^exponent
    itself is not a float64: applied in two halves."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(values, half), exponent - half)


def _two_product(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(a·b, error)`` with a·b + error = the exact product (Dekker; |a|, |b| ≤ 1)."""

    def split(v: Tensor) -> tuple[Tensor, Tensor]:
        scaled = 134217729.0 * v  # 2^27 + 1: the high half keeps 26 bits
        high = scaled - (scaled - v)
        return high, v - high

    product = a * b
    a_high, a_low = split(a)
    b_high, b_low = split(b)
    error = ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low
    return product, error
