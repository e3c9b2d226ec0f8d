"""The lecture's commands read their config from YAML, flags override it, and ``--help`` documents
every field (``dpokit optimal|partition|figures --config FILE.yaml``)."""

import dataclasses
import json

import pytest

from dpokit.config import load_config
from dpokit.lecture import figures
from dpokit.lecture.config import FiguresConfig, OptimalConfig, PartitionConfig
from tests.helpers import run_cli as run

COMMANDS = {"optimal": OptimalConfig, "partition": PartitionConfig, "figures": FiguresConfig}


def _squash(text):
    """Text without whitespace: help is wrapped (and may break at hyphens) to the terminal."""
    return "".join(text.split())


@pytest.mark.parametrize(("command", "config_cls"), COMMANDS.items())
def test_help_documents_every_field(capsys, command, config_cls):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "--config" in out
    for f in dataclasses.fields(config_cls):
        assert f.metadata["help"], f"{config_cls.__name__}.{f.name} has no help"
        assert f"--{f.name.replace('_', '-')}" in out, f.name
        assert _squash(f.metadata["help"]) in _squash(out), f.name


def test_optimal_reads_yaml_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "optimal.yaml"
    # A YAML list keeps a comma inside an outcome's name (on the command line "a,b" splits).
    cfg.write_text("betas: [0.5, 2]\noutcomes: ['a, b:0.5:0', 'c:0.5:1']\n"
                   "rewards: ['a, b=1']\njson: true\n", encoding="utf-8")
    code, out, err = run(capsys, "optimal", "--config", str(cfg))
    assert code == 0, err
    data = json.loads(out)
    assert [d["beta"] for d in data] == [0.5, 2.0]
    assert [o["name"] for o in data[0]["outcomes"]] == ["a, b", "c"]
    # Equal rewards after the override: π* = π_ref at every β.
    assert [o["optimal_prob"] for o in data[1]["outcomes"]] == pytest.approx([0.5, 0.5])

    code, out, err = run(capsys, "optimal", "--config", str(cfg), "-b", "3",
                         "--reward", "c=2")
    assert code == 0, err
    data = json.loads(out)  # one β: one object, not a list
    assert data["beta"] == 3.0
    assert [o["reward"] for o in data["outcomes"]] == [0.0, 2.0]  # flag replaced YAML's rewards


def test_partition_reads_yaml_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "partition.yaml"
    cfg.write_text("max_length: 2\nrate: 1e6\nspace_vocab: 3\nspace_length: 2\nbetas: [1]\n"
                   "samples: [10, 20]\nrepeats: 2\njson: true\n", encoding="utf-8")
    code, out, err = run(capsys, "partition", "--config", str(cfg))
    assert code == 0, err
    data = json.loads(out)
    assert len(data["growth"]) == 2 and data["rate"] == 1e6 and data["rate_measured"] is False
    assert data["space"] == {"vocab_size": 3, "length": 2, "num_sequences": 9}
    assert [(r["beta"], r["num_samples"]) for r in data["monte_carlo"]] == [(1.0, 10), (1.0, 20)]

    code, out, err = run(capsys, "partition", "--config", str(cfg), "--max-length", "3",
                         "--beta", "2", "-b", "0.5", "--samples", "30")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["growth"]) == 3
    assert [(r["beta"], r["num_samples"]) for r in data["monte_carlo"]] == [(2.0, 30), (0.5, 30)]


def test_figures_reads_yaml_and_flags_override_it(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(figures, "write_figures",
                        lambda out_dir, *, rate, on_written: calls.append((out_dir, rate)))
    cfg = tmp_path / "figures.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'yaml'}\nrate: 1e7\n", encoding="utf-8")
    assert run(capsys, "figures", "--config", str(cfg))[0] == 0
    assert run(capsys, "figures", "--config", str(cfg), "--out", str(tmp_path / "flag"))[0] == 0
    assert run(capsys, "figures", "--config", str(cfg), "--rate", "5")[0] == 0
    assert calls == [(str(tmp_path / "yaml"), 1e7), (str(tmp_path / "flag"), 1e7),
                     (str(tmp_path / "yaml"), 5.0)]


@pytest.mark.parametrize(("command", "yaml_text", "message"), [
    ("optimal", "beta: 1\n", "unknown key 'beta' (did you mean betas?)"),
    ("optimal", "betas: []\n", "betas must hold at least one β"),
    ("optimal", "betas: [1, .inf]\n", "beta must be a finite number > 0, got inf"),
    ("optimal", "outcomes: ['a:1:0']\ncsv: t.csv\n", "give outcomes or csv, not both"),
    ("optimal", "outcomes: ['a:1']\n", "outcomes 'a:1': expected NAME:REF_PROB:REWARD"),
    ("optimal", "ref_probs: [cats]\n", "ref_probs 'cats': expected NAME=VALUE"),
    ("optimal", "rewards: ['cats=high']\n", "rewards 'cats=high', field 'value': 'high'"),
    ("optimal", "outcomes: ['a:0.5:0', 'b:0.6:1']\n", "outcomes: reference probabilities sum"),
    ("optimal", "normalize: maybe\n", "normalize: expected bool, got 'maybe'"),
    ("partition", "samples: [10, 1]\n", "samples must all be ≥ 2, got [10, 1]"),
    ("partition", "samples: 10\n", "samples: expected list of int, got 10"),
    ("partition", "space_vocab: 0\n", "space_vocab must be ≥ 1, got 0"),
    ("partition", "rate: -1\n", "rate must be a finite number > 0, got -1.0"),
    ("figures", "rate: .nan\n", "rate must be a finite number > 0, got nan"),
    ("figures", "out: x\n", "unknown key 'out' (did you mean out_dir?)"),
])
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, capsys, command, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text, encoding="utf-8")
    code, out, err = run(capsys, command, "--config", str(cfg))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message in err, err


def test_defaults_are_the_old_flags_defaults():
    assert load_config(OptimalConfig) == OptimalConfig(
        betas=[1.0], outcomes=[], csv=None, rewards=[], ref_probs=[], normalize=False,
        prompt=None, json=False)
    assert load_config(PartitionConfig) == PartitionConfig(
        vocab_size=50257, max_length=8, rate=None, space_vocab=6, space_length=5,
        betas=[5.0, 1.0, 0.3, 0.1], samples=[10, 100, 1000, 10000], repeats=20, seed=0,
        json=False)
    assert load_config(FiguresConfig) == FiguresConfig(out_dir="out/figures", rate=None)
