"""The ``dpokit`` click group and the console commands print to."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from dpokit import __version__

# Piped output gets a fixed, roomy width; columns fold rather than truncate a number.
console = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 120)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dpokit")
def app() -> None:
    """KL-regularised preference optimisation: the exact optimal policy π* and DPO."""
