"""The configs in ``examples/``: each opens with its command, every key is a config key, and the
command itself runs 2 steps on a tiny model (in-process, or under torchrun with 2 gloo ranks)."""

import dataclasses
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dpokit.config import load_config
from dpokit.train.config import DPOConfig, SFTConfig
from tests.helpers import read_metrics, run_cli, torchrun

EXAMPLES = Path(__file__).parent.parent / "examples"
# The command each file opens with (STYLE 9) — and the command the tests below run.
COMMANDS = {
    "sft.yaml": "dpokit sft --config examples/sft.yaml",
    "dpo.yaml": "dpokit train --config examples/dpo.yaml",
    "dpo_lora.yaml": "dpokit train --config examples/dpo_lora.yaml",
    "dpo_torchrun.yaml":
        "torchrun --nproc-per-node 4 -m dpokit train --config examples/dpo_torchrun.yaml",
}
CONFIGS = {"train": DPOConfig, "sft": SFTConfig}
KEY_LINE = re.compile(r"^([a-z_0-9]+):")  # a top-level key
COMMENTED_KEY = re.compile(r"^#\s*([a-z_0-9]+):\s*\S")  # a key left for the user to switch on
SWITCHES = {"dpo_torchrun.yaml": {"fsdp"}}  # the commented-out keys each example offers


def header_argv(name: str) -> list[str]:
    """The file's first line as argv, its config path made absolute (tests run from anywhere)."""
    first = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()[0]
    argv = shlex.split(first.removeprefix("#"))
    return [str(EXAMPLES / name) if arg == f"examples/{name}" else arg for arg in argv]


def config_class(name: str) -> type:
    argv = header_argv(name)
    return CONFIGS[argv[argv.index("dpokit") + 1]]


def tiny_flags(workdir, tmp_path, cls) -> list[str]:
    """Paths, step counts, precision, device and micro-batch size of a 2-step tiny run; every
    other key keeps the example's value (gradient accumulation included)."""
    data = workdir / ("sft.jsonl" if cls is SFTConfig else "prefs.jsonl")
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))
    return ["--model", str(workdir / "qwen2"), "--data", str(data), "--eval-data",
            str(eval_data), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
            "--logging-steps", "1", "--dtype", "float32", "--no-bf16", "--device", "cpu",
            "--batch-size", "2"]


def check_run(run_dir: Path, name: str, *also_overridden: str) -> dict:
    """2 training records with a finite loss, a finite final evaluation, a saved model, and the
    example's values in the resolved config wherever the flags did not override them; that
    resolved config."""
    records = read_metrics(run_dir)
    training = [m for m in records if "loss" in m]
    assert [m["step"] for m in training] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in training)
    assert any(math.isfinite(m["eval/loss"]) for m in records if "eval/loss" in m)
    assert (run_dir / "final").is_dir()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    overridden = {"model", "data", "eval_data", "output_dir", "max_steps", "logging_steps",
                  "dtype", "bf16", "device", "batch_size", *also_overridden}
    example = load_config(config_class(name), EXAMPLES / name)
    for key, value in dataclasses.asdict(example).items():
        if key not in overridden:
            assert resolved[key] == value, key
    return resolved


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_example_opens_with_its_command_and_uses_only_real_keys(name):
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# {COMMANDS[name]}"
    cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    keys = yaml.safe_load(text)
    assert set(keys) <= fields, set(keys) - fields
    config = load_config(cls, EXAMPLES / name)  # types and validate() on the example as written
    for key, value in keys.items():
        assert getattr(config, key) == value, key
    for line in text.splitlines():
        if KEY_LINE.match(line):
            assert " # " in line, f"{name}: no comment on {line!r}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commented_out_keys_are_valid_when_switched_on(name, tmp_path):
    lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()
    fields = {f.name for f in dataclasses.fields(config_class(name))}
    found = set()
    for i, line in enumerate(lines):
        match = COMMENTED_KEY.match(line)
        if match and match.group(1) in fields:
            switched = tmp_path / name
            switched.write_text("\n".join([*lines[:i], line.lstrip("# "), *lines[i + 1:]]))
            load_config(config_class(name), switched)
            found.add(match.group(1))
    assert found == SWITCHES.get(name, set())


@pytest.mark.parametrize("name", ["sft.yaml", "dpo.yaml", "dpo_lora.yaml"])
def test_example_trains_two_steps_on_a_tiny_model(name, workdir, tmp_path, capsys):
    argv = header_argv(name)
    assert argv[0] == "dpokit"
    code, _, err = run_cli(capsys, *argv[1:], *tiny_flags(workdir, tmp_path, config_class(name)))
    assert code == 0, err[-3000:]
    check_run(tmp_path / "run", name)
    if load_config(config_class(name), EXAMPLES / name).lora:
        assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "run" / "final" / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("switch", [
    pytest.param([], id="ddp"),
    pytest.param(["--fsdp"], id="fsdp", marks=pytest.mark.slow)])  # FSDP2 itself: test_train_cli
def test_torchrun_example_trains_two_steps_on_two_cpu_ranks(workdir, tmp_path,
                                                            switch):
    """The header's torchrun command with 2 processes instead of 4, on CPU (gloo): as written
    (DDP), and with its commented-out ``fsdp: true`` switched on by the flag."""
    name = "dpo_torchrun.yaml"
    argv = header_argv(name)
    assert argv[:3] == ["torchrun", "--nproc-per-node", "4"]
    done = torchrun(*argv[3:], *tiny_flags(workdir, tmp_path, config_class(name)), *switch)
    assert done.returncode == 0, done.stderr[-3000:]
    assert check_run(tmp_path / "run", name, "fsdp")["fsdp"] is bool(switch)
