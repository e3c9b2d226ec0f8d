"""``dpokit config convert trl.yaml > dpokit.yaml``: a TRL config as dpokit's own keys."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from dpokit.cli.app import app


@app.group("config")
def config_group() -> None:
    """Config files: convert a TRL config to dpokit's keys."""


@config_group.command("convert")
@click.argument("path", type=click.Path(path_type=Path))
def convert(path: Path) -> None:
    """Print PATH (a TRL 1.16 DPO config) as a dpokit config, a comment per changed key."""
    from dpokit.config import read_yaml
    from dpokit.errors import DpokitError
    from dpokit.trl_config import is_trl, translate

    document = read_yaml(path)
    if not is_trl(document):
        raise DpokitError(f"{path}: uses no TRL-only key; it is already a dpokit config")
    result = translate(document, source=str(path))
    lines = [f"# dpokit config converted from the TRL config {path}",
             "# dpokit train --config THIS_FILE"]
    for key, became in result.notes:
        lines.append(f"# {key} → {became}")
    if result.no_effect:
        lines.append(f"# dropped (no effect on the result): {', '.join(result.no_effect)}")
    click.echo("\n".join(lines))
    click.echo(yaml.safe_dump(result.values, sort_keys=False), nl=False)
