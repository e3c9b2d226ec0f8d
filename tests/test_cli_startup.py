"""``dpokit --help`` answers without importing torch or transformers (issue 14): the command
group is lazy, its listing is the commands' own help text, and every command's own ``--help``
reads a torch-free config (the demo's and the lecture's included)."""

import importlib
import subprocess
import sys

import pytest

from dpokit.cli.app import COMMANDS, app

PROBE = """
import sys
from dpokit.cli import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit as exit_:
    assert exit_.code in (0, None), exit_.code
heavy = sorted(m for m in ("torch", "transformers", "numpy", "rich") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


def _heavy(*command):
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    *text, last = done.stdout.strip().splitlines()
    return "\n".join(text), last.removeprefix("HEAVY").strip()


def test_help_imports_no_heavy_library():
    out, heavy = _heavy()
    assert heavy == "", heavy  # none of torch, transformers, numpy, rich
    for name in COMMANDS:
        assert f"  {name} " in out, name


@pytest.mark.parametrize("command", ["train", "sft", "eval", "generate", "bench", "config",
                                     "demo", "optimal", "partition", "figures"])
def test_a_commands_help_imports_no_torch(command):
    """Its flags come from its config dataclass, whose modules (the loss registry's metadata,
    the data and objective configs, :mod:`dpokit.demo.config`, :mod:`dpokit.lecture.config`)
    import no torch; torch comes with the run."""
    out, heavy = _heavy(command)
    assert "torch" not in heavy.split(",") and "transformers" not in heavy.split(","), heavy
    assert f"dpokit {command}" in out


def test_torch_free_configs_agree_with_the_modules_they_serve():
    """The demo's reward names are the keys of the task's reward functions, and the configs
    moved out of torch modules are still importable from there (the same classes)."""
    from dpokit.demo import config, run, task
    from dpokit.lecture import config as lecture_config
    from dpokit.lecture import partition

    assert tuple(task.REWARDS) == config.REWARD_NAMES
    assert run.DemoConfig is config.DemoConfig
    assert (run.FULL, run.QUICK) == (config.FULL, config.QUICK)
    assert partition.GPT2_VOCAB_SIZE == lecture_config.GPT2_VOCAB_SIZE == 50257


def test_every_command_is_listed_with_its_own_help():
    """Importing every command module registers exactly the commands of COMMANDS, each with
    COMMANDS' text as its help (so the lazy listing cannot drift from the command)."""
    for module in {module for module, _ in COMMANDS.values()}:
        importlib.import_module(module)
    assert set(app.commands) == set(COMMANDS)
    for name, (_, text) in COMMANDS.items():
        assert app.commands[name].help == text, name
