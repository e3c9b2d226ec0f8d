"""The demo's claims, checked: DPO closes the distance to the exact π*, and the exact
identities of docs/theory.md hold on its measurements."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from dpokit.demo.measure import best_of_n, measure
from dpokit.demo.run import DemoConfig, run_demo
from dpokit.demo.task import DemoTask
from dpokit.errors import DpokitError
from dpokit.theory import kl_divergence
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoConfig(quick=True, out_dir=str(out)), report=lambda line: None)


def _method(r, name):
    return next(m for m in r["methods"] if m["name"] == name)


def test_quick_demo_on_policy_reaches_the_optimum_where_offline_dpo_does_not(quick):
    """--quick's bar (the full demo's is 97% / 99%): on the whole output space, on-policy DPO
    with soft labels closes at least 85% of KL(π_ref‖π*) (from the 95% interval's high end of
    KL(π_θ‖π*), the conservative end) with ≥ 97% of generate
    samples in the task's space; offline DPO on the same budget closes the renormalised
    distance (the lecture's claim, ≥ 75%) but ends farther from π* than π_ref on the whole
    space (likelihood displacement)."""
    _, r = quick
    assert [m["name"] for m in r["methods"]] == ["dpo", "online-soft"]
    online, offline = _method(r, "online-soft"), _method(r, "dpo")
    assert r["default_method"] == "online-soft" and r["passed"]
    assert r["full_space"] == online["full_space"]
    assert online["full_space"]["closed_fraction_at_least"] >= 0.85
    assert online["full_space"]["sampled_in_space"] >= 0.97
    assert offline["final"]["closed_fraction"] >= 0.75
    assert offline["full_space"]["closed_fraction_at_most"] < 0
    assert offline["full_space"]["sampled_in_space"] < 0.5
    for m in (online, offline):  # at least ≤ estimate ≤ at most (the exact KL lower bound's)
        full = m["full_space"]
        assert (full["closed_fraction_at_least"] <= full["closed_fraction_estimate"]
                <= full["closed_fraction_at_most"])
    # The same budget of labelled pairs (offline drops identical draws).
    assert abs(online["pairs"] - offline["pairs"]) <= 0.05 * offline["pairs"]
    assert r["reward_ref"] < r["reward_policy"]
    assert r["implicit_reward_correlation"] > 0.8
    for m in (online, offline):
        history = m["history"]
        assert history[0]["step"] == 0 and history[-1]["step"] == m["steps"]
        assert history[-1]["kl_policy_to_optimal"] < 0.5 * history[0]["kl_policy_to_optimal"]
    # The probes' exact whole-space bound equals the final measurement's.
    assert online["history"][-1]["kl_policy_to_optimal_full_lower_bound"] == pytest.approx(
        online["full_space"]["kl_policy_to_optimal_lower_bound"], rel=1e-9)


def test_the_on_policy_run_is_an_ordinary_training_run(quick):
    """What the demo trained on-policy is `dpokit train --online` with the reward file it wrote:
    config.yaml names it, and the file's reward scores generated text as the space does."""
    import yaml

    from dpokit.rewards import load_reward

    out, r = quick
    saved = yaml.safe_load((out / "online-soft" / "config.yaml").read_text())
    assert saved["online"] is True and saved["label"] == "soft"
    assert saved["reward"] == r["task"]["reward_function"] == f"{out / 'reward.py'}:reward"
    reward = load_reward(saved["reward"])
    task = DemoTask(reward=r["task"]["reward"], seed=r["config"]["seed"])
    from dpokit.demo.task import build_word_tokenizer

    tokenizer = build_word_tokenizer(task)
    eos = tokenizer.eos_token_id
    words = task.all_completions()[[0, 7, 300]]
    texts = task.text(words)
    ids = [[*tokenizer.convert_tokens_to_ids([task.words[w] for w in row]), eos]
           for row in words.tolist()]
    expected = task.rewards(1, words).tolist()
    prompts = [task.prompts[1]] * 3
    assert reward(prompts, texts, completion_ids=ids) == pytest.approx(expected, abs=1e-12)
    r_invalid = r["task"]["r_invalid"]
    assert r_invalid == pytest.approx(min(min(task.rewards(i, task.all_completions()).tolist())
                                          for i in range(4)) - 1.0)
    bad = [(texts[0], ids[0][:-1]),                      # cut: no EOS
           (texts[0] + " red", ids[0][:-1] + ids[1][:1] + [eos]),  # 4 words
           (" red fence", [*ids[0][:1], tokenizer.convert_tokens_to_ids("fence"), eos]),
           ("", [eos])]
    assert reward([prompts[0]] * 4, [t for t, _ in bad],
                  completion_ids=[i for _, i in bad]) == [r_invalid] * 4


def test_objective_gap_is_exactly_beta_times_kl(quick):
    """J(π_θ) = β log Z − β KL(π_θ‖π*), per prompt, on the trained model (float64, 1e-9)."""
    _, r = quick
    per = r["per_prompt"]
    for objective, best, kl in zip(per["objective_policy"], per["max_objective"],
                                   per["kl_policy_to_optimal"], strict=True):
        assert best - objective == pytest.approx(r["beta"] * kl, abs=1e-9)


def test_report_files(quick):
    out, r = quick
    saved = json.loads((out / "report.json").read_text())
    for key in ("kl_ref_to_optimal", "kl_policy_to_optimal", "kl_policy_to_ref", "reward_ref",
                "reward_policy", "reward_optimal", "runs", "frontier", "best_of_n",
                "rejection_sampling"):
        assert key in saved
    assert saved["kl_policy_to_optimal"] == r["kl_policy_to_optimal"]
    # Undefined numbers are null: at step 0 π_θ = π_ref, its implicit reward is constant.
    assert saved["methods"][0]["history"][0]["implicit_reward_correlation"] is None
    for name in ("kl_to_optimal.png", "distribution.png", "implicit_reward.png", "frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "The bar is met" in text and f"{r['kl_policy_to_optimal']:.4f}" in text
    for key in ("ref_model_dir", "policy_model_dir", "full_space", "methods"):
        assert key in saved
    assert saved["policy_model_dir"] == _method(r, "online-soft")["model_dir"]
    for m in saved["methods"]:
        assert {"name", "model_dir", "full_space"} <= set(m)
        assert {"kl_ref_to_optimal", "kl_policy_to_optimal_lower_bound",
                "kl_policy_to_optimal_estimate", "kl_policy_to_optimal_ci", "sampled_in_space",
                "r_invalid"} <= set(m["full_space"])
        assert (Path(m["model_dir"]) / "config.json").is_file()
        assert f"| {m['name']} |" in text
    assert "NaN" not in (out / "report.json").read_text()
    rows = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert len(rows) == r["data"]["pairs"] and all(x["chosen"] != x["rejected"] for x in rows)


def test_rejection_sampling_and_frontier(quick):
    _, r = quick
    rej = r["rejection_sampling"]
    rate, n = rej["expected_acceptance_rate"], rej["num_samples"] / rej["acceptance_rate"]
    assert abs(rej["acceptance_rate"] - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    assert rej["sample_mean_reward"] == pytest.approx(rej["exact_reward_optimal"], abs=0.15)
    kls = [p["kl_to_ref"] for p in r["frontier"]]
    rewards = [p["reward"] for p in r["frontier"]]
    # Larger β: closer to π_ref, lower reward — the frontier is monotone.
    assert all(a >= b for a, b in itertools.pairwise(kls))
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(rewards))


def test_measure_at_the_optimum_by_construction():
    """Feeding π* itself: KL 0, J = β log Z, implicit reward = r − β log Z exactly."""
    from dpokit.theory import optimal_policy

    generator = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 20, generator=generator, dtype=torch.float64).log_softmax(-1)
    rewards = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    result = measure(optimal_policy(ref, rewards, 0.7), ref, rewards, 0.7)
    assert result["kl_policy_to_optimal"] == pytest.approx(0.0, abs=1e-12)
    assert result["objective_policy"] == pytest.approx(result["max_objective"], abs=1e-12)
    assert result["implicit_offset"] == pytest.approx(result["max_objective"], abs=1e-12)
    assert result["implicit_reward_correlation"] == pytest.approx(1.0, abs=1e-12)


def test_best_of_n_by_brute_force():
    """Exact best-of-n distribution against enumerating all n-tuples (n = 3, 4 outcomes)."""
    import itertools

    ref = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0]], dtype=torch.float64)  # a tie
    expected = torch.zeros(4, dtype=torch.float64)
    for draw in itertools.product(range(4), repeat=3):
        p = math.prod(float(ref[0, i]) for i in draw)
        best = max(float(rewards[0, i]) for i in draw)
        winners = [i for i in draw if float(rewards[0, i]) == best]
        for i in winners:  # ties broken uniformly among the drawn winners
            expected[i] += p / len(winners)
    got = best_of_n(ref.log(), rewards, 3).exp()[0]
    # Ties split ∝ π_ref, which equals the uniform-among-draws rule in expectation.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float(kl_divergence(best_of_n(ref.log(), rewards, 1), ref.log())) == pytest.approx(
        0.0, abs=1e-12)


