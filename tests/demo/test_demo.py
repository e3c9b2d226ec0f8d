"""The demo's claims, checked: DPO closes the distance to the exact π*, and the exact
identities of docs/theory.md hold on its measurements."""

import itertools
import json
import math

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


def test_quick_demo_closes_the_distance_to_the_optimum(quick):
    """--quick's bar: KL(π_θ‖π*) ≤ 0.25 · KL(π_ref‖π*) (the full demo's is 0.1)."""
    _, r = quick
    assert r["kl_policy_to_optimal"] <= 0.25 * r["kl_ref_to_optimal"]
    assert r["passed"] and r["closed_fraction"] >= 0.75
    assert r["reward_ref"] < r["reward_policy"]
    assert r["implicit_reward_correlation"] > 0.8
    history = r["runs"][0]["history"]
    assert history[0]["step"] == 0 and history[-1]["kl_policy_to_optimal"] < 0.5 * history[0][
        "kl_policy_to_optimal"]


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
    for name in ("kl_to_optimal.png", "distribution.png", "implicit_reward.png", "frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "The bar is met" in text and f"{r['kl_policy_to_optimal']:.4f}" in text
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
])
def test_demo_cli_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, "demo", "--quick", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_full_demo_meets_the_bar(tmp_path):
    """The default demo (what `make demo` runs): KL(π_θ‖π*) ≤ 0.1 · KL(π_ref‖π*)."""
    r = run_demo(DemoConfig(out_dir=str(tmp_path)), report=lambda line: None)
    assert r["kl_policy_to_optimal"] <= 0.1 * r["kl_ref_to_optimal"]
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
    full, beta = r["full_space"], r["beta"]
    n = full["num_samples"]
    per = full["per_prompt"]
    for sampled, mass in zip(per["sampled_in_space"], per["mass_in_space_policy"], strict=True):
        assert abs(sampled - mass) <= 4 * math.sqrt(mass * (1 - mass) / n) + 1e-9
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
    assert full["closed_fraction_lower_bound"] < 0 < r["closed_fraction"]
    assert "On the model's whole output space" in (out / "report.md").read_text()
