"""The exact sampler of π_θ conditioned on leaving the task's space, and the full-space estimate
it feeds, against brute-force enumeration of a real model's whole output space.

The task is tiny enough that every completion the model can emit (every token sequence up to
``max_new_tokens``, EOS only last) is scored, so π_θ|O, KL(π_θ‖π*) on the full space and every
marginal of the sampler are known exactly (float64)."""

import itertools
import math

import pytest
import torch

from dpokit.demo.measure import sample_outside, score_completions
from dpokit.demo.task import DemoTask, build_word_tokenizer
from dpokit.fixtures import tiny_causal_lm
from dpokit.theory import constant_outside_log_partition, full_space_kl

TASK = DemoTask(prompts=("go",), words=("a", "b"), length=1)
MAX_NEW = 3


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_word_tokenizer(TASK)
    models = [tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16, num_layers=1,
                             num_heads=2, max_positions=16, seed=seed) for seed in (1, 2)]
    # Sharpen the random init so the law is far from uniform and π_θ differs from π_ref.
    for model, scale in zip(models, (8.0, 4.0), strict=True):
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    prompt_ids = tokenizer("go")["input_ids"]
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    others = [t for t in range(vocab) if t != eos]
    everything = [[eos]]  # every completion: EOS only last, or cut at MAX_NEW tokens
    for n in range(1, MAX_NEW):
        everything += [[*body, eos] for body in itertools.product(others, repeat=n)]
    everything += [list(body) for body in itertools.product(range(vocab), repeat=MAX_NEW)
                   if eos not in body[:-1] and body[-1] != eos]
    words = tokenizer.convert_tokens_to_ids(list(TASK.words))
    in_s = torch.tensor([len(c) == 2 and c[0] in words and c[1] == eos for c in everything])
    logps = [score_completions(m, prompt_ids, everything) for m in models]
    return tokenizer, models, prompt_ids, everything, words, in_s, logps


def test_the_enumeration_is_the_whole_output_space(setup):
    *_, logps = setup
    for lp in logps:
        assert float(torch.logsumexp(lp, 0).exp()) == pytest.approx(1.0, abs=1e-6)


def test_samples_follow_the_policy_conditioned_on_the_outside(setup):
    """log π_θ(O) from the deviation table equals the enumeration's (1e-6); the frequency of
    every outside completion with exact probability ≥ 1% agrees with π_θ|O (binomial, 4.5σ);
    none lands in S."""
    tokenizer, models, prompt_ids, everything, words, in_s, logps = setup
    policy, lp = models[0], logps[0]
    log_out = float(torch.logsumexp(lp[~in_s], 0))
    n = 20000
    drawn = sample_outside(policy, prompt_ids, words, TASK.length, tokenizer.eos_token_id,
                           num_samples=n, max_new_tokens=MAX_NEW, seed=0)
    assert drawn.log_mass == pytest.approx(log_out, abs=1e-6)
    index = {tuple(c): i for i, c in enumerate(everything)}
    counts = torch.zeros(len(everything))
    for c in drawn.completions:
        counts[index[tuple(c)]] += 1  # KeyError: not a completion the model can emit
    assert counts[in_s].sum() == 0
    conditional = (lp - log_out).exp() * ~in_s
    checked = 0
    for p, k in zip(conditional.tolist(), counts.tolist(), strict=True):
        if p >= 0.01:
            assert abs(k / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (k / n, p)
            checked += 1
    assert checked >= 5


def test_the_full_space_estimate_covers_the_exact_kl(setup):
    """KL(π_θ‖π*) on the full space, r on S and r_invalid outside, exact by enumeration; the
    lower bound is below it (1e-9) and the estimate from sampler draws is within 2 half-widths
    of its 95% interval, whose width shrinks like 1/√n."""
    tokenizer, models, prompt_ids, everything, words, in_s, (lp, ref) = setup
    beta, r_invalid = 0.7, -2.0
    rewards_s = torch.tensor([0.5, 1.5], dtype=torch.float64)  # words a, b
    rewards = torch.full((len(everything),), r_invalid, dtype=torch.float64)
    rewards[in_s] = torch.tensor([rewards_s[words.index(c[0])] for c, s in
                                  zip(everything, in_s.tolist(), strict=True) if s],
                                 dtype=torch.float64)
    optimal = ref + rewards / beta
    optimal = optimal - torch.logsumexp(optimal, 0)
    exact = float((lp.exp() * (lp - optimal)).sum())
    order = [everything.index([w, tokenizer.eos_token_id]) for w in words]
    s_policy, s_ref = lp[order], ref[order]
    log_z_out = constant_outside_log_partition(s_ref, r_invalid, beta)
    widths = []
    for n in (400, 1600):
        drawn = sample_outside(models[0], prompt_ids, words, TASK.length,
                               tokenizer.eos_token_id, num_samples=n, max_new_tokens=MAX_NEW,
                               seed=n)
        got = full_space_kl(
            s_policy, s_ref, rewards_s, beta, outside_log_partition=log_z_out,
            outside_policy_logps=score_completions(models[0], prompt_ids, drawn.completions),
            outside_ref_logps=score_completions(models[1], prompt_ids, drawn.completions),
            outside_rewards=torch.full((n,), r_invalid, dtype=torch.float64))
        assert float(got.lower_bound) <= exact + 1e-9
        half = (float(got.ci_high) - float(got.ci_low)) / 2
        assert abs(float(got.estimate) - exact) <= 2 * half, (float(got.estimate), exact, half)
        widths.append(half)
    assert widths[1] < 0.7 * widths[0]


def test_a_limit_below_the_task_length_puts_everything_outside(setup):
    """With max_new_tokens ≤ length no completion can reach EOS after its words: π_θ(O) = 1,
    and the cut in-space prefixes are among the draws."""
    tokenizer, models, prompt_ids, *_ = setup
    task = DemoTask(prompts=("go",), words=("a", "b"), length=2)
    words = tokenizer.convert_tokens_to_ids(list(task.words))
    drawn = sample_outside(models[0], prompt_ids, words, task.length, tokenizer.eos_token_id,
                           num_samples=2000, max_new_tokens=2, seed=0)
    assert drawn.log_mass == pytest.approx(0.0, abs=1e-6)
    assert all(len(c) <= 2 for c in drawn.completions)
    assert any(len(c) == 2 and all(t in words for t in c) for c in drawn.completions)
