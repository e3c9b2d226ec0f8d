"""``dpokit demo``: DPO and on-policy DPO against the exact optimal policy, end to end."""

from __future__ import annotations

from pathlib import Path

from dpokit.cli.app import COMMANDS, app, console
from dpokit.cli.options import config_command
from dpokit.demo.config import DemoConfig


def _demo(config: DemoConfig) -> None:
    """``dpokit demo``: run it, print the summary table and where the report is."""
    import sys

    from rich.table import Table

    from dpokit.demo.run import DemoStopped, run_demo
    from dpokit.demo.text import METHOD_COLUMNS, method_rows, verdict

    try:
        r = run_demo(config, report=lambda line: console.print(line))
    except DemoStopped as stopped:
        console.print(f"stopped: {stopped}", soft_wrap=True)
        sys.exit(128 + stopped.signum)
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


app.add_command(config_command("demo", DemoConfig, _demo, summary=COMMANDS["demo"][1]))
