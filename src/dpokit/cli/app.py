"""The ``dpokit`` click group and the console commands print to.

The group is lazy: ``dpokit --help`` lists the commands from :data:`COMMANDS` (module and summary)
without importing them, and a command's module — with torch and transformers behind it — is
imported only when that command runs or shows its own help. Each module registers its commands
on :data:`app` when imported, taking its summary from :data:`COMMANDS`, so the listing and the
command's own help are one text.
"""

from __future__ import annotations

import importlib
import sys

import click

from dpokit import __version__

COMMANDS = {
    "train": ("dpokit.cli.training",
              "DPO (or any loss of the family) on preference data: `dpokit train --config "
              "dpo.yaml`."),
    "sft": ("dpokit.cli.training",
            "Supervised fine-tuning (NLL of completion tokens): `dpokit sft --config sft.yaml`."),
    "eval": ("dpokit.cli.evaluation",
             "Log-probs, implicit rewards, loss and preference accuracy of a model on preference "
             "data — the training objective without backward (same keys as `dpokit train`)."),
    "generate": ("dpokit.cli.evaluation",
                 "Completions of the prompts of a data file from a local model: "
                 "`dpokit generate --model runs/dpo/final --data prompts.jsonl`."),
    "demo": ("dpokit.cli.demo",
             "Train a transformer with DPO and measure, exactly, how close it gets to π*."),
    "bench": ("dpokit.cli.training",
              "DPO speed and memory of dpokit against TRL's DPOTrainer on identical fixtures."),
    "optimal": ("dpokit.cli.lecture",
                "π* = π_ref·exp(r/β)/Z for a table of outcomes (default: the lecture's worked "
                "example).\n\nPrints each outcome's π_ref, r and π*, with Z, J(π*) = β log Z "
                "and KL(π* ‖ π_ref)."),
    "partition": ("dpokit.cli.lecture",
                  "Why Z is intractable: V^T growth, and exact log Z beside Monte-Carlo "
                  "estimates."),
    "figures": ("dpokit.cli.lecture", "Compute and draw the lecture's figures as PNGs."),
    "config": ("dpokit.cli.configs",
               "Config files: convert a TRL DPO or SFT config to dpokit's keys."),
}
"""Every command: the module that defines it, and its help text (first sentence: the listing)."""


class LazyGroup(click.Group):
    """A group whose commands are imported when first resolved (click's documented pattern for
    lazily loaded subcommands), listed from :data:`COMMANDS` without importing them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(COMMANDS[cmd_name][0])  # registers its commands
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dpokit")
def app() -> None:
    """KL-regularised preference optimisation: the exact optimal policy π* and DPO."""


class _Console:
    """``rich.console.Console`` made on first use (rich is imported by the commands that print
    tables, not by ``dpokit --help``). Piped output gets a fixed, roomy width; columns fold
    rather than truncate a number."""

    _console = None

    def __getattr__(self, name: str):
        if _Console._console is None:
            from rich.console import Console

            _Console._console = Console(highlight=False, markup=False,
                                        width=None if sys.stdout.isatty() else 120)
        return getattr(_Console._console, name)


console = _Console()
