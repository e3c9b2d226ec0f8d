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
    """``dpokit train`` / ``dpokit sft``: run the loop, print where the model went; stopped by
    SIGTERM/SIGINT (after saving a checkpoint), exit with 143/130."""
    import sys

    from dpokit.train import loop

    path = loop.train(config)
    if loop.last_stop_signal is not None:
        console.print(f"stopped: checkpoint {path} (resume with --resume auto)", soft_wrap=True)
        sys.exit(128 + int(loop.last_stop_signal))
    console.print(f"done: {path}")


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
    from dpokit.demo.text import METHOD_COLUMNS, method_rows, verdict

    r = run_demo(config, report=lambda line: console.print(line))
    full = r["full_space"]
    table = Table(title=f"Distance to the exact π* on the model's whole output space "
                        f"(β = {r['beta']:g}, mean over prompts; KL(π_ref ‖ π*) = "
                        f"{full['kl_ref_to_optimal']:.4f})")
    for k, column in enumerate(METHOD_COLUMNS):
        table.add_column(column, justify="left" if k == 0 else "right")
    for row in method_rows(r):
        table.add_row(*row)
    console.print(table)
    console.print(verdict(r).replace("**", ""), soft_wrap=True)
    out = Path(config.out_dir)
    console.print(f"report: {out / 'report.md'}, numbers: {out / 'report.json'}, plots: "
                  f"{', '.join(r['plots'])} ({r['seconds']:.0f} s)", soft_wrap=True)


def _bench(config: BenchConfig) -> None:
    """``dpokit bench``: run the benchmark, print dpokit/TRL ratios, write the rows."""
    from dpokit.bench import benchmark

    chosen = {"models": config.models, "settings": config.settings,
              "frameworks": config.frameworks}
    rows = benchmark(config.workdir, steps=config.steps, repeats=config.repeats,
                     end_to_end=config.end_to_end, device=config.device, precision=config.precision,
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