def test_custom_reward_callable_and_bad_rewards():
    task = DemoTask(reward=lambda i, words: words[:, 0].double())
    completions = task.all_completions()
    assert completions.shape == (512, 3)
    assert task.rewards(0, completions[:5]).tolist() == [0.0] * 5
    with pytest.raises(DpokitError, match="unknown reward"):
        DemoTask(reward="vibes")
    with pytest.raises(DpokitError, match="finite values"):
        DemoTask(reward=lambda i, w: torch.full((len(w),), float("nan"))).rewards(0, completions)


@pytest.mark.parametrize(("argv", "message"), [
    (["--reward", "vibes"], "reward must be one of"),
    (["--loss-type", "simpo"], "reference-free"),
    (["--beta", "0"], "beta must be a finite number > 0"),
    (["--methods", "rpo,vibes"], "methods: unknown vibes; known: dpo, online-soft, rpo"),
])
def test_demo_cli_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, "demo", "--quick", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_full_demo_meets_the_bar(tmp_path):
    """The default demo (what `make demo` runs): on-policy DPO closes ≥ 97% of the whole-space
    KL(π_ref‖π*) with ≥ 99% of samples in the task's space, within 5 minutes."""
    r = run_demo(DemoConfig(out_dir=str(tmp_path)), report=lambda line: None)
    assert r["passed"]
    assert r["full_space"]["closed_fraction_at_least"] >= 0.97
    assert r["full_space"]["sampled_in_space"] >= 0.99
    assert r["seconds"] < 300


