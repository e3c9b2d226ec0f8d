"""The lecture's commands: ``optimal`` (π* of an outcome table), ``partition`` (why Z is
intractable) and ``figures`` (every plot of the lecture, computed).

Each one's flags are the fields of its config dataclass (:mod:`dpokit.lecture.config`), so
``--help`` shows every key with its type, default and help, and ``--config FILE.yaml`` takes the
same keys. The computations (torch) and rich are imported when a command runs, not for its
``--help``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from dpokit.cli.app import COMMANDS, app, console
from dpokit.cli.options import config_command
from dpokit.format import format_count, format_duration
from dpokit.lecture.config import FiguresConfig, OptimalConfig, PartitionConfig

if TYPE_CHECKING:
    from dpokit.lecture.outcomes import OptimalSolution

# ----------------------------------------------------------------------------------- optimal


def _exp_text(x: float) -> str:
    """exp(x) printed, or ``e^x`` past float range."""
    return f"{math.exp(x):.4g}" if x < 700 else f"e^{x:.4g}"


def _optimal(config: OptimalConfig) -> None:
    """``dpokit optimal``: π* of the table at each β, as tables (one β or a sweep) or JSON."""
    from dpokit.lecture.outcomes import outcome_table, solve

    outcomes, prompt = outcome_table(config)
    solutions = [solve(outcomes, beta) for beta in config.betas]
    if config.json:
        payload = [s.to_json() for s in solutions]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
        return
    title = f"prompt: {prompt!r}" if prompt else "outcomes"
    if len(solutions) == 1:
        _print_solution(solutions[0], title)
    else:
        _print_sweep(solutions, title)


def _print_solution(s: OptimalSolution, title: str) -> None:
    """One β: each outcome's π_ref, r, exp(r/β), π*, then Z, KL(π*‖π_ref) and J(π*)."""
    from rich.table import Table

    table = Table(title=f"Optimal policy π* at β = {s.beta:g} — {title}")
    for name in ("outcome y", "π_ref(y|x)", "r(x,y)", "exp(r/β)", "π*(y|x)"):
        table.add_column(name, justify="left" if name == "outcome y" else "right",
                         overflow="fold")
    for o, p in zip(s.outcomes, s.optimal_probs, strict=True):
        table.add_row(o.name, f"{o.ref_prob:.4g}", f"{o.reward:.4g}",
                      _exp_text(o.reward / s.beta), f"{p:.6g}")
    console.print(table)
    console.print(f"Z = Σ π_ref·exp(r/β) = {_exp_text(s.log_partition)}   "
                  f"log Z = {s.log_partition:.6g}")
    console.print(f"KL(π* ‖ π_ref) = {s.kl_optimal_ref:.6g} nats")
    console.print(f"J(π*) = E_π*[r] − β KL(π* ‖ π_ref) = {s.expected_reward:.6g} − "
                  f"{s.beta:g}·{s.kl_optimal_ref:.6g} = {s.objective:.6g}")
    console.print(f"β log Z = {s.beta * s.log_partition:.6g}  (the maximum of J, reached at π*)")


def _print_sweep(solutions: list[OptimalSolution], title: str) -> None:
    """One row per outcome (π_ref, r, then π* at each β), then the per-β summaries."""
    from rich.table import Table

    table = Table(title=f"β sweep of π*(y|x) = π_ref·exp(r/β)/Z — {title}")
    table.add_column("outcome y", overflow="fold")
    table.add_column("π_ref", justify="right", overflow="fold")
    table.add_column("r", justify="right", overflow="fold")
    for s in solutions:
        table.add_column(f"π* β={s.beta:g}", justify="right", overflow="fold")
    for i, o in enumerate(solutions[0].outcomes):
        table.add_row(o.name, f"{o.ref_prob:.4g}", f"{o.reward:.4g}",
                      *(f"{s.optimal_probs[i]:.4g}" for s in solutions),
                      end_section=i == len(solutions[0].outcomes) - 1)
    for label, value in (("log Z", lambda s: s.log_partition),
                         ("J(π*) = β log Z", lambda s: s.objective),
                         ("E_π*[r]", lambda s: s.expected_reward),
                         ("KL(π* ‖ π_ref)", lambda s: s.kl_optimal_ref)):
        table.add_row(label, "", "", *(f"{value(s):.4g}" for s in solutions))
    console.print(table)


