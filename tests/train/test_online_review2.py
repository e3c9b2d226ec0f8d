"""On-policy DPO against a second review's findings (each test failed before its fix): a large
seed, the sampled labels' random stream, the order of a soft pair, ``max_length`` online, a
reward failing in evaluation; and the loss's log-probs and k3 KL against a float64 oracle on the
very tokens sampled."""

import copy
import json
import math

import pytest
import torch

import dpokit.objectives.online as online_module
from dpokit.errors import DpokitError
from dpokit.generation import Completion
from dpokit.objectives.reference import Reference
from dpokit.train.loop import train
from tests.helpers import reference_token_logps, write_jsonl
from tests.train.test_online import online

REWARDS = '''
def short(prompts, completions, **kwargs):
    return [-float(len(c)) for c in completions]


def zero(prompts, completions, **kwargs):
    return [0.0 for c in completions]


def fails_on_eval(prompts, completions, **kwargs):
    if any("EVAL" in p for p in prompts):
        raise ValueError("no score for evaluation prompts")
    return [-float(len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards2") / "rewards2.py"
    path.write_text(REWARDS)
    return path


def _objective(workdir, tokenizer, rewards, name, **overrides):
    cfg = online(workdir, name, rewards, **{"reward": f"{rewards}:short", **overrides})
    return cfg.objective(tokenizer)


def test_a_seed_of_2_to_the_31_trains_online(workdir, rewards):
    """``seed`` may be anything in [0, 2³²); the per-micro-batch generation seed derived from
    it, (seed·P + step)·P + index with P = 1,000,003, passed 2⁶⁴ for any seed ≥ ~1.8·10⁷ and
    torch.manual_seed died with a ValueError traceback ("Overflow when unpacking long long")."""
    final = train(online(workdir, "online-big-seed", rewards, reward=f"{rewards}:short",
                         seed=2**31, max_steps=1, batch_size=2, num_generations=2,
                         max_new_tokens=2), progress=False)
    assert (final / "model.safetensors").is_file()


def test_sampled_labels_do_not_replay_the_samplers_draws(workdir, tokenizer, rewards,
                                                        monkeypatch):
    """label: sampled must draw ℓ ~ Bernoulli(p) independently of the completions it labels.
    The labels' generator was seeded with the generation seed itself, so on the CPU its draws
    were the sampler's (torch's global stream after ``manual_seed(seed)``): with multinomial's
    exponential noise, e_0 = −log(1 − frac(8u)) for the label draw u, so prompt 0's label was a
    function of the noise that picked its first completion's first token. Shown with a sampler
    that reads that stream plainly: equal rewards (p = ½), and whether the first completion is
    kept as chosen must not be decided by which token it is."""
    a, b = 5, 6  # two token ids
    drawn = []

    def sampler(model, tok, items, *, seed, num_generations, **kwargs):
        torch.manual_seed(seed)  # as generate_completions seeds the stream it samples from
        flat = [Completion([a if u < 0.5 else b, tok.eos_token_id], "a" if u < 0.5 else "b",
                           True) for u in torch.rand(len(items) * num_generations).tolist()]
        drawn.append(flat)
        return [flat[i * num_generations:(i + 1) * num_generations] for i in range(len(items))]

    monkeypatch.setattr(online_module, "generate_completions", sampler)
    objective = _objective(workdir, tokenizer, rewards, "online-sampled-rng",
                           reward=f"{rewards}:zero", label="sampled", loss_type=["sigmoid"],
                           num_generations=2)
    model = torch.nn.Linear(1, 1)
    prompts = objective.load(str(workdir / "sft.jsonl"), None)[:1]
    seen = set()
    with torch.random.fork_rng():
        for step in range(64):
            (pair,) = objective.prepare(model, prompts, [0], step)
            first = drawn[-1][0].ids
            seen.add((first[0], pair.chosen_ids == first))
    # before the fix only (a, kept) and (b, swapped) occurred: the label was the sample's token
    assert (a, False) in seen and (b, True) in seen, seen


def test_soft_pairs_put_the_higher_reward_first(workdir, tokenizer, rewards):
    """label: soft with two generations kept them in sampling order, so "chosen" was the
    first sample whatever its reward: rewards/accuracies measured agreement with a coin, and
    RPO's NLL (rpo_alpha) or an ``sft`` term trained on a random sample — while with more
    generations chosen was the best. Now the higher reward goes first and p = σ((r_c − r_r)/τ)
    exactly (τ = 2), ≥ ½; the sigmoid_soft loss is the same either way."""
    objective = _objective(workdir, tokenizer, rewards, "online-soft-order",
                           num_generations=2, label_temperature=2.0, max_new_tokens=6)
    from dpokit.fixtures import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7)
    prompts = objective.load(str(workdir / "sft.jsonl"), None)[:16]
    pairs = objective.prepare(model, prompts, list(range(16)), 0)

    def reward(ids):
        return -float(len(tokenizer.decode(ids, skip_special_tokens=True)))

    strict = 0
    for pair in pairs:
        r_c, r_r = reward(pair.chosen_ids), reward(pair.rejected_ids)
        assert r_c >= r_r
        strict += r_c > r_r
        assert pair.label_prob == pytest.approx(1 / (1 + math.exp(-(r_c - r_r) / 2.0)),
                                                rel=1e-12)
    assert strict >= 4  # the check had pairs to order


def test_max_length_bounds_an_online_pair(workdir, tokenizer, rewards, tmp_path):
    """``max_length`` (prompt + completion) was ignored online: a prompt of any length was
    generated from and trained on in full. Now a prompt keeps its last max_length −
    max_new_tokens tokens (as TRL keeps the end) before generation — the pair is generated and
    scored on the same prompt — and a max_length without room for a prompt is one line."""
    long = " ".join(f"word{i}" for i in range(60))
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long}, {"prompt": "the cat"}])
    full = tokenizer(long)["input_ids"]
    assert len(full) > 40
    objective = _objective(workdir, tokenizer, rewards, "online-max-length",
                           max_length=24, max_new_tokens=8)
    prompts = objective.load(str(data), None)
    assert prompts[0].prompt_ids == full[-16:]
    assert prompts[1].prompt_ids == tokenizer("the cat")["input_ids"]
    objective = _objective(workdir, tokenizer, rewards, "online-no-room", max_length=8,
                           max_new_tokens=8)
    with pytest.raises(DpokitError, match=r"max_length \(8\) leaves no room for a prompt"):
        objective.load(str(data), None)


def test_a_reward_failing_in_evaluation_names_the_evaluation(workdir, rewards, tmp_path):
    """A reward that raises on the evaluation prompts after step 1 was reported "at step 2",
    a step that never ran; it names the evaluation after step 1 and the row now."""
    eval_data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "EVAL the cat"}] * 2)
    cfg = online(workdir, "online-eval-error", rewards, reward=f"{rewards}:fails_on_eval",
                 max_steps=2, eval_steps=1, eval_data=str(eval_data), batch_size=2,
                 num_generations=2, max_new_tokens=2)
    with pytest.raises(DpokitError) as caught:
        train(cfg, progress=False)
    message = str(caught.value)
    assert message.startswith("evaluation after step 1: reward ") and "step 2" not in message
    assert "ValueError: no score for evaluation prompts" in message


def test_loss_and_kl_see_the_sampled_tokens(workdir, tokenizer, rewards):
    """Float64 oracle: the policy and reference log-probs the DPO loss reads are those of the
    exact generated ids (EOS included when it ended; a completion cut at max_new_tokens as it
    stands), the reference is the starting model, and kl_to_ref is the mean of k3 =
    (ρ − 1) − log ρ, ρ = π_ref(y)/π_θ(y), over both completions of every pair."""
    from dpokit.fixtures import tiny_causal_lm

    objective = _objective(workdir, tokenizer, rewards, "online-oracle", num_generations=2,
                           max_new_tokens=5, label="hard", loss_type=["sigmoid"])
    ref = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7).eval()
    policy = copy.deepcopy(ref).train()
    with torch.no_grad():  # π_θ ≠ π_ref, as after some steps
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    objective.reference = Reference("model", model=ref)
    prompts = objective.load(str(workdir / "sft.jsonl"), None)[:6]
    pairs = objective.prepare(policy, prompts, list(range(6)), 0)
    assert policy.training  # generation ran in eval mode, training mode is back
    ended = [ids[-1] == tokenizer.eos_token_id for p in pairs
             for ids in (p.chosen_ids, p.rejected_ids)]
    assert not all(ended)  # a completion cut at max_new_tokens is among them
    out = objective.forward(objective.policy(policy), objective.collate(pairs, range(6)))
    k3 = []
    for i, pair in enumerate(pairs):
        for key, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            mine = reference_token_logps(policy, pair.prompt_ids, ids)[0].sum()
            theirs = reference_token_logps(ref, pair.prompt_ids, ids)[0].sum()
            assert float(out.examples[f"{key}_logps"][i]) == pytest.approx(float(mine), abs=2e-5)
            assert float(out.examples[f"ref_{key}_logps"][i]) == pytest.approx(float(theirs),
                                                                                abs=2e-5)
            log_rho = theirs - mine
            k3.append(float(torch.expm1(log_rho) - log_rho))
    means = objective.means({k: float(v) for k, v in out.sums.items()})
    assert means["kl_to_ref"] == pytest.approx(sum(k3) / len(k3), rel=1e-4, abs=1e-7)
    assert means["kl_to_ref"] > 1e-4
    assert json.dumps(means)  # every value a plain number


def test_equal_rewards_of_k_generations_pair_two_completions(workdir, tokenizer, rewards,
                                                             monkeypatch):
    """With more than two generations the pair is the best against the worst; when all k
    rewards were equal both were the first completion (max and min of equal values), so the
    pair was (y₀, y₀): a margin of exactly 0 and no gradient, counted as a pair. Now the worst
    is taken among the others: two distinct completions, and with distinct rewards still the
    first best and the first worst."""
    tok_ids = [5, 6, 7, 8]

    def sampler(model, tok, items, *, seed, num_generations, **kwargs):
        return [[Completion([tok_ids[j], tok.eos_token_id], str(j), True)
                 for j in range(num_generations)] for _ in items]

    monkeypatch.setattr(online_module, "generate_completions", sampler)
    model = torch.nn.Linear(1, 1)
    objective = _objective(workdir, tokenizer, rewards, "online-k-ties",
                           reward=f"{rewards}:zero", num_generations=4)
    prompts = objective.load(str(workdir / "sft.jsonl"), None)[:2]
    for pair in objective.prepare(model, prompts, [0, 1], 0):
        assert pair.chosen_ids != pair.rejected_ids
    # distinct rewards (shorter is better): the best is the shortest text, the worst the longest
    lengths = {5: 3, 6: 1, 7: 4, 8: 1}

    def by_length(model, tok, items, *, seed, num_generations, **kwargs):
        return [[Completion([t, tok.eos_token_id], "x" * lengths[t], True) for t in tok_ids]
                for _ in items]

    monkeypatch.setattr(online_module, "generate_completions", by_length)
    objective = _objective(workdir, tokenizer, rewards, "online-k-distinct", num_generations=4)
    (pair,) = objective.prepare(model, prompts[:1], [0], 0)
    assert pair.chosen_ids[0] == 6 and pair.rejected_ids[0] == 7
