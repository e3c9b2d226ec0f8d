"""Exact measurements on the demo's enumerable outcome space (docs/theory.md §2, §4).

Every completion of every prompt is scored through the model, so each quantity of
:func:`measure` is exact — no sampling. A model also puts mass outside the space (EOS too early or
too late, other tokens): :func:`measure` takes π_θ and π_ref restricted to the space and
renormalised (the mass inside is reported), the distribution DPO's preferences can shape;
:func:`full_space_measure` measures the distance to π* on the model's whole output space, the
distribution a user actually samples, with ``generate`` samples for what lies outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpokit.data.collate import pad_sequences
from dpokit.demo.task import DemoTask
from dpokit.errors import DpokitError
from dpokit.logps import completion_logps
from dpokit.theory import (
    constant_outside_log_partition,
    expected_reward,
    full_space_kl,
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
def _sequence_logps(model: nn.Module, sequences: list[tuple[list[int], int]], *,
                    batch_size: int) -> Tensor:
    """``(n,)`` completion log π of ``(token ids, prompt length)`` sequences, float64."""
    device = next(model.parameters()).device
    logps = [completion_logps(model, pad_sequences(sequences[i:i + batch_size],
                                                   pad_token_id=0).to(device)).logps
             for i in range(0, len(sequences), batch_size)]
    return torch.cat(logps).double().cpu() if logps else torch.zeros(0, dtype=torch.float64)


def score_space(model: nn.Module, space: Space, *, batch_size: int = 1024) -> Tensor:
    """``(P, Y)`` log π(y|x) of every completion (T words + EOS), float64, not renormalised."""
    return torch.stack([_sequence_logps(model, sequences, batch_size=batch_size)
                        for sequences in space.sequences])


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
    if not result["kl_ref_to_optimal"] > 1e-12:  # 0 up to rounding: the fraction is undefined
        raise DpokitError(f"KL(π_ref‖π*) is {result['kl_ref_to_optimal']:.3g}: π* = π_ref up to "
                          f"rounding (a reward constant where π_ref has mass, or β = {beta:g} "
                          f"far above the reward's spread), so there is no distance to close; "
                          f"use a reward that tells completions apart, or a smaller β")
    if not math.isfinite(result["kl_ref_to_optimal"]):  # β so small that log π* underflows
        raise DpokitError(f"KL(π_ref‖π*) is {result['kl_ref_to_optimal']:.3g} at β = {beta:g}: "
                          f"π* = π_ref·exp(r/β)/Z puts a probability that underflows float64 "
                          f"where π_ref has mass; use a larger β")
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
    # An outcome best-of-n never returns (π_ref(y) = 0, or its group's mass underflows) has
    # log-probability −inf: a floor such as 1e-300 would put mass where π_ref has none and make
    # KL(best-of-n ‖ π_ref) infinite.
    return out.log()


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


def in_space(completion: list[int], word_ids: set[int], length: int, eos_token_id: int) -> bool:
    """Whether a generated completion is one of the task's: ``length`` words, then EOS."""
    return (len(completion) == length + 1 and completion[-1] == eos_token_id
            and all(token in word_ids for token in completion[:-1]))


def score_completions(model: nn.Module, prompt_ids: list[int],
                      completions: list[list[int]], *, batch_size: int = 1024) -> Tensor:
    """``(n,)`` log π(y|x) of each completion after ``prompt_ids``, float64."""
    return _sequence_logps(model, [(prompt_ids + c, len(prompt_ids)) for c in completions],
                           batch_size=batch_size)


@dataclass(frozen=True)
class OutsideSamples:
    """Exact samples of π_θ(·|x) conditioned on O, the completions outside the task's space."""

    completions: list[list[int]]
    """Token ids after the prompt (EOS included when the completion ended)."""
    log_mass: float
    """log π_θ(O|x) = log Σ over the deviation table (equals log(1 − π_θ(S|x)))."""


