"""Review of dpokit.lecture and dpokit.demo: every number checked against an independent float64
oracle (brute-force enumeration, closed forms), and the degenerate inputs that must give a
one-line DpokitError instead of NaN or a traceback."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from dpokit.errors import DpokitError


def constant_reward(prompt_index, words):
    """A module-level (importable) reward that tells no completion apart."""
    return torch.zeros(len(words), dtype=torch.float64)


def first_word_reward(prompt_index, words):
    """A module-level (importable) custom reward: the first word's index, plus the prompt's."""
    return words[:, 0].double() + prompt_index


# ----------------------------------------------------------------------------- lecture


def _bar_heights(ax):
    return [p.get_height() for p in ax.patches]


def test_worked_example_figure_bars_are_the_float64_pi_star():
    """Each panel's bars: π_ref, exp(r/β)/Σ exp(r/β) and π* = π_ref·e^{r/β}/Z, recomputed here
    in float64 (1e-12). A zero-probability outcome with a huge reward at tiny β (r/β = inf for
    it) used to give NaN bars (inf − inf); its weight bar is 1 and its π* bar 0."""
    from dpokit.lecture.figures import worked_example_figure
    from dpokit.lecture.outcomes import WORKED_EXAMPLE, Outcome

    betas = (0.5, 1.0, 20.0)
    fig = worked_example_figure(WORKED_EXAMPLE, betas)
    ref = np.array([o.ref_prob for o in WORKED_EXAMPLE])
    rewards = np.array([o.reward for o in WORKED_EXAMPLE])
    for ax, beta in zip(fig.axes[:len(betas)], betas, strict=True):
        heights = np.array(_bar_heights(ax)).reshape(3, -1)
        weights = np.exp(rewards / beta)
        optimal = ref * weights / (ref * weights).sum()
        np.testing.assert_allclose(heights[0], ref, rtol=1e-12)
        np.testing.assert_allclose(heights[1], weights / weights.sum(), rtol=1e-12)
        np.testing.assert_allclose(heights[2], optimal, rtol=1e-12)

    table = (Outcome("a", 0.5, 0.0), Outcome("b", 0.5, 1.0), Outcome("c", 0.0, 1e300))
    fig = worked_example_figure(table, (1e-10,))
    heights = np.array(_bar_heights(fig.axes[0])).reshape(3, -1)
    assert np.isfinite(heights).all()
    np.testing.assert_array_equal(heights[1], [0.0, 0.0, 1.0])  # e^{r/β} of c dominates
    np.testing.assert_array_equal(heights[2], [0.0, 1.0, 0.0])  # π*: b, the best in support


def test_gaussian_figure_is_the_closed_form_and_labels_its_variance():
    """The right panel's curve is KL(N(μ,σ²)‖N(0,σ²)) = μ²/(2σ²) (1e-12), the dots the
    trapezoid integral (1e-6); the legend names the variance actually drawn (it said N(0, 1)
    whatever σ)."""
    from dpokit.lecture.figures import gaussian_kl_figure

    sigma = 2.0
    fig = gaussian_kl_figure((-4.0, 0.0), sigma=sigma)
    left, right = fig.axes[:2]
    curve, dots = right.lines[0], right.lines[1]
    means = curve.get_xdata()
    np.testing.assert_allclose(curve.get_ydata(), means**2 / (2 * sigma**2), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(dots.get_ydata(), dots.get_xdata()**2 / (2 * sigma**2),
                               atol=1e-6)
    labels = [line.get_label() for line in left.lines]
    assert labels[0] == "π* = N(0, 4)" and labels[1].startswith("π_ref = N(-4, 4): KL = 2")


def test_partition_study_against_brute_force():
    """log Z of the built-in space by enumerating V^T sequences in float64 (1e-12) equals both
    exact routes and the study's exact column; over 400 repeats the 95% interval's coverage is
    within 4σ of 0.95 at β = 5, and RMSE ≥ |bias| at every (β, n)."""
    from dpokit.lecture.partition import builtin_space, exact_partitions, monte_carlo_study

    space = builtin_space(3, 4, seed=1)

    def brute(beta):
        terms = []
        for seq in itertools.product(range(3), repeat=4):
            logp = float(space.log_init[seq[0]]) + sum(float(space.log_trans[a, b])
                                                       for a, b in itertools.pairwise(seq))
            terms.append(logp + sum(float(space.token_rewards[t]) for t in seq) / beta)
        top = max(terms)
        return top + math.log(math.fsum(math.exp(t - top) for t in terms))

    betas = (5.0, 0.3)
    for exact in exact_partitions(space, betas):
        assert exact.enumerated == pytest.approx(brute(exact.beta), abs=1e-12)
        assert exact.recursion == pytest.approx(brute(exact.beta), abs=1e-12)
    rows = monte_carlo_study(space, betas, (1000,), repeats=400, seed=0)
    for row in rows:
        assert row.exact_log_partition == pytest.approx(brute(row.beta), abs=1e-12)
        assert row.rmse_log >= abs(row.mean_log_estimate - row.exact_log_partition) - 1e-15
        assert 1.0 <= row.mean_ess <= 1000.0
    wide = next(r for r in rows if r.beta == 5.0)
    assert abs(wide.coverage - 0.95) <= 4 * math.sqrt(0.95 * 0.05 / 400)


def test_one_outcome_and_a_zero_probability_outcome_solve_exactly():
    """A table of one outcome: π* = 1, log Z = r/β, KL 0, J = r at every β (relative 1e-12);
    an outcome with π_ref = 0 keeps π* = 0 whatever its reward; the JSON is strict (no NaN)."""
    from dpokit.lecture.outcomes import Outcome, solve, validate_outcomes

    for beta in (1e-6, 1.0, 1e6):
        s = solve(validate_outcomes([Outcome("only", 1.0, 3.0)]), beta)
        assert s.optimal_probs == (1.0,) and s.kl_optimal_ref == 0.0
        assert s.log_partition == pytest.approx(3.0 / beta, rel=1e-12)
        assert s.objective == pytest.approx(3.0, rel=1e-12)
        json.dumps(s.to_json(), allow_nan=False)
    table = validate_outcomes([Outcome("a", 0.25, 1.0), Outcome("b", 0.75, 0.0),
                               Outcome("never", 0.0, 50.0)])
    s = solve(table, 0.5)
    z = 0.25 * math.exp(2.0) + 0.75
    assert s.optimal_probs[2] == 0.0
    assert s.optimal_probs[:2] == pytest.approx((0.25 * math.exp(2.0) / z, 0.75 / z), rel=1e-12)
    assert s.log_partition == pytest.approx(math.log(z), rel=1e-12)


# -------------------------------------------------------------------------------- demo


def test_best_of_n_with_a_zero_probability_outcome():
    """Best-of-3 against enumerating all 4³ triples in float64: an outcome π_ref never draws has
    probability 0 (log −inf), so KL(best-of-n‖π_ref) is finite. The old floor of 1e-300 put mass
    there and made the KL infinite, so matched_best_of_n stopped at n = 1 with KL = inf."""
    from dpokit.demo.measure import best_of_n, matched_best_of_n

    ref = [0.5, 0.3, 0.2, 0.0]
    rewards = [1.0, 2.0, 0.0, 5.0]
    expected = [0.0] * 4
    for draw in itertools.product(range(4), repeat=3):
        p = math.prod(ref[i] for i in draw)
        expected[max(draw, key=lambda i: rewards[i])] += p
    ref_logps = torch.tensor([ref], dtype=torch.float64).log()
    reward_t = torch.tensor([rewards], dtype=torch.float64)
    got = best_of_n(ref_logps, reward_t, 3)
    torch.testing.assert_close(got.exp()[0], torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0.0)
    assert float(got[0, 3]) == -math.inf
    kl = math.fsum(p * math.log(p / q) for p, q in zip(expected, ref, strict=True) if p > 0)
    n, best = matched_best_of_n(ref_logps, reward_t, kl)
    assert n == 3 and best["kl_to_ref"] == pytest.approx(kl, rel=1e-12)


def test_measure_against_float64_definitions_and_degenerate_beta():
    """measure()'s per-prompt KLs, expected rewards, J and the implicit-reward offset recomputed
    from THEORY.md's definitions in float64 (1e-12); β so small that log π* underflows (KL(π_ref‖π*)
    = inf) is a DpokitError, not closed_fraction = NaN; equal rewards likewise."""
    from dpokit.demo.measure import measure

    gen = torch.Generator().manual_seed(3)
    policy = torch.randn(2, 9, generator=gen, dtype=torch.float64).log_softmax(-1)
    ref = torch.randn(2, 9, generator=gen, dtype=torch.float64).log_softmax(-1)
    rewards = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    beta = 0.6
    got = measure(policy, ref, rewards, beta)
    for i in range(2):
        p, q, r = policy[i].exp().numpy(), ref[i].exp().numpy(), rewards[i].numpy()
        z = float((q * np.exp(r / beta)).sum())
        star = q * np.exp(r / beta) / z
        per = got["per_prompt"]
        assert per["kl_policy_to_optimal"][i] == pytest.approx((p * np.log(p / star)).sum(),
                                                               abs=1e-12)
        assert per["kl_ref_to_optimal"][i] == pytest.approx((q * np.log(q / star)).sum(),
                                                            abs=1e-12)
        assert per["reward_optimal"][i] == pytest.approx((star * r).sum(), abs=1e-12)
        objective = (p * r).sum() - beta * (p * np.log(p / q)).sum()
        assert per["objective_policy"][i] == pytest.approx(objective, abs=1e-12)
        assert per["max_objective"][i] == pytest.approx(beta * math.log(z), abs=1e-12)
        implicit = beta * np.log(p / q)
        assert per["implicit_offset"][i] == pytest.approx((star * (r - implicit)).sum(),
                                                          abs=1e-12)
        assert per["implicit_reward_correlation"][i] == pytest.approx(
            float(np.corrcoef(implicit, r)[0, 1]), abs=1e-12)
    closed = 1 - np.mean(got["per_prompt"]["kl_policy_to_optimal"]) / np.mean(
        got["per_prompt"]["kl_ref_to_optimal"])
    assert got["closed_fraction"] == pytest.approx(closed, abs=1e-12)
    with pytest.raises(DpokitError, match="underflows"):
        measure(policy, ref, rewards, 1e-310)
    with pytest.raises(DpokitError, match="no distance to close"):
        measure(policy, ref, torch.ones_like(rewards), beta)


def test_builtin_rewards_follow_the_task_vocabulary():
    """token_score spans −1.5..+1.5 over the task's own V words and match uses target
    (i+t)·3 mod V: with 10 words the old 8-entry table raised IndexError (a traceback), with 2
    it scored them −1.5 and −1.07."""
    from dpokit.demo.task import DemoTask

    words = tuple(f"w{k}" for k in range(10))
    task = DemoTask(words=words, length=2, prompts=("go", "stop"))
    completions = task.all_completions()
    score = [-1.5 + 3.0 * k / 9 for k in range(10)]
    expected = [score[a] + score[b] for a, b in completions.tolist()]
    assert task.rewards(0, completions).tolist() == pytest.approx(expected, abs=1e-12)
    two = DemoTask(words=("a", "b"), length=1)
    assert two.rewards(0, two.all_completions()).tolist() == pytest.approx([-1.5, 1.5])
    match = DemoTask(words=("a", "b", "c", "d", "e"), length=2, reward="match")
    got = match.rewards(1, match.all_completions()).tolist()
    target = [(1 * 3) % 5, (2 * 3) % 5]
    assert got == [2.0 * ((a == target[0]) + (b == target[1]))
                   for a, b in match.all_completions().tolist()]


@pytest.mark.parametrize(("words", "message"), [
    (("red", "red"), "distinct"),
    (("red", "light blue"), "without whitespace"),
    (("red", "</s>"), "without whitespace"),
    (("red", ""), "without whitespace"),
])
def test_task_words_must_be_single_distinct_tokens(words, message):
    """A repeated word would score one sequence twice; a word with a space is two tokens (the
    second scored as <unk>); '</s>' is the EOS: each silently wrong before, now refused."""
    from dpokit.demo.task import DemoTask

    with pytest.raises(DpokitError, match=message):
        DemoTask(words=words)


def test_custom_reward_round_trips_through_task_json(tmp_path):
    """A module-level custom reward is written to task.json as module:name and read back by
    the reward file on-policy training loads (it used to be refused outright, so run_demo with
    DemoTask(reward=my_fn), as the README offers, failed after SFT); a lambda is refused."""
    from dpokit.demo.reward import TaskReward, write_reward_file
    from dpokit.demo.task import DemoTask
    from dpokit.rewards import load_reward

    task = DemoTask(reward=first_word_reward, words=("a", "b", "c"), length=1,
                    prompts=("go", "stop"))
    spec = write_reward_file(tmp_path, TaskReward(task, eos_token_id=2, r_invalid=-7.0))
    saved = json.loads((tmp_path / "task.json").read_text())
    assert saved["reward"] == f"{__name__}:first_word_reward"
    reward = load_reward(spec)
    assert reward(["stop", "go", "go"], [" c", " a", " a b"],
                  completion_ids=[[6, 2], [4, 2], [4, 5, 2]]) == [3.0, 0.0, -7.0]
    with pytest.raises(DpokitError, match="module-level function"):
        TaskReward(DemoTask(reward=lambda i, w: w[:, 0].double()), eos_token_id=2,
                   r_invalid=0.0).settings()


@pytest.mark.parametrize(("task_kwargs", "config_kwargs", "message"), [
    ({"reward": constant_reward}, {}, "constant on every prompt"),
    ({"reward": lambda i, w: w[:, 0].double()}, {}, "module-level function"),
    ({}, {"max_new_tokens": 3}, "max_new_tokens = 3 cannot generate"),
    ({}, {"max_new_tokens": 80}, "passes the model's 64 positions"),
    ({}, {"full_space_samples": 1}, "full_space_samples must be ≥ 2"),
    ({}, {"r_invalid": math.nan}, "r_invalid must be a finite number"),
])
def test_run_demo_refuses_before_training(tmp_path, task_kwargs, config_kwargs, message):
    """What the demo cannot measure is refused before SFT starts (nothing trained, no run
    directory): before, a constant reward or a lambda reward failed only after SFT, and
    max_new_tokens ≤ length, one full-space sample or r_invalid = NaN ran to the end with NaN
    or inconsistent whole-space numbers (exit 0)."""
    from dpokit.demo.run import DemoConfig, run_demo
    from dpokit.demo.task import DemoTask

    config = DemoConfig(quick=True, out_dir=str(tmp_path / "demo"), **config_kwargs)
    with pytest.raises(DpokitError, match=message):
        run_demo(config, task=DemoTask(**task_kwargs), report=lambda line: None)
    assert not (tmp_path / "demo" / "sft").exists()
    assert not (tmp_path / "demo" / "base").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--full-space-samples", "1"], "full_space_samples must be ≥ 2"),
    (["--r-invalid", "inf"], "r_invalid must be a finite number"),
])
def test_demo_cli_refuses_a_degenerate_measurement(tmp_path, capsys, argv, message):
    """Exit 2 with one line, nothing written (before: with one sample the quick demo ended with
    exit 0 and 'closed at least nan%' in report.md; with r_invalid = inf it trained SFT and
    offline DPO, then stopped inside on-policy training)."""
    from tests.helpers import run_cli

    code, _, err = run_cli(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"), *argv)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "demo" / "sft").exists()


def test_distribution_plot_accounts_for_all_the_mass():
    """Each series of the 'what a sampler gets' bars sums to 1 (up to the 1e-6 floors): the 25
    top completions, the other task completions, and the outside. The old last bar, labelled
    'everything else', held only the outside mass and left out the other 487 completions."""
    from dpokit.demo.measure import build_space
    from dpokit.demo.plots import _distribution
    from dpokit.demo.task import DemoTask, build_word_tokenizer
    from dpokit.theory import optimal_policy

    task = DemoTask()
    space = build_space(task, build_word_tokenizer(task))
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 512, generator=gen, dtype=torch.float64).log_softmax(-1)
    policy = torch.randn(4, 512, generator=gen, dtype=torch.float64).log_softmax(-1)
    beta, ref_in, policy_in, optimal_in = 1.0, 0.9, 0.6, 0.97
    result = {"beta": beta, "data": {"ref_mass_in_space_per_prompt": [ref_in] * 4},
              "full_space": {"per_prompt": {"mass_in_space_optimal": [optimal_in] * 4}}}
    methods = [{"name": name, "policy_logps": policy,
                "full_space": {"per_prompt": {"mass_in_space_policy": [policy_in] * 4}}}
               for name in ("dpo", "online-soft")]
    fig = _distribution(result, task, space, ref, methods)
    heights = np.array(_bar_heights(fig.axes[0])).reshape(4, -1)
    assert heights.shape[1] == 27
    star = optimal_policy(ref[0], space.rewards[0], beta).exp()
    top = torch.argsort(star, descending=True)[:25]
    for row, (probs, inside) in zip(heights, [(ref[0].exp(), ref_in),
                                              (policy[0].exp(), policy_in),
                                              (policy[0].exp(), policy_in),
                                              (star, optimal_in)], strict=True):
        assert row.sum() == pytest.approx(1.0, abs=27e-6)
        assert row[-1] == pytest.approx(1 - inside, rel=1e-12)
        assert row[-2] == pytest.approx(inside * float(1 - probs[top].sum()), rel=1e-9)


def test_report_does_not_claim_what_the_bounds_do_not_show():
    """Offline DPO's whole-space standing in report.md: 'farther' only when even the most it
    can have closed is < 0, 'closer' only when even the least is > 0; between, neither (it
    used to say 'not farther from π* than π_ref' whenever the most was ≥ 0)."""
    from dpokit.demo.text import _whole_space_standing

    assert _whole_space_standing({"closed_fraction_at_most": -0.2,
                                  "closed_fraction_at_least": -0.5}).startswith("farther")
    assert _whole_space_standing({"closed_fraction_at_most": 0.9,
                                  "closed_fraction_at_least": 0.5}).startswith("closer")
    between = _whole_space_standing({"closed_fraction_at_most": 0.3,
                                     "closed_fraction_at_least": -0.4})
    assert between.startswith("not clearly") and "-40.0%" in between and "30.0%" in between


def test_full_space_measure_against_the_whole_output_space():
    """Two prompts, words a/b, length 1, max_new_tokens 3: every completion the model can emit
    (400 per prompt) scored by a plain float64 forward, so KL(π_θ‖π*) and KL(π_ref‖π*) on the
    whole space are exact. The reported KL(π_ref‖π*) equals it (1e-6, float32 forward), the
    lower bound is below KL(π_θ‖π*), closed_fraction_at_most ≥ the true fraction closed ≥
    closed_fraction_at_least (the bar's number really is a lower bound here), and the mean's
    interval contains the exact mean KL."""
    from dpokit.demo.measure import build_space, full_space_measure, score_space
    from dpokit.demo.task import DemoTask, build_word_tokenizer
    from dpokit.fixtures import tiny_causal_lm

    task = DemoTask(prompts=("go", "run"), words=("a", "b"), length=1, reward=first_word_reward)
    max_new, beta, r_invalid = 3, 0.7, -2.0
    tokenizer = build_word_tokenizer(task)
    policy, ref = (tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16,
                                  num_layers=1, num_heads=2, max_positions=16, seed=s)
                   for s in (1, 2))
    for model, scale in ((policy, 6.0), (ref, 3.0)):  # far from uniform, and from each other
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.eval()
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    others = [t for t in range(vocab) if t != eos]
    everything = [[eos]] + [[t, eos] for t in others]
    everything += [[*b, eos] for b in itertools.product(others, repeat=2)]
    everything += [list(b) for b in itertools.product(others, repeat=max_new)]
    word_ids = tokenizer.convert_tokens_to_ids(list(task.words))

    @torch.no_grad()
    def logp(model, prompt_ids, completion):
        logits = model(torch.tensor([prompt_ids + completion])).logits[0].double()
        steps = logits.log_softmax(-1)[len(prompt_ids) - 1:-1]
        return math.fsum(float(steps[k, t]) for k, t in enumerate(completion))

    space = build_space(task, tokenizer)
    got = full_space_measure(policy, ref, space, tokenizer, beta,
                             policy_space_logps=score_space(policy, space),
                             ref_space_logps=score_space(ref, space), r_invalid=r_invalid,
                             num_samples=2000, max_new_tokens=max_new, seed=0)
    kl_policy, kl_ref = [], []
    for i, prompt in enumerate(task.prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        lp = np.array([logp(policy, prompt_ids, c) for c in everything])
        lr = np.array([logp(ref, prompt_ids, c) for c in everything])
        assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-9)
        r = np.array([float(word_ids.index(c[0]) + i) if len(c) == 2 and c[0] in word_ids
                      and c[1] == eos else r_invalid for c in everything])
        log_star = lr + r / beta
        log_star -= np.logaddexp.reduce(log_star)
        kl_policy.append(float((np.exp(lp) * (lp - log_star)).sum()))
        kl_ref.append(float((np.exp(lr) * (lr - log_star)).sum()))
        assert got["per_prompt"]["kl_ref_to_optimal"][i] == pytest.approx(kl_ref[i], abs=1e-6)
        assert got["per_prompt"]["kl_policy_to_optimal_lower_bound"][i] <= kl_policy[i] + 1e-6
    truth = 1 - np.mean(kl_policy) / np.mean(kl_ref)
    assert got["closed_fraction_at_most"] >= truth - 1e-6
    assert got["closed_fraction_at_least"] <= truth
    low, high = got["kl_policy_to_optimal_ci"]
    assert low <= np.mean(kl_policy) <= high
    assert got["closed_fraction_at_least"] == pytest.approx(1 - high / got["kl_ref_to_optimal"],
                                                            rel=1e-12)
    assert got["closed_fraction_at_most"] > got["closed_fraction_at_least"] + 0.05  # not exact


@pytest.mark.parametrize("held", [["notes.txt", "prefs.jsonl"], ["sft/mine.txt"]])
def test_the_demo_writes_only_into_a_directory_of_its_own(tmp_path, held):
    """``dpokit demo --out ~`` deleted ``~/sft`` and ``~/dpo`` (start afresh) and wrote its
    prefs.jsonl, report.md, base/ over a user's files of those names. An --out that already
    holds anything but an earlier demo's output is refused before anything is written or
    deleted; a new, empty or earlier demo directory is used as before."""
    from dpokit.demo.run import DEMO_MARKER, DemoConfig, _check_demo_directory, run_demo

    out = tmp_path / "home"
    for name in held:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    config = DemoConfig(quick=True, out_dir=str(out))
    with pytest.raises(DpokitError, match="already holds files that are not the demo's"):
        run_demo(config, report=lambda line: None)
    for name in held:
        assert (out / name).read_text() == "the user's"
    assert not (out / "base").exists() and not (out / DEMO_MARKER).exists()
    for ok in (tmp_path / "new", tmp_path / "empty"):
        ok.mkdir()
        _check_demo_directory(ok)
    marked = tmp_path / "earlier"
    marked.mkdir()
    (marked / DEMO_MARKER).touch()
    (marked / "report.md").write_text("an earlier demo's")
    _check_demo_directory(marked)
