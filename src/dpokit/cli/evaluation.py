"""The evaluation commands: ``eval`` (a model on preference data) and ``generate``.

Their flags are the fields of ``EvalConfig`` and ``GenerateConfig`` (:mod:`dpokit.eval_config`,
which imports no torch, so ``--help`` answers at once).
"""

from __future__ import annotations

import json

from rich.table import Table

from dpokit.cli.app import COMMANDS, app, console
from dpokit.cli.options import config_command
from dpokit.eval_config import EvalConfig, GenerateConfig


def _eval(config: EvalConfig) -> None:
    """``dpokit eval``: evaluate, print the means as a table (or JSON)."""
    from dpokit.evaluate import run_eval

    result = run_eval(config)
    if not result.is_main:
        return
    if config.json:
        print(json.dumps({"num_pairs": result.num_examples, **result.metrics}, indent=2))
        return
    losses = ", ".join(config.loss_type)
    table = Table(title=f"{config.model} on {config.data} ({result.num_examples} pairs, "
                        f"β = {config.beta:g}, {losses})")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)
    if "loss" not in result.metrics:
        console.print("No --ref-model: log-probs only (rewards and loss need a reference).")
    if config.per_example is not None:
        console.print(f"wrote {result.num_examples} rows to {config.per_example}", soft_wrap=True)


def _generate(config: GenerateConfig) -> None:
    """``dpokit generate``: write the completions, say how many and how many ended with EOS."""
    from dpokit.evaluate import run_generate

    records = run_generate(config)
    ended = sum(r["eos"] for r in records)
    console.print(f"wrote {len(records)} completions to {config.output} ({ended} ended with "
                  f"EOS within {config.max_new_tokens} tokens)", soft_wrap=True)


for _name, _cls, _run in (("eval", EvalConfig, _eval), ("generate", GenerateConfig, _generate)):
    app.add_command(config_command(_name, _cls, _run, summary=COMMANDS[_name][1]))
