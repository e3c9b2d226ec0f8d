"""On-policy DPO as a user runs it, against oracles that do not go through dpokit's pairing.

A user's reward file (``rewards.py:my_reward``, on the completions' text) logs every call it
gets; from that log and the run's checkpoints every logged training metric is recomputed — the
pair each prompt trains on (as the README says: the two generations, or the best and the worst;
the higher reward first), its label, the float64 log-probs of exactly the generated tokens (EOS
last when it ended, nothing after it) under the checkpoint that generated them and under π_ref,
and from those the loss, margins and k3 kl_to_ref. Resume is compared with an uninterrupted run
call by call; a reward-model directory is scored independently; ``dpokit eval`` of the trained
model against a float64 recomputation; and the demo's whole-space measurement against brute
force over every sequence the model can emit.
"""

import itertools
import json
import math

import pytest
import torch

from dpokit.train.loop import train
from tests.helpers import read_metrics, reference_token_logps, run_cli, write_jsonl
from tests.train.test_online import online

REWARDS = '''
import json
import os

LOG = {log!r}


def my_reward(prompts, completions, completion_ids, **kwargs):
    """Completions of about 6 characters with many 'e's are best (text in)."""
    values = [-abs(len(c) - 6.0) + 0.5 * c.count("e") for c in completions]
    with open(LOG, "a") as f:
        f.write(json.dumps({{"prompts": list(prompts), "completions": list(completions),
                            "ids": [list(i) for i in completion_ids],
                            "rewards": values}}) + "\\n")
    return values
'''


def _reward_file(directory):
    log = directory / "calls.jsonl"
    path = directory / "rewards.py"
    path.write_text(REWARDS.format(log=str(log)))
    return path, log


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _pairs_of(call, k):
    """The README's pairing of one reward call: per prompt (k consecutive completions) the two,
    or the best and the worst (the first best; the first worst among the others), the higher
    reward first (ties: sampling order)."""
    pairs = []
    for start in range(0, len(call["rewards"]), k):
        r = call["rewards"][start:start + k]
        if k == 2:
            a, b = 0, 1
        else:
            a = max(range(k), key=lambda j: (r[j], -j))
            b = min((j for j in range(k) if j != a), key=lambda j: (r[j], j))
        if r[b] > r[a]:
            a, b = b, a
        pairs.append((call["prompts"][start], start + a, start + b))
    return pairs


@pytest.fixture(scope="module")
def user_reward(tmp_path_factory):
    return _reward_file(tmp_path_factory.mktemp("user-reward"))


@pytest.mark.parametrize(("label", "k", "tau", "penalty"), [("soft", 2, 2.0, None),
                                                          ("hard", 3, 1.0, 0.75)])