def test_demo_reads_yaml_and_quick_fills_only_unset_settings(tmp_path, capsys):
    """`dpokit demo --config` takes the same keys as its flags; quick changes only the
    settings left null (a value given explicitly stays)."""
    from dpokit.config import load_config
    from dpokit.demo.run import FULL, QUICK

    cfg = tmp_path / "demo.yaml"
    cfg.write_text("reward: vibes\n")
    code, _, err = run_cli(capsys, "demo", "--config", str(cfg))
    assert code == 2 and "reward must be one of" in err and err.count("\n") == 1
    cfg.write_text("quick: true\npairs_per_prompt: 123\nbetas: [0.5, 2]\n")
    config = load_config(DemoConfig, cfg, {"seed": "3"})
    assert config.pairs_per_prompt == 123 and config.betas == [0.5, 2.0] and config.seed == 3
    assert config.probes == QUICK["probes"] and config.sft_epochs == QUICK["sft_epochs"]
    assert DemoConfig().probes == FULL["probes"] and DemoConfig(quick=True).probes == 6


def test_full_space_measurement(quick):
    """On the model's whole output space: (1) the share of real `generate` samples in the task's
    space agrees with the exact mass there (binomial, 4σ); (2) KL(π_ref‖π*) obeys the identity
    KL = log Z − J(π_ref)/β with J(π_ref) = E_π_ref[r] (r = r_invalid outside; float64, 1e-9);
    (3) lower bound ≤ interval, and the bound is what offline DPO's likelihood displacement
    makes it: far above KL(π_ref‖π*)."""
    out, r = quick
    full, beta = _method(r, "dpo")["full_space"], r["beta"]
    for m in r["methods"]:
        n, per = m["full_space"]["num_samples"], m["full_space"]["per_prompt"]
        for sampled, mass in zip(per["sampled_in_space"], per["mass_in_space_policy"],
                                 strict=True):
            assert abs(sampled - mass) <= 4 * math.sqrt(mass * (1 - mass) / n) + 1e-9
        # The exact sampler's outside mass is the enumeration's 1 − π_θ(S) (1e-6: the float32
        # forward's rounding of π_θ(S)).
        assert [math.exp(x) for x in per["log_mass_outside_table"]] == pytest.approx(
            [1 - x for x in per["mass_in_space_policy"]], abs=1e-6)
    per = full["per_prompt"]
    from dpokit.demo.measure import build_space, score_space
    from dpokit.demo.task import DemoTask, build_word_tokenizer
    from dpokit.models import load_causal_lm

    task = DemoTask(reward=r["task"]["reward"], seed=r["config"]["seed"])
    space = build_space(task, build_word_tokenizer(task))
    ref_in = score_space(load_causal_lm(r["ref_model_dir"]), space)
    mass_in = ref_in.exp().sum(-1)
    log_z = torch.log((ref_in.exp() * torch.exp(space.rewards / beta)).sum(-1)
                      + (1 - mass_in) * math.exp(full["r_invalid"] / beta))
    objective = (ref_in.exp() * space.rewards).sum(-1) + (1 - mass_in) * full["r_invalid"]
    expected = (log_z - objective / beta).tolist()
    assert per["kl_ref_to_optimal"] == pytest.approx(expected, abs=1e-9)
    low, high = full["kl_policy_to_optimal_ci"]
    assert full["kl_policy_to_optimal_lower_bound"] <= low <= high
    assert full["kl_policy_to_optimal_lower_bound"] > full["kl_ref_to_optimal"]
    assert full["closed_fraction_at_most"] < 0 < _method(r, "dpo")["final"]["closed_fraction"]
    assert "on the model's whole output space" in (out / "report.md").read_text()


