"""Exact measurements on the demo's enumerable outcome space (docs/theory.md §2, §4).

Every completion of every prompt is scored through the model, so each quantity below is exact —
no sampling. A model puts a little mass outside the space (EOS too early or too late); π_θ and
π_ref here are the models restricted to the space and renormalised (the mass inside is reported),
which is the distribution DPO's preferences can shape: a per-prompt constant cancels in its loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpokit.data.collate import pad_sequences
from dpokit.demo.task import DemoTask
from dpokit.logps import completion_logps
from dpokit.theory import (
    expected_reward,
    kl_divergence,
    log_partition,
    optimal_policy,
    rl_objective,
)


@dataclass(frozen=True)
class Space:
    """Token ids of every completion of every prompt, and their rewards."""

    task: DemoTask
    sequences: list[list[tuple[list[int], int]]]
    """Per prompt, ``(prompt + completion + EOS ids, prompt length)`` of each completion."""
    rewards: Tensor
    """``(P, Y)`` r(x, y), float64."""
    completions: Tensor
    """``(Y, T)`` word indices, the same for every prompt."""


def build_space(task: DemoTask, tokenizer) -> Space:
    completions = task.all_completions()
    word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(task.words)))[completions]
    sequences = []
    for prompt in task.prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        sequences.append([(prompt_ids + row + [tokenizer.eos_token_id], len(prompt_ids))
                          for row in word_ids.tolist()])
    rewards = torch.stack([task.rewards(i, completions) for i in range(len(task.prompts))])
    return Space(task, sequences, rewards, completions)


@torch.no_grad()
def score_space(model: nn.Module, space: Space, *, batch_size: int = 1024) -> Tensor:
    """``(P, Y)`` log π(y|x) of every completion (T words + EOS), float64, not renormalised."""
    device = next(model.parameters()).device
    rows = []
    for sequences in space.sequences:
        logps = []
        for start in range(0, len(sequences), batch_size):
            batch = pad_sequences(sequences[start:start + batch_size], pad_token_id=0).to(device)
            logps.append(completion_logps(model, batch).logps.double().cpu())
        rows.append(torch.cat(logps))
    return torch.stack(rows)


def renormalise(logps: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs renormalised over the space, probability mass inside the space), per prompt."""
    log_mass = torch.logsumexp(logps, dim=-1, keepdim=True)
    return logps - log_mass, log_mass.squeeze(-1).exp()


def weighted_correlation(x: Tensor, y: Tensor, weights: Tensor) -> float:
    """Pearson correlation of x and y under weights (summing to 1)."""
    mx, my = (weights * x).sum(), (weights * y).sum()
    cov = (weights * (x - mx) * (y - my)).sum()
    vx, vy = (weights * (x - mx) ** 2).sum(), (weights * (y - my) ** 2).sum()
    return float(cov / (vx * vy).sqrt()) if vx > 0 and vy > 0 else float("nan")


def measure(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float) -> dict:
    """Every exact quantity of the demo for renormalised ``(P, Y)`` log-probabilities.

    Returns per-prompt lists and their means: KL(π_θ‖π*), KL(π_ref‖π*), KL(π_θ‖π_ref), expected
    rewards under π_ref, π_θ, π*, J(π_θ) and its maximum β log Z (the gap is β·KL(π_θ‖π*)), and
    the implicit reward β log(π_θ/π_ref) against r: its correlation (uniform and π*-weighted)
    and the offset E_π*[r − r̂], which equals β log Z(x) at π_θ = π*.
    """
    optimal = optimal_policy(ref_logps, rewards, beta)
    log_z = log_partition(ref_logps, rewards, beta)
    implicit = beta * (policy_logps - ref_logps)
    optimal_probs = optimal.exp()
    per_prompt = {
        "kl_policy_to_optimal": kl_divergence(policy_logps, optimal),
        "kl_ref_to_optimal": kl_divergence(ref_logps, optimal),
        "kl_policy_to_ref": kl_divergence(policy_logps, ref_logps),
        "kl_optimal_to_ref": kl_divergence(optimal, ref_logps),
        "reward_ref": expected_reward(ref_logps, rewards),
        "reward_policy": expected_reward(policy_logps, rewards),
        "reward_optimal": expected_reward(optimal, rewards),
        "objective_policy": rl_objective(policy_logps, ref_logps, rewards, beta),
        "max_objective": beta * log_z,
        "implicit_offset": (optimal_probs * (rewards - implicit)).sum(dim=-1),
    }
    result = {key: float(value.mean()) for key, value in per_prompt.items()}
    result["per_prompt"] = {key: value.tolist() for key, value in per_prompt.items()}
    uniform = torch.full_like(rewards[0], 1.0 / rewards.shape[-1])
    result["per_prompt"]["implicit_reward_correlation"] = [
        weighted_correlation(implicit[i], rewards[i], uniform) for i in range(len(rewards))]
    result["per_prompt"]["implicit_reward_correlation_weighted"] = [
        weighted_correlation(implicit[i], rewards[i], optimal_probs[i])
        for i in range(len(rewards))]
    for key in ("implicit_reward_correlation", "implicit_reward_correlation_weighted"):
        result[key] = sum(result["per_prompt"][key]) / len(rewards)
    result["closed_fraction"] = 1.0 - result["kl_policy_to_optimal"] / result["kl_ref_to_optimal"]
    return result


def best_of_n(ref_logps: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact log-probabilities of best-of-n sampling from π_ref (ties split in proportion to
    π_ref): P(best ∈ tie group g) = F(r_g)^n − F(r_g⁻)^n with F the reward's CDF under π_ref."""
    probs = ref_logps.exp()
    out = torch.zeros_like(probs)
    for i in range(len(rewards)):
        # Rewards equal up to float rounding (sums of scores) form one tie group.
        values, inverse = torch.unique(torch.round(rewards[i], decimals=9), return_inverse=True)
        group_mass = torch.zeros(len(values), dtype=probs.dtype).index_add_(0, inverse, probs[i])
        cdf = group_mass.cumsum(0).clamp(max=1.0)
        below = torch.cat([cdf.new_zeros(1), cdf[:-1]])
        group_best = cdf**n - below**n
        share = probs[i] / group_mass[inverse].clamp(min=1e-300)
        out[i] = group_best[inverse] * share
    return out.clamp(min=1e-300).log()


def matched_best_of_n(ref_logps: Tensor, rewards: Tensor, target_kl: float,
                      max_n: int = 4096) -> tuple[int, dict]:
    """The n whose best-of-n KL(·‖π_ref) (mean over prompts) is closest to ``target_kl``."""
    best = None
    n = 1
    while n <= max_n:
        logps = best_of_n(ref_logps, rewards, n)
        kl = float(kl_divergence(logps, ref_logps).mean())
        candidate = (abs(kl - target_kl), n, kl, float(expected_reward(logps, rewards).mean()))
        best = candidate if best is None or candidate < best else best
        if kl > target_kl:
            break
        n = n + 1 if n < 16 else math.ceil(n * 1.25)
    _, n, kl, reward = best
    return n, {"n": n, "kl_to_ref": kl, "reward": reward}