# --------------------------------------------------------------------------------- partition


def _partition(config: PartitionConfig) -> None:
    """``dpokit partition``: V^T growth, exact log Z two ways, Monte-Carlo estimates."""
    from rich.table import Table

    from dpokit.lecture.partition import (
        builtin_space,
        exact_partitions,
        growth_table,
        measure_scoring_rate,
        monte_carlo_study,
    )

    measured = config.rate is None
    rate = measure_scoring_rate() if measured else config.rate
    growth = growth_table(config.vocab_size, config.max_length, rate)
    space = builtin_space(config.space_vocab, config.space_length, seed=config.seed)
    exact = exact_partitions(space, config.betas)
    study = monte_carlo_study(space, config.betas, config.samples, repeats=config.repeats,
                              seed=config.seed)
    if config.json:
        print(json.dumps({
            "rate": rate, "rate_measured": measured, "vocab_size": config.vocab_size,
            "growth": [vars(row) for row in growth],
            "space": {"vocab_size": config.space_vocab, "length": config.space_length,
                      "num_sequences": space.num_sequences},
            "exact": [vars(e) for e in exact],
            "monte_carlo": [row.to_json() for row in study],
        }, indent=2))
        return
    how = ("measured here with a bigram scorer; a neural π_ref is far slower" if measured
           else "given")
    console.print(f"Time to enumerate at {rate:.3g} sequences/s ({how}).")
    table = Table(title=f"Terms in Z(x) for V = {config.vocab_size:,}")
    for name in ("T", "V^T", "time", "Σ_{t≤T} V^t", "time "):
        table.add_column(name, justify="right", overflow="fold")
    for row in growth:
        table.add_row(str(row.length), format_count(row.exactly),
                      format_duration(row.seconds_exactly), format_count(row.up_to),
                      format_duration(row.seconds_up_to))
    console.print(table)
    console.print(f"Built-in space: bigram π_ref over V = {config.space_vocab}, "
                  f"T = {config.space_length} "
                  f"({space.num_sequences:,} sequences), reward = Σ_t r(y_t) with r(v) ~ N(0, 1).")
    ex = Table(title="Exact log Z: enumeration vs O(T·V²) recursion")
    for name in ("β", "enumerated", "recursion", "|difference|"):
        ex.add_column(name, justify="right", overflow="fold")
    for e in exact:
        ex.add_row(f"{e.beta:g}", f"{e.enumerated:.10g}", f"{e.recursion:.10g}",
                   f"{abs(e.enumerated - e.recursion):.1e}")
    console.print(ex)
    mc = Table(title=f"Monte-Carlo log Ẑ from π_ref samples ({config.repeats} repeats each)")
    for name in ("β", "n", "exact log Z", "mean log Ẑ", "RMSE log Ẑ", "mean |Ẑ/Z−1|",
                 "95% CI coverage", "mean ESS"):
        mc.add_column(name, justify="right", overflow="fold")
    for row in study:
        mc.add_row(f"{row.beta:g}", f"{row.num_samples:,}", f"{row.exact_log_partition:.5g}",
                   f"{row.mean_log_estimate:.5g}", f"{row.rmse_log:.3g}",
                   f"{row.mean_abs_relative_error:.3g}", f"{row.coverage:.0%}",
                   f"{row.mean_ess:.4g}")
    console.print(mc)
    console.print("Smaller β puts the weight exp(r/β) on rarer sequences: the effective sample "
                  "size collapses and the error of Ẑ grows.")


# ----------------------------------------------------------------------------------- figures


def _figures(config: FiguresConfig) -> None:
    """``dpokit figures``: write every figure, one line per file with its caption."""
    from dpokit.lecture.figures import FIGURES, write_figures

    def report(path: Path) -> None:
        """Print what was written."""
        console.print(f"wrote {path}: {FIGURES[path.name]}", soft_wrap=True)

    write_figures(config.out_dir, rate=config.rate, on_written=report)


for _name, _cls, _run in (("optimal", OptimalConfig, _optimal),
                          ("partition", PartitionConfig, _partition),
                          ("figures", FiguresConfig, _figures)):
    app.add_command(config_command(_name, _cls, _run, summary=COMMANDS[_name][1]))