def test_added_methods_run_on_the_same_budget(tmp_path):
    """--methods adds rpo, dpop and online-hard after the two the demo always runs, each an
    ordinary run with its own loss or labels; the anchored offline losses keep far more of
    their mass on the task's space than plain offline DPO (likelihood displacement, docs/theory.md
    §6). A small budget: this checks the wiring and the direction, not the bar."""
    import yaml

    r = run_demo(DemoConfig(quick=True, out_dir=str(tmp_path), methods=["rpo", "dpop",
                            "online-hard", "rpo"], sft_samples_per_prompt=300,
                            pairs_per_prompt=300, probes=2, full_space_samples=200),
                 report=lambda line: None)
    names = [m["name"] for m in r["methods"]]
    assert names == ["dpo", "online-soft", "rpo", "dpop", "online-hard"]
    config = {n: yaml.safe_load((tmp_path / n / "config.yaml").read_text()) for n in names}
    assert config["rpo"]["rpo_alpha"] == 1.0 and config["dpop"]["loss_type"] == ["dpop"]
    assert config["online-hard"]["label"] == "hard" and config["online-hard"]["online"]
    assert config["dpo"]["loss_type"] == ["sigmoid"] and not config["dpo"]["rpo_alpha"]
    mass = {m["name"]: m["full_space"]["mass_in_space_policy"] for m in r["methods"]}
    assert mass["rpo"] > mass["dpo"] + 0.2 and mass["dpop"] > mass["dpo"] + 0.2
    text = (tmp_path / "report.md").read_text()
    assert all(f"| {n} |" in text for n in names)