def test_logged_metrics_equal_a_recomputation_from_the_rewards_calls(workdir, tokenizer,
                                                                     tmp_path, label, k, tau,
                                                                     penalty):
    """Every training record's generation statistics, loss, margins and kl_to_ref recomputed
    from what the reward saw (the completions' ids) and the checkpoint that generated them
    (float64, 2e-5): the pair is the one the README names (after missing_eos_penalty), the
    soft label σ((r_c − r_r)/τ), and nothing is trained past a completion's EOS (the ids the
    reward got end there, and the loss is reproduced from exactly those tokens)."""
    from transformers import AutoModelForCausalLM

    path, log = _reward_file(tmp_path)
    loss = ["sigmoid_soft"] if label == "soft" else ["sigmoid"]
    steps, beta = 3, 1.0
    final = train(online(workdir, str(tmp_path / "run"), path, reward=f"{path}:my_reward",
                         label=label, loss_type=loss, num_generations=k, batch_size=4,
                         max_steps=steps, logging_steps=1, save_steps=1, save_total_limit=None,
                         max_new_tokens=6, beta=beta, learning_rate=5e-2,
                         label_temperature=tau, missing_eos_penalty=penalty),
                  progress=False)
    records = [r for r in read_metrics(final.parent) if "loss" in r]
    calls = _calls(log)
    assert len(calls) == steps == len(records)
    ref = AutoModelForCausalLM.from_pretrained(workdir / "llama")
    prompt_ids = {}
    for prompt in {p for c in calls for p in c["prompts"]}:
        prompt_ids[prompt] = tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    for call in calls:  # the reward the pairs are formed on: after the missing-EOS penalty
        call["rewards"] = [v - (penalty if penalty and c[-1] != eos else 0.0)
                           for v, c in zip(call["rewards"], call["ids"], strict=True)]
    cut = 0
    for step, (call, record) in enumerate(zip(calls, records, strict=True), 1):
        rewards, ids = call["rewards"], call["ids"]
        cut += sum(c[-1] != eos for c in ids)
        assert len(rewards) == 4 * k
        for c in ids:  # EOS only last, or cut at max_new_tokens
            assert eos not in c[:-1] and (c[-1] == eos or len(c) == 6)
            assert tokenizer.decode(c, skip_special_tokens=True) == call["completions"][
                ids.index(c)]
        n = len(rewards)
        mean = sum(rewards) / n
        assert record["reward/mean"] == pytest.approx(mean, abs=1e-9)
        assert record["reward/std"] == pytest.approx(
            math.sqrt(sum((v - mean) ** 2 for v in rewards) / n), abs=1e-9)
        assert record["eos_fraction"] == pytest.approx(sum(c[-1] == eos for c in ids) / n)
        assert record["completion_tokens"] == pytest.approx(sum(map(len, ids)) / n)
        policy = (ref if step == 1 else AutoModelForCausalLM.from_pretrained(
            final.parent / f"checkpoint-{step - 1}"))
        losses, margins, entropies, k3, chosen_logps = [], [], [], [], []
        for prompt, a, b in _pairs_of(call, k):
            x = prompt_ids[prompt]
            lp = {j: float(reference_token_logps(policy, x, ids[j])[0].sum()) for j in (a, b)}
            lr = {j: float(reference_token_logps(ref, x, ids[j])[0].sum()) for j in (a, b)}
            h = (lp[a] - lr[a]) - (lp[b] - lr[b])
            p = _sigmoid((rewards[a] - rewards[b]) / tau)
            entropies.append(-sum(q * math.log(q) for q in (p, 1 - p) if q > 0))
            if label == "soft":
                losses.append(-(p * math.log(_sigmoid(beta * h))
                                + (1 - p) * math.log(_sigmoid(-beta * h))))
            else:
                losses.append(-math.log(_sigmoid(beta * h)))
            margins.append(beta * h)
            chosen_logps.append(lp[a])
            for j in (a, b):
                log_rho = lr[j] - lp[j]
                k3.append(math.expm1(log_rho) - log_rho)
        assert record["label_entropy"] == pytest.approx(sum(entropies) / 4, abs=1e-9)
        assert record["loss"] == pytest.approx(sum(losses) / 4, abs=2e-5), step
        assert record["rewards/margins"] == pytest.approx(sum(margins) / 4, abs=2e-5), step
        assert record["logps/chosen"] == pytest.approx(sum(chosen_logps) / 4, abs=2e-5), step
        assert record["kl_to_ref"] == pytest.approx(sum(k3) / len(k3), abs=2e-5), step
    assert records[-1]["kl_to_ref"] > 1e-3  # the check had a moved policy to see
    assert cut > 0  # and completions cut at max_new_tokens (no EOS) among the pairs


