"""The training commands: ``train`` (DPO family), ``sft`` and ``bench``.

Each one's flags are the fields of its config dataclass (``DPOConfig``, ``SFTConfig``,
``BenchConfig``), so ``--help`` shows every key with its type, default and help, and ``--config
FILE.yaml`` takes the same keys. Their configs import no torch: ``--help`` answers at once.
"""

from __future__ import annotations

import json

from dpokit.bench import BenchConfig
from dpokit.cli.app import COMMANDS, app, console
from dpokit.cli.options import config_command
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


for _name, _cls, _run in (("train", DPOConfig, _train), ("sft", SFTConfig, _train),
                          ("bench", BenchConfig, _bench)):
    app.add_command(config_command(_name, _cls, _run, summary=COMMANDS[_name][1]))
