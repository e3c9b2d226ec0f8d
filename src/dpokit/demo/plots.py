"""The demo's figures, drawn from its exact measurements."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from dpokit.lecture.figures import BLUE, GREEN, GREY, RED, save_figure
from dpokit.theory import optimal_policy


def _kl_history(result: dict, runs: list[dict]) -> Figure:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, mass = fig.subplots(1, 2, width_ratios=[3, 2])
    for run in runs:
        steps = [h["step"] for h in run["history"]]
        ax.semilogy(steps, [max(h["kl_policy_to_optimal"], 1e-5) for h in run["history"]], "o-",
                    label=f"KL(π_θ ‖ π*), β = {run['beta']:g}")
        mass.plot(steps, [h["mass_in_space"] for h in run["history"]], "o-",
                  label=f"β = {run['beta']:g}")
    first = runs[0]["history"][0]["kl_ref_to_optimal"]
    ax.axhline(first, color=RED, ls="--", lw=1, label="KL(π_ref ‖ π*) — where DPO starts")
    ax.axhline((1 - result["target_closed_fraction"]) * first, color=GREY, ls=":", lw=1,
               label=f"{1 - result['target_closed_fraction']:.0%} of it — the bar")
    ax.set(title="DPO moves the policy to π* = π_ref·exp(r/β)/Z (measured exactly)",
           xlabel="optimizer step", ylabel="KL (nats), mean over prompts")
    ax.legend(fontsize=8)
    mass.set(title="Probability π_θ keeps on the enumerated space", xlabel="optimizer step",
             ylabel="mass of the V^T completions", ylim=(0, 1.05))
    mass.legend(fontsize=8)
    return fig


def _distribution(result, task, space, ref_logps, run) -> Figure:
    beta = run["beta"]
    optimal = optimal_policy(ref_logps[0], space.rewards[0], beta).exp()
    order = torch.argsort(optimal, descending=True)[:30]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax = fig.subplots()
    x = torch.arange(len(order)).numpy()
    ax.bar(x - 0.27, ref_logps[0].exp()[order].numpy(), 0.27, color=RED, label="π_ref")
    ax.bar(x, run["policy_logps"][0].exp()[order].numpy(), 0.27, color=BLUE, label="π_θ (DPO)")
    ax.bar(x + 0.27, optimal[order].numpy(), 0.27, color=GREEN, label="π* (exact)")
    labels = [t.strip() for t in task.text(space.completions[order])]
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set(title=f"Prompt '{task.prompts[0]}': the 30 most likely completions under π* "
                 f"(β = {beta:g})", ylabel="probability")
    ax.legend(fontsize=8)
    return fig


def _implicit_reward(space, ref_logps, run) -> Figure:
    beta = run["beta"]
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    implicit = beta * (run["policy_logps"] - ref_logps)
    weights = optimal_policy(ref_logps, space.rewards, beta).exp()
    for i in range(len(space.rewards)):
        offset = float((weights[i] * (space.rewards[i] - implicit[i])).sum())
        ax.scatter(space.rewards[i].numpy(), (implicit[i] + offset).numpy(), s=4, alpha=0.4,
                   label=f"prompt {i}")
    low, high = float(space.rewards.min()), float(space.rewards.max())
    ax.plot([low, high], [low, high], color="black", lw=1, label="r̂ + c(x) = r")
    ax.set(title="Implicit reward β·log(π_θ/π_ref) recovers r\nup to a per-prompt constant",
           xlabel="true reward r(x, y)", ylabel="implicit reward + fitted offset c(x)")
    ax.legend(fontsize=7, markerscale=3)
    return fig


def _frontier(result, runs) -> Figure:
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    kl = [p["kl_to_ref"] for p in result["frontier"]]
    reward = [p["reward"] for p in result["frontier"]]
    ax.plot(kl, reward, color=GREEN, lw=2, label="π*_β for every β (exact frontier)")
    for run in runs:
        final = run["final"]
        ax.plot(final["kl_policy_to_ref"], final["reward_policy"], "o", color=BLUE, ms=8)
        ax.annotate(f"DPO β={run['beta']:g}", (final["kl_policy_to_ref"],
                                                 final["reward_policy"]), fontsize=8,
                    xytext=(5, -10), textcoords="offset points")
    best = result["best_of_n"]
    ax.plot(best["kl_to_ref"], best["reward"], "s", color=RED, ms=7,
            label=f"best-of-{best['n']} (matched KL)")
    ax.set(title="Reward against KL to π_ref: DPO lands on the frontier of π*",
           xlabel="KL(π ‖ π_ref) (nats)", ylabel="expected reward E_π[r]")
    ax.legend(fontsize=8)
    return fig


def write_demo_plots(out: Path, result, task, space, ref_logps, runs) -> list[str]:
    figures = {
        "kl_to_optimal.png": _kl_history(result, runs),
        "distribution.png": _distribution(result, task, space, ref_logps, runs[0]),
        "implicit_reward.png": _implicit_reward(space, ref_logps, runs[0]),
        "frontier.png": _frontier(result, runs),
    }
    for name, fig in figures.items():
        save_figure(fig, out / name)
    return list(figures)