def test_sampled_labels_pick_the_winner_with_the_bradley_terry_probability(workdir, tokenizer,
                                                                           tmp_path,
                                                                           monkeypatch):
    """label: sampled — y_best ≻ y_worst with probability p = σ((r_best − r_worst)/τ): over 600
    steps of fixed completions with Δr = 1 (τ = 2: p = σ(0.5) = 0.622) the share kept in order
    is p within 4.5 binomial σ; label_prob stays None (the loss of loss_type)."""
    import dpokit.objectives.online as online_module
    from dpokit.generation import Completion

    texts = {5: "aaaa", 6: "bbbbb", 7: "c"}  # my_reward: −|len − 6|: −2, −1, −5

    def sampler(model, tok, items, *, seed, num_generations, **kwargs):
        return [[Completion([t, tok.eos_token_id], texts[t], True) for t in (5, 6, 7)]
                for _ in items]

    monkeypatch.setattr(online_module, "generate_completions", sampler)
    path, _ = _reward_file(tmp_path)
    cfg = online(workdir, str(tmp_path / "sampled"), path, reward=f"{path}:my_reward",
                 label="sampled", loss_type=["sigmoid"], num_generations=3,
                 label_temperature=2.0)
    objective = cfg.objective(tokenizer)
    prompts = objective.load(str(workdir / "sft.jsonl"), None)[:1]
    kept, n = 0, 600
    for step in range(n):
        (pair,) = objective.prepare(torch.nn.Linear(1, 1), prompts, [0], step)
        assert {pair.chosen_ids[0], pair.rejected_ids[0]} == {6, 7}  # best and worst
        assert pair.label_prob is None
        kept += pair.chosen_ids[0] == 6
    p = _sigmoid((-1.0 - -5.0) / 2.0)
    assert abs(kept / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (kept / n, p)


def test_resume_generates_exactly_what_an_uninterrupted_run_generates(workdir, tmp_path):
    """Sampled labels, 3 generations, gradient accumulation 2, a missing-EOS penalty and
    evaluation with eval_generate: 2 + 2 steps give the reward calls (prompts, completion ids,
    rewards) of 4 straight steps from step 3 on, the same metrics records and samples.jsonl."""
    common = {"label": "sampled", "loss_type": ["sigmoid"], "num_generations": 3,
              "batch_size": 2, "gradient_accumulation_steps": 2, "missing_eos_penalty": 1.5,
              "max_new_tokens": 5, "max_steps": 4, "logging_steps": 1, "eval_steps": 2,
              "eval_data": str(workdir / "sft.jsonl"), "eval_generate": 2,
              "per_device_eval_batch_size": 8}
    runs = {}
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        path, log = _reward_file(tmp_path / name)
        out = str(tmp_path / name / "run")
        spec = {"reward": f"{path}:my_reward", **common}
        if name == "resumed":
            train(online(workdir, out, path, **{**spec, "max_steps": 2}, save_steps=2),
                  progress=False)
            final = train(online(workdir, out, path, **spec, save_steps=2, resume="auto"),
                          progress=False)
        else:
            final = train(online(workdir, out, path, **spec), progress=False)
        runs[name] = (read_metrics(final.parent), _calls(log),
                      (final.parent / "samples.jsonl").read_text())
    (m_a, calls_a, samples_a), (m_b, calls_b, samples_b) = runs["straight"], runs["resumed"]
    assert calls_b == calls_a  # the resumed part: what the straight run saw from step 3 on
    assert samples_a == samples_b
    assert len(m_a) == len(m_b)
    volatile = ("pairs_per_second", "generation/tokens_per_second")
    for a, b in zip(m_a, m_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in volatile or (key.startswith("eval/") and key.endswith("per_second")):
                continue
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_a_reward_model_directory_scores_and_orders_the_pairs(workdir, tokenizer, tmp_path):
    """A tiny sequence classifier saved with its tokenizer as the reward: the pairs prepare
    forms are ordered by the model's score of prompt + completion text, computed alone (no
    padding) with plain transformers; the soft label is σ(Δscore); a 2-step run trains and its
    eval_generate samples carry that same score (1e-5)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpokit.fixtures import tiny_causal_lm

    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16,
                                  intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=128, num_labels=1, pad_token_id=0,
                                  tie_word_embeddings=False)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        rm.score.weight.mul_(50.0)  # scores that differ between completions
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    def oracle(prompt, text):
        ids = torch.tensor([tokenizer(prompt + text)["input_ids"]])
        with torch.no_grad():
            return float(rm(input_ids=ids).logits[0, 0])

    cfg = online(workdir, str(tmp_path / "rm-run"), tmp_path, reward=str(rm_dir),
                 num_generations=2, max_new_tokens=6, max_steps=2, batch_size=4,
                 eval_data=str(workdir / "sft.jsonl"), eval_steps=2, eval_generate=3)
    objective = cfg.objective(tokenizer)
    prompts = objective.load(str(workdir / "sft.jsonl"), None)[:6]
    policy = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7)
    pairs = objective.prepare(policy, prompts, list(range(6)), 0)
    strict = 0
    for prompt, pair in zip(prompts, pairs, strict=True):
        r_c = oracle(prompt.prompt, tokenizer.decode(pair.chosen_ids, skip_special_tokens=True))
        r_r = oracle(prompt.prompt, tokenizer.decode(pair.rejected_ids,
                                                     skip_special_tokens=True))
        assert r_c >= r_r - 1e-5
        strict += r_c > r_r + 1e-3
        assert pair.label_prob == pytest.approx(_sigmoid(r_c - r_r), abs=1e-5)
    assert strict >= 2
    final = train(cfg, progress=False)
    samples = [json.loads(line) for line in (final.parent / "samples.jsonl").read_text()
               .splitlines()]
    assert len(samples) == 3
    for s in samples:
        assert s["reward"] == pytest.approx(oracle(s["prompt"], s["completion"]), abs=1e-5)


def test_dpokit_eval_of_the_trained_model_equals_a_float64_recomputation(workdir, tmp_path,
                                                                        capsys):
    """``dpokit eval`` of an on-policy run's final model against the starting model as
    reference, on an offline preference file: its loss and margins are the float64 DPO loss of
    the trained and reference models (2e-5); and eval_steps during training logged eval/…
    records at the steps asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = _reward_file(tmp_path)
    final = train(online(workdir, str(tmp_path / "run"), path, reward=f"{path}:my_reward",
                         max_steps=4, eval_steps=2, eval_data=str(workdir / "sft.jsonl"),
                         batch_size=4, num_generations=2, max_new_tokens=4,
                         learning_rate=5e-2), progress=False)
    evals = [r for r in read_metrics(final.parent) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert math.isfinite(r["eval/loss"]) and "eval/reward/mean" in r
    rows = [{"prompt": "the cat", "chosen": " yes good", "rejected": " no bad"},
            {"prompt": "a bird", "chosen": " red sea", "rejected": " moon"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "per.jsonl"
    code, stdout, err = run_cli(capsys, "eval", "--model", str(final), "--ref-model",
                                str(workdir / "llama"), "--data", str(data), "--beta", "0.5",
                                "--per-example", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    metrics = result.get("metrics", result)
    policy = AutoModelForCausalLM.from_pretrained(final)
    ref = AutoModelForCausalLM.from_pretrained(workdir / "llama")
    tok = AutoTokenizer.from_pretrained(final)
    losses, margins = [], []
    for row in rows:
        x = tok(row["prompt"])["input_ids"]
        h = 0.0
        for key, sign in (("chosen", 1), ("rejected", -1)):
            y = tok(row[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            h += sign * float(reference_token_logps(policy, x, y)[0].sum()
                              - reference_token_logps(ref, x, y)[0].sum())
        losses.append(-math.log(_sigmoid(0.5 * h)))
        margins.append(0.5 * h)
    assert metrics["loss"] == pytest.approx(sum(losses) / 2, abs=2e-5)
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / 2, abs=2e-5)


# ---------------------------------------------------------------------------------------------
# The demo's whole-space measure against brute force over every sequence the model can emit.

@pytest.fixture(scope="module", params=[3, 4], ids=["limit-3", "limit-4"])
def whole_space(request):
    from dpokit.demo.measure import build_space, score_completions, score_space
    from dpokit.demo.task import DemoTask, build_word_tokenizer
    from dpokit.fixtures import tiny_causal_lm

    task = DemoTask(prompts=("go", "stop now"), words=("a", "b"), length=2,
                    reward="token_score")
    tokenizer = build_word_tokenizer(task)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    models = [tiny_causal_lm("llama", vocab_size=vocab, hidden_size=16, num_layers=1,
                             num_heads=2, max_positions=32, seed=seed) for seed in (11, 12)]
    for model, scale in zip(models, (6.0, 3.0), strict=True):
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    limit = request.param  # max_new_tokens: T + 1 (the least that reaches S) and T + 2
    others = [t for t in range(vocab) if t != eos]
    everything = [[eos]]  # EOS only last, or `limit` tokens without EOS
    for n in range(1, limit):
        everything += [[*body, eos] for body in itertools.product(others, repeat=n)]
    everything += [list(body) for body in itertools.product(others, repeat=limit)]
    space = build_space(task, tokenizer)
    exact = {}
    for i, prompt in enumerate(task.prompts):
        x = tokenizer(prompt)["input_ids"]
        exact[i] = [score_completions(m, x, everything) for m in models]
    return (task, tokenizer, models, everything, space, exact,
            [score_space(m, space) for m in models], limit)


def test_the_whole_space_measure_equals_brute_force(whole_space):
    """full_space_measure's KL(π_ref‖π*), the exact lower bound of KL(π_θ‖π*) (lumped outside),
    the masses in S, equal float64 brute force over every sequence the model can emit (up to
    max_new_tokens with EOS only last, and the ones cut there without EOS), r = the task's on S and
    r_invalid elsewhere — the outside mass accounted for, not renormalised away; the estimate's
    95% interval covers the exact KL, and the mean's interval is the per-prompt half-widths
    combined; the sampled share in S is the exact mass (binomial, 4.5σ)."""
    from dpokit.demo.measure import full_space_measure

    task, tokenizer, (policy, ref), everything, space, exact, (pol_s, ref_s), limit = whole_space
    beta, r_invalid, n = 0.8, -3.0, 4000
    eos = tokenizer.eos_token_id
    words = tokenizer.convert_tokens_to_ids(list(task.words))
    got = full_space_measure(policy, ref, space, tokenizer, beta, policy_space_logps=pol_s,
                             ref_space_logps=ref_s, r_invalid=r_invalid, num_samples=n,
                             max_new_tokens=limit, seed=5)
    per = got["per_prompt"]
    exact_kl = []
    for i in range(len(task.prompts)):
        lp, lr = exact[i]
        assert float(torch.logsumexp(lp, 0).exp()) == pytest.approx(1.0, abs=1e-5)
        rewards = torch.full((len(everything),), r_invalid, dtype=torch.float64)
        in_s = torch.zeros(len(everything), dtype=torch.bool)
        for j, c in enumerate(everything):
            if len(c) == task.length + 1 and c[-1] == eos and all(t in words for t in c[:-1]):
                in_s[j] = True
                idx = torch.tensor([[words.index(t) for t in c[:-1]]])
                rewards[j] = float(task.rewards(i, idx)[0])
        assert int(in_s.sum()) == task.num_outcomes
        optimal = lr + rewards / beta
        optimal = optimal - torch.logsumexp(optimal, 0)
        kl_ref = float((lr.exp() * (lr - optimal)).sum())
        kl_pol = float((lp.exp() * (lp - optimal)).sum())
        m, m_opt = float(lp.exp()[~in_s].sum()), float(optimal.exp()[~in_s].sum())
        lumped = float((lp.exp() * (lp - optimal))[in_s].sum()) + m * math.log(m / m_opt)
        assert per["kl_ref_to_optimal"][i] == pytest.approx(kl_ref, abs=1e-5)
        assert per["kl_policy_to_optimal_lower_bound"][i] == pytest.approx(lumped, abs=1e-5)
        assert per["kl_policy_to_optimal_lower_bound"][i] <= kl_pol + 1e-6
        assert per["mass_in_space_policy"][i] == pytest.approx(1 - m, abs=1e-5)
        assert per["mass_in_space_optimal"][i] == pytest.approx(1 - m_opt, abs=1e-5)
        assert math.exp(per["log_mass_outside_table"][i]) == pytest.approx(m, abs=1e-5)
        low, high = per["kl_policy_to_optimal_ci"][i]
        assert low <= kl_pol <= high, (low, kl_pol, high)
        mass = 1 - m
        assert abs(per["sampled_in_space"][i] - mass) <= 4.5 * math.sqrt(mass * (1 - mass) / n)
        exact_kl.append(kl_pol)
    assert m > 0.05  # the outside matters here
    low, high = got["kl_policy_to_optimal_ci"]
    assert low <= sum(exact_kl) / len(exact_kl) <= high
    half = math.sqrt(sum((h - e) ** 2 for (_, h), e in zip(
        per["kl_policy_to_optimal_ci"], per["kl_policy_to_optimal_estimate"],
        strict=True))) / len(exact_kl)
    assert high - got["kl_policy_to_optimal_estimate"] == pytest.approx(half, rel=1e-9)
    assert got["closed_fraction_at_most"] == pytest.approx(
        1 - got["kl_policy_to_optimal_lower_bound"] / got["kl_ref_to_optimal"], rel=1e-12)


COLUMNS_REWARD = '''
import json

LOG = {log!r}


def with_answer(prompts, completions, answer, trainer_state, **kwargs):
    with open(LOG, "a") as f:
        f.write(json.dumps({{"prompts": list(prompts), "answer": list(answer),
                            "step": trainer_state.global_step,
                            "keys": sorted(kwargs)}}) + "\\n")
    return [float(a == "yes") - len(c) / 100 for c, a in zip(completions, answer)]
'''


def test_a_rows_other_columns_reach_the_reward_as_trl_passes_them(workdir, tmp_path):
    """TRL passes a data set's other columns to a reward function as keywords, a value per
    completion, and ``trainer_state``; dpokit passed only prompts, completions and
    completion_ids (``answer`` was a TypeError, ``kwargs["trainer_state"]`` a KeyError).
    Oracle: each completion's ``answer`` is its own prompt row's, and ``global_step`` counts
    the optimizer steps done."""
    rows = [{"prompt": p, "answer": a, "level": i} for i, (p, a) in
            enumerate([("the cat", "yes"), ("a dog", "no"), ("the sky", "yes"), ("sun", "no")])]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    log = tmp_path / "calls.jsonl"
    (tmp_path / "answers.py").write_text(COLUMNS_REWARD.format(log=str(log)))
    train(online(workdir, tmp_path / "run", tmp_path / "answers.py", data=str(data),
                 reward=f"{tmp_path / 'answers.py'}:with_answer", batch_size=2,
                 num_generations=2, max_steps=2, max_new_tokens=3), progress=False)
    calls = _calls(log)
    by_prompt = {r["prompt"]: r["answer"] for r in rows}
    assert [c["step"] for c in calls] == [0, 1]
    for call in calls:
        assert len(call["answer"]) == len(call["prompts"]) == 4  # 2 prompts × 2 generations
        assert call["answer"] == [by_prompt[p] for p in call["prompts"]]
        assert call["keys"] == ["completion_ids", "level"]  # the other columns, by **kwargs
