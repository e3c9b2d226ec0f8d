"""``dpokit config convert trl.yaml > dpokit.yaml``: a TRL config as dpokit's own keys."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from dpokit.cli.app import COMMANDS, app


@app.group("config", help=COMMANDS["config"][1])
def config_group() -> None:
    pass


@config_group.command("convert")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--to", "command", type=click.Choice(["train", "sft"]), default="train",
              show_default=True, help="The command the config is for: train (a TRL DPO "
                                      "config) or sft (a TRL SFT config).")
def convert(path: Path, command: str) -> None:
    """Print PATH (a TRL 1.16 DPO or SFT config) as a dpokit config, a comment per changed
    key."""
    from dpokit.config import read_yaml
    from dpokit.errors import DpokitError
    from dpokit.train.config import DPOConfig, SFTConfig
    from dpokit.trl_config import is_trl, translate

    document = read_yaml(path)
    if not is_trl(document):
        raise DpokitError(f"{path}: uses no TRL-only key; it is already a dpokit config")
    target = DPOConfig if command == "train" else SFTConfig
    result = translate(document, source=str(path), known=target.__dataclass_fields__)
    unknown = sorted(set(result.values) - set(target.__dataclass_fields__))
    if unknown:
        raise DpokitError(f"{path}: {', '.join(unknown)} not a key of dpokit {command}"
                          + (" (a TRL SFT config? --to sft)" if command == "train" else
                             " (a TRL DPO config? --to train)"))
    lines = [f"# dpokit config converted from the TRL config {path}",
             f"# dpokit {command} --config THIS_FILE"]
    for key, became in result.notes:
        lines.append(f"# {key} → {became}")
    if result.no_effect:
        lines.append(f"# dropped (no effect on the result): {', '.join(result.no_effect)}")
    click.echo("\n".join(lines))
    click.echo(yaml.safe_dump(result.values, sort_keys=False), nl=False)