@torch.no_grad()
def _inverse_cdf_draws(probs: Tensor, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` indices drawn i.i.d. from ``probs`` (float64, summing to ~1), by inverse
    CDF: any number of categories (``torch.multinomial`` stops at 2²⁴, which a real model's
    vocabulary times a few hundred prefixes passes), never an index of probability 0."""
    cdf = torch.cumsum(probs.double(), 0)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64) * cdf[-1]
    index = torch.searchsorted(cdf, u, right=True)  # the first with cdf > u: a positive one
    last = int(torch.nonzero(probs > 0).max())
    return index.clamp(max=last).tolist()


@torch.no_grad()
def sample_outside(model: nn.Module, prompt_ids: list[int], word_ids: Sequence[int], length: int,
                   eos_token_id: int, *, num_samples: int, max_new_tokens: int,
                   seed: int) -> OutsideSamples:
    """``num_samples`` exact draws from π_θ(·|x, y ∉ S), with no rejection.

    S is ``length`` tokens of ``word_ids`` then EOS, a prefix tree, so every y ∉ S leaves it at
    one point: after an in-space prefix u of t ≤ ``length`` words, a token v outside the allowed
    set (the words for t < length, EOS for t = length). Hence

        π_θ(y ∉ S) = Σ_u Σ_{v not allowed after u} π_θ(u) π_θ(v | u),

    a table over the V⁰ + … + V^T prefixes (one forward per prefix length). Drawing (u, v) from it
    and continuing with ``generate`` at temperature 1 (the same law as π_θ) up to
    ``max_new_tokens`` tokens in all gives y ~ π_θ|O exactly, however small π_θ(O) is — where
    plain sampling would need ~1/π_θ(O) draws per outside sample. With ``max_new_tokens`` ≤
    ``length`` the in-space prefixes cut at the limit are outside too.
    """
    from dpokit.data.prompts import Prompt
    from dpokit.generation import generate_completions

    device = next(model.parameters()).device
    words = torch.tensor(list(word_ids), device=device)
    was_training = model.training
    model.eval()
    try:
        prefixes = torch.zeros(1, 0, dtype=torch.long, device=device)
        prefix_logps = torch.zeros(1, dtype=torch.float64, device=device)
        table, keys = [], []
        for t in range(min(length, max_new_tokens - 1) + 1):
            ids = torch.cat([torch.tensor(prompt_ids, device=device).expand(len(prefixes), -1),
                             prefixes], dim=1)
            step = torch.cat([model(ids[i:i + 1024]).logits[:, -1].double().log_softmax(-1)
                              for i in range(0, len(ids), 1024)])  # (prefixes, vocab)
            allowed = words if t < length else torch.tensor([eos_token_id], device=device)
            deviate = prefix_logps[:, None] + step
            deviate[:, allowed] = -math.inf
            table.append(deviate.flatten())
            keys.append((t, prefixes, step.shape[1]))
            if t < length:  # extend every prefix by every word
                prefix_logps = (prefix_logps[:, None] + step[:, words]).flatten()
                prefixes = torch.cat([prefixes.repeat_interleave(len(words), 0),
                                      words.repeat(len(prefixes))[:, None]], dim=1)
        if length + 1 > max_new_tokens:  # in-space prefixes cut at the limit
            table.append(prefix_logps)
            keys.append((None, prefixes, 1))
    finally:
        model.train(was_training)
    flat = torch.cat(table)
    log_mass = float(torch.logsumexp(flat, 0))
    if log_mass == -math.inf or num_samples == 0:
        return OutsideSamples([], log_mass)
    draws = _inverse_cdf_draws((flat - log_mass).exp().cpu(), num_samples, seed)
    offsets = [0]
    for part in table:
        offsets.append(offsets[-1] + len(part))
    starts = []
    for index in draws:
        block = next(b for b in range(len(table)) if index < offsets[b + 1])
        t, prefixes, vocab = keys[block]
        local = index - offsets[block]
        starts.append(prefixes[local].tolist() if t is None
                      else [*prefixes[local // vocab].tolist(), local % vocab])
    completions: list[list[int]] = [[] for _ in starts]
    pending: dict[int, list[int]] = {}
    for i, start in enumerate(starts):
        if start[-1] == eos_token_id or len(start) >= max_new_tokens:
            completions[i] = start
        else:
            pending.setdefault(len(start), []).append(i)
    for n, rows in sorted(pending.items()):  # continue from each start, the same law as π_θ
        prompts = [Prompt("", prompt_ids + starts[i]) for i in rows]
        groups = generate_completions(model, _EosOnly(eos_token_id), prompts,
                                      stop_token_ids=[eos_token_id],
                                      max_new_tokens=max_new_tokens - n, temperature=1.0,
                                      seed=seed + n, batch_size=1024)
        for i, (rest,) in zip(rows, groups, strict=True):
            completions[i] = starts[i] + rest.ids
    return OutsideSamples(completions, log_mass)


class _EosOnly:
    """What generation reads of a tokenizer (rows of one length need no padding)."""

    def __init__(self, eos_token_id: int):
        self.eos_token_id = self.pad_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def full_space_measure(policy: nn.Module, ref: nn.Module, space: Space, tokenizer, beta: float,
                       *, policy_space_logps: Tensor, ref_space_logps: Tensor, r_invalid: float,
                       num_samples: int, max_new_tokens: int, seed: int) -> dict:
    """The distance to π* on the model's whole output space (docs/theory.md §6).

    π* puts reward ``r_invalid`` on every completion outside the task's space S, so Z_O is exact
    (:func:`~dpokit.theory.constant_outside_log_partition`) and, since π*|O = π_ref|O,
    KL(π_ref‖π*) is exact too (its lumped bound is tight). For π_θ: the exact lumped lower
    bound, and the estimate with its 95% interval from ``num_samples`` exact samples of π_θ|O per
    prompt (:func:`sample_outside`, scored under π_θ and π_ref), so the interval stays narrow
    however little mass π_θ leaves outside. Also the fraction of ``num_samples`` plain
    ``generate`` samples (temperature 1, no top-k/top-p: what a user who samples the model gets)
    that land in S.
    ``policy_space_logps`` and ``ref_space_logps`` are :func:`score_space` of the two models.
    """
    from dpokit.data.prompts import Prompt
    from dpokit.generation import generate_completions

    if num_samples < 2:
        raise DpokitError(f"the whole-space estimate needs ≥ 2 samples per prompt (its interval "
                          f"needs a sample variance), got {num_samples}")
    if max_new_tokens < space.task.length + 1:  # S, scored without the limit, would not fit
        raise DpokitError(f"max_new_tokens = {max_new_tokens} cannot generate any of the task's "
                          f"completions ({space.task.length} words + EOS)")
    policy_in, ref_in = policy_space_logps, ref_space_logps
    log_z_out = constant_outside_log_partition(ref_in, r_invalid, beta)
    eos = tokenizer.eos_token_id
    prompts = [Prompt(text, sequences[0][0][:sequences[0][1]])
               for text, sequences in zip(space.task.prompts, space.sequences, strict=True)]
    # One generate batch per prompt, one seeded stream over the prompts.
    samples = [[c.ids for c in group] for group in generate_completions(
        policy, tokenizer, prompts, num_generations=num_samples, max_new_tokens=max_new_tokens,
        temperature=1.0, seed=seed, batch_size=num_samples, stop_token_ids=[eos])]
    word_ids = set(tokenizer.convert_tokens_to_ids(list(space.task.words)))
    per_prompt: dict[str, list] = {key: [] for key in (
        "kl_ref_to_optimal", "kl_policy_to_optimal_lower_bound", "kl_policy_to_optimal_estimate",
        "kl_policy_to_optimal_ci", "sampled_in_space", "mass_in_space_policy",
        "mass_in_space_optimal", "outside_samples", "log_mass_outside_table")}
    word_list = tokenizer.convert_tokens_to_ids(list(space.task.words))
    for i, rows in enumerate(samples):
        sampled_outside = sum(not in_space(c, word_ids, space.task.length, eos) for c in rows)
        prompt_ids = prompts[i].prompt_ids
        drawn = sample_outside(policy, prompt_ids, word_list, space.task.length, eos,
                               num_samples=num_samples, max_new_tokens=max_new_tokens,
                               seed=seed + 1 + i)
        outside = drawn.completions
        ref_kl = full_space_kl(ref_in[i], ref_in[i], space.rewards[i], beta,
                               outside_log_partition=log_z_out[i])
        got = full_space_kl(policy_in[i], ref_in[i], space.rewards[i], beta,
                            outside_log_partition=log_z_out[i],
                            outside_policy_logps=score_completions(policy, prompt_ids, outside),
                            outside_ref_logps=score_completions(ref, prompt_ids, outside),
                            outside_rewards=torch.full((len(outside),), float(r_invalid),
                                                       dtype=torch.float64))
        per_prompt["kl_ref_to_optimal"].append(float(ref_kl.lower_bound))  # exact (π*|O = π_ref|O)
        per_prompt["kl_policy_to_optimal_lower_bound"].append(float(got.lower_bound))
        per_prompt["kl_policy_to_optimal_estimate"].append(float(got.estimate))
        per_prompt["kl_policy_to_optimal_ci"].append([float(got.ci_low), float(got.ci_high)])
        per_prompt["sampled_in_space"].append(1.0 - sampled_outside / len(rows))
        per_prompt["mass_in_space_policy"].append(1.0 - float(got.policy_mass_outside))
        per_prompt["mass_in_space_optimal"].append(1.0 - float(got.optimal_mass_outside))
        per_prompt["outside_samples"].append(len(outside))
        per_prompt["log_mass_outside_table"].append(drawn.log_mass)
    mean = {key: sum(values) / len(values) for key, values in per_prompt.items()
            if key != "kl_policy_to_optimal_ci"}
    highs = [h for _, h in per_prompt["kl_policy_to_optimal_ci"]]
    # Prompts are sampled independently: the mean's interval from the per-prompt half-widths,
    # high − estimate (the low end may be cut at the lower bound, which would shrink them).
    half = math.sqrt(sum((h - e) ** 2 for h, e in zip(
        highs, per_prompt["kl_policy_to_optimal_estimate"], strict=True))) / len(highs)
    estimate = mean["kl_policy_to_optimal_estimate"]
    ref_kl = mean["kl_ref_to_optimal"]
    if not (0 < ref_kl < math.inf):  # the closed fractions divide by it
        raise DpokitError(f"KL(π_ref‖π*) on the whole output space is {ref_kl:.3g} at β = "
                          f"{beta:g}: the fraction of it closed is undefined")
    return {**mean, "kl_policy_to_optimal_ci": [
                max(mean["kl_policy_to_optimal_lower_bound"], estimate - half), estimate + half],
            # 1 − KL/KL(π_ref‖π*): the exact KL lower bound gives the most it can have
            # closed; the interval's high end the least (95%) — the bar's number
            "closed_fraction_at_most":
                1.0 - mean["kl_policy_to_optimal_lower_bound"] / ref_kl,
            "closed_fraction_estimate": 1.0 - estimate / ref_kl,
            "closed_fraction_at_least": 1.0 - (estimate + half) / ref_kl,
            "r_invalid": float(r_invalid), "num_samples": num_samples,
            "max_new_tokens": max_new_tokens, "per_prompt": per_prompt}
