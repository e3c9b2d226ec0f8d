"""Command-line integrity (review findings): every flag reaches its config field, errors are one
line with exit status 2 (a malformed ``[a, b`` list flag too), a usage error's hint names a
command that exists, the ``done:`` line stays one line, and SIGTERM outside the training loop
unwinds (lock released, no half-written temporary) with exit status 143.

No test loads a model except the SIGTERM-in-setup one, which stops before the model is read.
"""

import dataclasses
import signal
import subprocess
import sys
import types
import typing
from typing import Literal

import pytest
import yaml

from tests.helpers import run_cli

DPOKIT = [sys.executable, "-m", "dpokit"]


def _one_line_error(code, out, err):
    assert code == 2, (code, err)
    assert out == ""
    assert err.startswith("dpokit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


# ------------------------------------------------------------------- list flags: [a, b YAML text


@pytest.mark.parametrize("argv", [
    ["train", "--model", "m", "--data", "d", "--loss-type", "[sigmoid"],
    ["train", "--model", "m", "--data", "d", "--loss-type", "sigmoid", "--loss-type", "[ipo"],
    ["train", "--model", "m", "--data", "d", "--loss-weights", "[1, 2"],
    ["sft", "--model", "m", "--data", "d", "--lora", "--lora-target-modules", "[q_proj,"],
    ["optimal", "--beta", "[0.5, 1"],
])
def test_a_malformed_yaml_list_flag_is_a_one_line_error(capsys, argv):
    """``--loss-type "[sigmoid"`` (a YAML list missing its ``]``) escaped ``split_list_text``
    as yaml's ScannerError/ParserError — a traceback — instead of one line naming the key."""
    code, out, err = run_cli(capsys, *argv)
    _one_line_error(code, out, err)
    key = {"--loss-type": "loss_type", "--loss-weights": "loss_weights",
           "--lora-target-modules": "lora_target_modules", "--beta": "betas"}[argv[-2]]
    assert f"error: {key}: " in err and "not a YAML list" in err, err


# ------------------------------------------------------------------ usage errors' --help hints


@pytest.mark.parametrize(("argv", "hint"), [
    (["config", "convert"], "dpokit config convert --help"),
    (["config", "convert", "--to", "dpo", "x.yaml"], "dpokit config convert --help"),
    (["config", "nosuch"], "dpokit config --help"),
    (["nosuch"], "dpokit --help"),
    (["train", "--no-such-flag"], "dpokit train --help"),
])
def test_a_usage_errors_hint_names_a_command_that_exists(capsys, argv, hint):
    """``dpokit config convert`` without PATH said "see 'dpokit convert --help'" — a command
    that does not exist (the subcommand's name without its group)."""
    code, out, err = run_cli(capsys, *argv)
    _one_line_error(code, out, err)
    assert err.rstrip("\n").endswith(f"(see '{hint}')"), err
    code, out, _ = run_cli(capsys, *hint.split()[1:])
    assert code in (0, None) and out.startswith(f"Usage: {hint.removesuffix(' --help')} ")


# ------------------------------------------------------------------------ the done: line


def test_the_done_line_is_one_line_whatever_the_paths_length(monkeypatch, capsys):
    """Piped stdout is 120 columns wide: ``done: PATH`` for a long output directory was folded
    over several lines, so ``dpokit train … | tail -1`` gave a piece of the path."""
    from dpokit.train import loop

    final = "/scratch/" + "/".join(f"experiment-{i:02d}-beta0.1-lr5e-7" for i in range(8)) + \
        "/final"
    monkeypatch.setattr(loop, "train", lambda config: final)
    monkeypatch.setattr(loop, "last_stop_signal", None, raising=False)
    code, out, err = run_cli(capsys, "train", "--model", "m", "--data", "d")
    assert code == 0, err
    assert out == f"done: {final}\n"


# ------------------------------------------------- every field a flag, YAML, CLI over YAML


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _other_value(hint, default):
    """A value of type ``hint`` other than ``default``, valid alone for the configs below."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return not default
    if hint == bool | None:
        return True
    if origin is Literal:
        return next(a for a in args if a != default)
    if origin in (types.UnionType, typing.Union):
        return _other_value(next(a for a in args if a is not type(None)), None)
    if origin is list:
        item = args[0]
        if typing.get_origin(item) is Literal:
            return [typing.get_args(item)[0]]
        if item is str:
            return ["ipo", "hinge"] if default == ["sigmoid"] else ["q_proj", "v_proj"]
        return [0.25, 0.5] if item is float else [3, 4]
    if hint is int:
        return (default or 0) + 3
    if hint is float:
        return 0.25 if default != 0.25 else 0.3
    return "cpu" if default == "auto" else "zz"


# flags a value needs beside it to validate (LoRA keys need lora, a loss's parameter its loss)
_CONTEXT = {
    "lora_r": ["--lora"], "lora_alpha": ["--lora"], "lora_dropout": ["--lora"],
    "lora_target_modules": ["--lora"], "merge_lora": ["--lora"], "reward": ["--eval-generate", "1"],
    "online": ["--reward", "m:f", "--loss-type", "sigmoid_soft"],
    "label": ["--online", "--reward", "m:f"],
    "missing_eos_penalty": ["--online", "--reward", "m:f", "--loss-type", "sigmoid_soft"],
    "loss_weights": ["--loss-type", "sigmoid,ipo"], "bco_delta": ["--loss-type", "bco_pair"],
    "discopop_tau": ["--loss-type", "discopop"], "simpo_gamma": ["--loss-type", "simpo"],
    "odpo_alpha": ["--loss-type", "odpo"], "dpop_lambda": ["--loss-type", "dpop"],
    "f_alpha_divergence_coef": ["--f-divergence-type", "alpha_divergence"],
}


def _flag_args(name, hint, value):
    flag = "--" + name.replace("_", "-")
    if hint is bool:
        return [flag if value else "--no-" + flag[2:]]
    if hint == bool | None:
        return [flag, str(value).lower()]
    if isinstance(value, list):
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


@pytest.mark.parametrize("command", ["train", "sft"])
def test_every_field_is_a_flag_and_a_yaml_key_and_the_flag_wins(tmp_path, command):
    """For each field of DPOConfig/SFTConfig: ``--field-name`` and ``--field_name`` set it with
    its type, the YAML key sets it, and the flag set back to the default wins over the YAML."""
    from click.testing import CliRunner

    from dpokit.cli.options import config_command
    from dpokit.train.config import DPOConfig, SFTConfig

    cls = {"train": DPOConfig, "sft": SFTConfig}[command]
    hints = typing.get_type_hints(cls)

    def resolve(*argv):
        seen = []
        result = CliRunner().invoke(config_command(command, cls, seen.append, summary=""),
                                    list(argv))
        assert seen, (argv, result.output, result.exception)
        return seen[0]

    for f in dataclasses.fields(cls):
        name, hint, default = f.name, hints[f.name], _field_default(f)
        if default is dataclasses.MISSING:
            continue  # model and data: required, given below
        value = _other_value(hint, default)
        context = ["--model", "m", "--data", "d", *_CONTEXT.get(name, [])]
        args = _flag_args(name, hint, value)
        got = getattr(resolve(*context, *args), name)
        assert got == value and type(got) is type(value), (name, args, got)
        if "_" in name:
            underscored = [args[0].replace("-", "_").replace("__", "--", 1), *args[1:]]
            assert getattr(resolve(*context, *underscored), name) == value, (name, underscored)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": "m", "data": "d", name: value}))
        assert getattr(resolve("--config", str(path), *context[4:]), name) == value, name
        if default is not None and name not in ("online", "label"):  # (those need the others)
            back = _flag_args(name, hint, default)
            assert getattr(resolve("--config", str(path), *context[4:], *back), name) == \
                default, (name, back)


# ------------------------------------------------------------------------------- SIGTERM

_UNWIND = """
import os, signal, sys, time
from pathlib import Path
from dpokit.atomic import atomic_path
from dpokit.train import loop

def train(config):  # the final save, after the loop has given the signals back
    with atomic_path(Path(config.output_dir) / "final", directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    return "unreachable"

loop.train = train
from dpokit.cli import main
main(["train", "--model", "m", "--data", "d", "--output-dir", sys.argv[1]])
"""


def test_sigterm_during_the_final_save_removes_the_half_written_directory(tmp_path):
    """Outside the loop's own handler (setup, the final save) SIGTERM killed the process on the
    spot (status -15): the hidden ``.final.<pid>.tmp`` — a whole model — stayed in the run
    directory for good. Now it unwinds like Ctrl-C: one line, exit status 143, nothing left."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _UNWIND, str(out)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr == "dpokit: terminated (SIGTERM)\n"
    assert done.stdout == ""
    assert list(out.iterdir()) == [], list(out.iterdir())


_SETUP = """
import os, signal, sys, time
from dpokit.train import loop

def setup_run(config, runtime, progress=True):  # the model load, tokenising, reference pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

loop.setup_run = setup_run
from dpokit.cli import main
main(sys.argv[1:])
"""


def test_sigterm_during_setup_releases_the_run_lock(workdir, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _SETUP, "train", "--model",
                           str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
                           "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert done.stderr.endswith("dpokit: terminated (SIGTERM)\n") and "Traceback" not in \
        done.stderr
    assert (out / ".dpokit.lock").read_text() == ""  # released: no stale lock for the next run


def test_main_in_process_gives_the_sigterm_handler_back(capsys):
    before = signal.getsignal(signal.SIGTERM)
    code, _, _ = run_cli(capsys, "optimal", "--json")
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is before
