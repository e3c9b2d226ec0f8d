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
    console.print(f"done: {path}", soft_wrap=True)  # one line, whatever the path's length






def _bench(config: BenchConfig) -> None:
    """``dpokit bench``: run the benchmark, print dpokit/TRL ratios, write the rows."""
    from dpokit.bench import benchmark, long_context_benchmark, machine_memory_gb

    limit = config.memory_limit_gb or 0.9 * machine_memory_gb()
    chosen = {"models": config.models, "settings": config.settings,
              "frameworks": config.frameworks}
    if config.context_lengths:
        rows = long_context_benchmark(
            config.workdir, lengths=config.context_lengths, settings=config.settings,
            steps=config.steps, repeats=config.repeats, frameworks=config.frameworks,
            memory_limit_gb=limit, report=lambda line: console.print(line, soft_wrap=True),
            written=lambda rows: _write_rows(config, rows))
        _long_ratios(rows)
        _write_rows(config, rows)
        return
    rows = benchmark(config.workdir, steps=config.steps, repeats=config.repeats,
                     end_to_end=config.end_to_end, device=config.device, precision=config.precision,
                     memory_limit_gb=limit,
                     report=lambda line: console.print(line, soft_wrap=True),
                     written=lambda rows: _write_rows(config, rows), **chosen)
    for model in config.models:
        for setting in config.settings:
            pair = {r["framework"]: r for r in rows if r["model"] == model
                    and r["setting"] == setting and "error" not in r}
            if len(pair) == 2:
                ratio = pair["dpokit"]["pairs_per_second"] / pair["trl"]["pairs_per_second"]
                console.print(f"{model}/{setting}: dpokit/TRL pairs/s = {ratio:.2f}×")
    _write_rows(config, rows)


def _long_ratios(rows: list[dict]) -> None:
    """Per context length, dpokit's default against each TRL setting: speed and memory."""
    for length in dict.fromkeys(r["context_length"] for r in rows):
        ours = next((r for r in rows if r["context_length"] == length
                     and r["framework"] == "dpokit" and r["setting"] == "default"
                     and "error" not in r), None)
        for theirs in (r for r in rows if r["context_length"] == length
                       and r["framework"] == "trl"):
            if ours is None:
                continue
            if "error" in theirs:
                console.print(f"{length}: TRL {theirs['setting']} failed: {theirs['error']}",
                              soft_wrap=True)
                continue
            speed = theirs["seconds_per_step"] / ours["seconds_per_step"]
            memory = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            console.print(f"{length}: dpokit default {speed:.2f}× faster than TRL "
                          f"{theirs['setting']}, {memory:.2f}× its peak RSS")


def _write_rows(config: BenchConfig, rows: list[dict]) -> None:
    if config.json is not None:
        from dpokit.atomic import write_text

        write_text(config.json, json.dumps(rows, indent=2))


for _name, _cls, _run in (("train", DPOConfig, _train), ("sft", SFTConfig, _train),
                          ("bench", BenchConfig, _bench)):
    app.add_command(config_command(_name, _cls, _run, summary=COMMANDS[_name][1],
                                   trl_names=_name != "bench"))
