"""The demo's figures, drawn from its exact measurements."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from dpokit.lecture.figures import BLUE, GREEN, GREY, RED, save_figure
from dpokit.theory import optimal_policy

COLOURS = {"dpo": BLUE, "online-soft": GREEN, "rpo": "#9467bd", "dpop": "#8c564b",
           "online-hard": "#ff7f0e"}


def _kl_history(result: dict, methods: list[dict]) -> Figure:
    """Whole-space distance (solid) and renormalised distance (dashed) over training, per
    method; the mass each keeps on the task's space beside it."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax, mass = fig.subplots(1, 2, width_ratios=[3, 2])
    for m in methods:
        colour = COLOURS.get(m["name"], GREY)
        steps = [h["step"] for h in m["history"]]
        ax.semilogy(steps, [max(h["kl_policy_to_optimal_full_lower_bound"], 1e-5)
                            for h in m["history"]], "o-", color=colour, ms=3,
                    label=f"{m['name']}: whole output space (lower bound)")
        ax.semilogy(steps, [max(h["kl_policy_to_optimal"], 1e-5) for h in m["history"]], "--",
                    color=colour, lw=1, label=f"{m['name']}: renormalised on the task's space")
        mass.plot(steps, [h["mass_in_space"] for h in m["history"]], "o-", color=colour, ms=3,
                  label=m["name"])
    first = methods[0]["history"][0]["kl_ref_to_optimal_full"]
    ax.axhline(first, color=RED, ls=":", lw=1.2, label="KL(π_ref ‖ π*) — where training starts")
    ax.axhline((1 - result["target_closed_fraction"]) * first, color=GREY, ls=":", lw=1,
               label=f"{1 - result['target_closed_fraction']:.0%} of it — the bar")
    ax.set(title="Distance to π* = π_ref·exp(r/β)/Z during training (measured exactly)",
           xlabel="optimizer step", ylabel="KL(π_θ ‖ π*) (nats), mean over prompts")
    ax.legend(fontsize=7)
    mass.set(title="Probability π_θ keeps on the task's completions", xlabel="optimizer step",
             ylabel="π_θ(S)", ylim=(0, 1.05))
    mass.legend(fontsize=8)
    return fig


def _distribution(result, task, space, ref_logps, methods) -> Figure:
    """For one prompt, the probabilities a user samples (not renormalised): the 25 most likely
    completions under π*, then the rest of the task's completions as one bar and everything
    outside the task's space as another (each series' bars sum to 1)."""
    beta = result["beta"]
    mass_ref = result["data"]["ref_mass_in_space_per_prompt"][0]
    optimal = optimal_policy(ref_logps[0], space.rewards[0], beta).exp()
    optimal_in = result["full_space"]["per_prompt"]["mass_in_space_optimal"][0]
    order = torch.argsort(optimal, descending=True)[:25]
    series = [("π_ref", RED, ref_logps[0].exp() * mass_ref)]
    for m in methods[:2]:
        inside = m["full_space"]["per_prompt"]["mass_in_space_policy"][0]
        series.append((f"π_θ ({m['name']})", COLOURS.get(m["name"], GREY),
                       m["policy_logps"][0].exp() * inside))
    series.append(("π* (exact)", "black", optimal * optimal_in))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax = fig.subplots()
    x = torch.arange(len(order) + 2).double()
    width = 0.8 / len(series)
    for k, (label, colour, probs) in enumerate(series):
        shown, inside = probs[order], float(probs.sum())
        heights = [max(v, 1e-6) for v in (*shown.tolist(), inside - float(shown.sum()),
                                          1.0 - inside)]
        ax.bar((x + (k - (len(series) - 1) / 2) * width).numpy(), heights, width, color=colour,
               label=label, alpha=0.6 if k == len(series) - 1 else 1.0)
    labels = [t.strip() for t in task.text(space.completions[order])] + [
        f"the other {len(optimal) - len(order)} task completions", "outside the task's space"]
    ax.set_xticks(x.numpy(), labels, rotation=60, ha="right", fontsize=7)
    ax.set(title=f"Prompt '{task.prompts[0]}': what a sampler gets — the 25 most likely "
                 f"completions under π*, the rest of the task and the outside (β = {beta:g})",
           ylabel="probability (log scale)", yscale="log", ylim=(1e-6, 1.5))
    ax.legend(fontsize=8, loc="upper left")
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
    ax.set(title=f"Implicit reward β·log(π_θ/π_ref) of {run['name']} recovers r\n"
                 f"up to a per-prompt constant (renormalised on the task's space)",
           xlabel="true reward r(x, y)", ylabel="implicit reward + fitted offset c(x)")
    ax.legend(fontsize=7, markerscale=3)
    return fig


def _frontier(result, methods, runs) -> Figure:
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    kl = [p["kl_to_ref"] for p in result["frontier"]]
    reward = [p["reward"] for p in result["frontier"]]
    ax.plot(kl, reward, color=GREEN, lw=2, label="π*_β for every β (exact frontier)")
    points = [(m["name"], m["final"], COLOURS.get(m["name"], GREY)) for m in methods]
    points += [(f"dpo β={run['beta']:g}", run["final"], BLUE) for run in runs[1:]]
    for name, final, colour in points:
        ax.plot(final["kl_policy_to_ref"], final["reward_policy"], "o", color=colour, ms=8)
        ax.annotate(name, (final["kl_policy_to_ref"], final["reward_policy"]), fontsize=8,
                    xytext=(5, -10), textcoords="offset points")
    best = result["best_of_n"]
    ax.plot(best["kl_to_ref"], best["reward"], "s", color=RED, ms=7,
            label=f"best-of-{best['n']} (matched KL)")
    ax.set(title="Reward against KL to π_ref (renormalised on the task's space)",
           xlabel="KL(π ‖ π_ref) (nats)", ylabel="expected reward E_π[r]")
    ax.legend(fontsize=8)
    return fig


def write_demo_plots(out: Path, result, task, space, ref_logps, methods, runs) -> list[str]:
    default = next(m for m in methods if m["name"] == result["default_method"])
    figures = {
        "kl_to_optimal.png": _kl_history(result, methods),
        "distribution.png": _distribution(result, task, space, ref_logps, methods),
        "implicit_reward.png": _implicit_reward(space, ref_logps, default),
        "frontier.png": _frontier(result, methods, runs),
    }
    for name, fig in figures.items():
        save_figure(fig, out / name)
    return list(figures)
