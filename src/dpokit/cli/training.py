"""The training commands: ``train`` (DPO family), ``sft``, ``eval``, ``demo`` and ``bench``.

Each one's flags are the fields of its config dataclass (``DPOConfig``, ``SFTConfig``,
``EvalConfig``, ``DemoConfig``, ``BenchConfig``), so ``--help`` shows every key with its type,
default and help, and ``--config FILE.yaml`` takes the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from dpokit.bench import BenchConfig
from dpokit.cli.app import app, console
from dpokit.cli.options import config_command
from dpokit.demo.run import DemoConfig
from dpokit.evaluate import EvalConfig, GenerateConfig
from dpokit.train.config import DPOConfig, SFTConfig


def _train(config) -> None:
    """``dpokit train`` / ``dpokit sft``: run the loop, print where the model went."""
    from dpokit.train.loop import train

    console.print(f"done: {train(config)}")


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
        console.print(f"wrote {result.num_examples} rows to {config.per_example}")


def _generate(config: GenerateConfig) -> None:
    """``dpokit generate``: write the completions, say how many and how many ended with EOS."""
    from dpokit.evaluate import run_generate

    records = run_generate(config)
    ended = sum(r["eos"] for r in records)
    console.print(f"wrote {len(records)} completions to {config.output} ({ended} ended with "
                  f"EOS within {config.max_new_tokens} tokens)")


def _demo(config: DemoConfig) -> None:
    """``dpokit demo``: run it, print the summary table and where the report is."""
    from dpokit.demo.run import run_demo

    r = run_demo(config, report=lambda line: console.print(line))
    table = Table(title=f"DPO against the exact optimum (β = {r['beta']:g}, mean over prompts)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    full = r["full_space"]
    low, high = full["kl_policy_to_optimal_ci"]
    for label, value in (
            ("whole output space: KL(π_ref ‖ π*)", f"{full['kl_ref_to_optimal']:.4f}"),
            ("whole output space: KL(π_θ ‖ π*)",
             f"≥ {full['kl_policy_to_optimal_lower_bound']:.4f}, ≈ "
             f"{full['kl_policy_to_optimal_estimate']:.4f} [{low:.4f}, {high:.4f}]"),
            ("whole output space: distance closed",
             f"{full['closed_fraction_lower_bound']:.1%} (lower bound)"),
            ("generate samples in the task's space", f"{full['sampled_in_space']:.1%}"),
            ("renormalised: KL(π_ref ‖ π*)  before DPO", f"{r['kl_ref_to_optimal']:.4f}"),
            ("renormalised: KL(π_θ ‖ π*)  after DPO", f"{r['kl_policy_to_optimal']:.4f}"),
            ("renormalised: distance closed", f"{r['closed_fraction']:.1%} (bar "
                                f"{r['target_closed_fraction']:.0%}: "
                                f"{'met' if r['passed'] else 'NOT met'})"),
            ("KL(π_θ ‖ π_ref)", f"{r['kl_policy_to_ref']:.4f}"),
            ("E[r]: π_ref / π_θ / π*", f"{r['reward_ref']:.3f} / {r['reward_policy']:.3f} / "
                                       f"{r['reward_optimal']:.3f}"),
            ("J(π_θ) ≤ β log Z", f"{r['objective_policy']:.4f} ≤ {r['max_objective']:.4f}"),
            ("implicit reward vs r (corr.)", f"{r['implicit_reward_correlation']:.3f}"),
            ("mass on the space: π_ref / π_θ", f"{r['mass_in_space_ref']:.1%} / "
                                               f"{r['mass_in_space_policy']:.1%}")):
        table.add_row(label, value)
    console.print(table)
    out = Path(config.out_dir)
    console.print(f"report: {out / 'report.md'}, numbers: {out / 'report.json'}, plots: "
                  f"{', '.join(r['plots'])} ({r['seconds']:.0f} s)", soft_wrap=True)


def _bench(config: BenchConfig) -> None:
    """``dpokit bench``: run the benchmark, print dpokit/TRL ratios, write the rows."""
    from dpokit.bench import benchmark

    chosen = {"models": config.models, "settings": config.settings,
              "frameworks": config.frameworks}
    rows = benchmark(config.workdir, steps=config.steps, repeats=config.repeats,
                     end_to_end=config.end_to_end, device=config.device, dtype=config.dtype,
                     report=lambda line: console.print(line, soft_wrap=True), **chosen)
    for model in config.models:
        for setting in config.settings:
            pair = {r["framework"]: r for r in rows if r["model"] == model
                    and r["setting"] == setting and "error" not in r}
            if len(pair) == 2:
                ratio = pair["dpokit"]["pairs_per_second"] / pair["trl"]["pairs_per_second"]
                console.print(f"{model}/{setting}: dpokit/TRL pairs/s = {ratio:.2f}×")
    if config.json is not None:
        from dpokit.atomic import write_text

        write_text(config.json, json.dumps(rows, indent=2))


for _name, _cls, _run, _summary in (
        ("train", DPOConfig, _train,
         "DPO (or any loss of the family) on preference data: `dpokit train --config dpo.yaml`."),
        ("sft", SFTConfig, _train,
         "Supervised fine-tuning (NLL of completion tokens): `dpokit sft --config sft.yaml`."),
        ("eval", EvalConfig, _eval,
         "Log-probs, implicit rewards, loss and preference accuracy of a model on preference "
         "data — the training objective without backward (same keys as `dpokit train`)."),
        ("generate", GenerateConfig, _generate,
         "Completions of the prompts of a data file from a local model: "
         "`dpokit generate --model runs/dpo/final --data prompts.jsonl`."),
        ("demo", DemoConfig, _demo,
         "Train a transformer with DPO and measure, exactly, how close it gets to π*."),
        ("bench", BenchConfig, _bench,
         "DPO speed and memory of dpokit against TRL's DPOTrainer on identical fixtures.")):
    app.add_command(config_command(_name, _cls, _run, summary=_summary))
