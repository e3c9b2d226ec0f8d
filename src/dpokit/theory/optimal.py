"""The closed-form optimum of the KL-regularised objective (docs/theory.md §2 and §4).

    Z(x)    = Σ_y π_ref(y|x) exp(r(x,y)/β)
    π*(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x)
    J_x(π)  = E_π[r] − β KL(π ‖ π_ref) = β log Z(x) − β KL(π ‖ π*)

Pure functions, batched over leading dimensions, ``dim=-1`` the outcome axis. Everything is in
log space; rewards are shifted by their maximum before they meet ``ref_logps`` so that the
dominant outcomes keep full precision even for |r/β| ≥ 10⁶ in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpokit.errors import check_beta
from dpokit.theory.kl import kl_divergence


def _shifted_scores(ref_logps: Tensor, rewards: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Split log π_ref + r/β into ``(shift, ref_logps + r/β − shift)``.

    ``shift`` (shape ``(..., 1)``) is the largest r/β among outcomes in the support of π_ref, so
    the shifted scores of the leading outcomes are O(log π_ref) and never absorb it in rounding.
    """
    scaled = rewards / check_beta(beta)
    ref_logps, scaled = torch.broadcast_tensors(ref_logps, scaled)
    in_support = ref_logps > float("-inf")
    shift = torch.where(in_support, scaled, torch.full_like(scaled, float("-inf")))
    shift = shift.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()
    return shift, ref_logps + (scaled - shift)


def log_partition(ref_logps: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Log partition function log Z = log Σ_y π_ref(y) exp(r(y)/β).

    Computed as ``m + logsumexp(log π_ref + r/β − m)`` with m = max r/β over the support.

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
