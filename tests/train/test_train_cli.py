"""`dpokit train`/`sft` flags and YAML, bad configs, SIGTERM, and 2 processes under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_metrics, torchrun
from tests.helpers import run_cli as run

DPOKIT = [sys.executable, "-m", "dpokit"]




@pytest.mark.parametrize(("yaml_text", "flags", "message"), [
    ("beta: 0\n", [], "beta must be a finite number > 0, got 0.0"),
    ("", ["--batch-size", "0"], "batch_size must be ≥ 1, got 0"),
    ("", ["--label-smoothing", "0.5"], "label_smoothing must be in [0, 0.5)"),
    ("bta: 0.1\n", [], "unknown key 'bta' (did you mean beta?)"),
    ("beta: fast\n", [], "beta: expected float, got 'fast'"),
    ("", ["--loss-type", "magic"], "unknown loss_type 'magic'"),
    ("learning_rate: [1, 2]\n", [], "learning_rate: expected float"),
    ("- just\n- a list\n", [], "expected a mapping of config keys"),
    ("beta: [unclosed\n", [], "not valid YAML"),
    ("loss_type: [simpo]\nsync_ref_model: true\n", [], "uses none"),
    ("", ["--adam-beta1", "1.5"], "adam_beta1 and adam_beta2 must be in [0, 1)"),
    ("", ["--num-epochs", "inf"], "num_epochs must be a finite number"),
    ("", ["--device", "gpu"], "device must be auto, cpu, mps, cuda or cuda:N"),
    ("", ["--seed", "100000000000000000"], "seed must be in [0, 2^32)"),
])
def test_bad_configs_are_rejected_before_loading_a_model(tmp_path, capsys, yaml_text, flags,
                                                         message):
    cfg = tmp_path / "cfg.yaml"
    prefix = "model: /nonexistent/model\ndata: /nonexistent/data.jsonl\n"
    cfg.write_text(yaml_text if yaml_text.startswith("-") else prefix + yaml_text)
    code, out, err = run(capsys, "train", "--config", str(cfg), *flags)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message in err, err
    assert "nonexistent" not in err  # rejected before the model or data were touched


def test_flags_override_yaml_and_underscore_spelling_works(workdir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {workdir / 'llama'}\ndata: {workdir / 'prefs.jsonl'}\n"
                   f"output_dir: {tmp_path / 'ignored'}\nbeta: 5.0\nmax_steps: 2\n"
                   f"logging_steps: 1\nsave_steps: null\n")
    code, _, err = run(capsys, "train", "--config", str(cfg), "--output_dir",
                       str(tmp_path / "run"), "--beta", "0.25", "--no-padding-free",
                       "--batch-size", "4", "--no-shared-prompt", "--loss-type",
                       "[sigmoid, sft]", "--loss-weights", "1,0.5")
    assert code == 0, err
    assert not (tmp_path / "ignored").exists()
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "beta: 0.25" in resolved and "batch_size: 4" in resolved
    assert "shared_prompt: false" in resolved and "precompute_ref_logps: null" in resolved
    assert "- sft" in resolved and "- 0.5" in resolved
    assert len(read_metrics(tmp_path / "run")) == 2


@pytest.mark.parametrize(("flags", "expected"), [
    ([], True),                                           # the YAML's value
    (["--gradient-checkpointing", "auto"], None),         # back to the automatic choice
    (["--gradient-checkpointing", "null"], None),
    (["--gradient-checkpointing", "--beta", "0.2"], True),  # alone: true
    (["--gradient-checkpointing", "false"], False),
    (["--no-gradient-checkpointing"], False),
    (["--no_gradient_checkpointing", "--gradient-checkpointing", "false"], False),
])
def test_an_optional_boolean_flag_sets_true_false_or_auto(tmp_path, flags, expected):
    """A YAML's ``gradient_checkpointing: true`` can be set back to null (auto) by a flag; a
    string field whose value is "auto" (``resume``) is not touched."""
    from click.testing import CliRunner

    from dpokit.cli.options import config_command
    from dpokit.train.config import DPOConfig

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: m\ndata: d.jsonl\ngradient_checkpointing: true\n")
    seen = []
    command = config_command("train", DPOConfig, seen.append, summary="")
    result = CliRunner().invoke(command, ["--config", str(cfg), "--resume", "auto", *flags])
    assert result.exit_code == 0, result.output
    assert seen[0].gradient_checkpointing is expected
    assert seen[0].resume == "auto" and seen[0].selective_checkpointing is None


def test_contradicting_optional_boolean_flags_are_refused(capsys):
    code, out, err = run(capsys, "train", "--model", "m", "--data", "d.jsonl",
                         "--gradient-checkpointing", "true", "--no-gradient-checkpointing")
    assert code == 2 and out == ""
    assert "--gradient-checkpointing true and --no-gradient-checkpointing contradict" in err


def test_help_documents_every_field_with_its_default(capsys):
    from dpokit.config import field_help
    from dpokit.train.config import DPOConfig

    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for flag, _, default, _ in field_help(DPOConfig):
        assert flag in flat
        shown = "[required]" if default == "(required)" else f"[default: {default!r}]"
        assert shown in flat, (flag, shown)


def test_sigterm_saves_a_checkpoint_and_resume_continues(workdir, tmp_path):
    out = tmp_path / "sig"
    args = [*DPOKIT, "train", "--model", str(workdir / "llama"), "--data",
            str(workdir / "prefs.jsonl"), "--output-dir", str(out), "--batch-size", "2",
            "--lr-scheduler", "constant",  # so the resumed run may be shorter (its own length)
            "--max-steps", "100000", "--logging-steps", "1", "--save-steps", "100000"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n")
            >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, err = process.communicate(timeout=120)
    assert process.returncode == 143, err  # 128 + SIGTERM: a scheduler sees the interruption
    assert "stopped by signal" in err and "resume with --resume auto" in stdout
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] == step >= 2
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint left
    resumed = subprocess.run([*args[:-6], "--batch-size", "2", "--max-steps", str(step + 2),
                              "--logging-steps", "1", "--resume", "auto"],
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_metrics(out)] == list(range(1, step + 3))


def test_two_processes_match_one(workdir, tmp_path):
    """torchrun with 2 gloo processes × batch 2 = 1 process × batch 4 (losses, final weights)."""
    eval_rows = (workdir / "prefs.jsonl").read_text().splitlines()[:3]  # 3 rows on 2 ranks
    (tmp_path / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    common = ["--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
              "--max-steps", "3", "--logging-steps", "1", "--save-steps", "1000",
              "--learning-rate", "1e-3", "--beta", "0.5", "--lr-scheduler", "constant",
              "--eval-data", str(tmp_path / "eval.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([*DPOKIT, "train", *common, "--batch-size", "4", "--output-dir",
                             str(tmp_path / "one")], capture_output=True, text=True, env=env,
                            check=False)
    assert single.returncode == 0, single.stderr
    double = torchrun("-m", "dpokit", "train", *common, "--batch-size", "2", "--device", "cpu",
                      "--output-dir", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        key = "loss" if "loss" in a else "eval/loss"  # the last line is the evaluation
        assert a[key] == pytest.approx(b[key], abs=1e-5)
        assert a.get("rewards/accuracies") == b.get("rewards/accuracies")
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-5)


def test_fsdp_two_processes_match_one_and_resume_exactly(workdir, tmp_path):
    """FSDP2 (fully_shard) on 2 gloo processes: same losses and weights as 1 process, and a
    sharded checkpoint (torch.distributed.checkpoint) resumes to the same result."""
    common = ["--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
              "--logging-steps", "1", "--learning-rate", "1e-3", "--beta", "0.5",
              "--lr-scheduler", "constant", "--save-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sharded = ["-m", "dpokit", "train", "--fsdp", "--device", "cpu", "--batch-size", "2",
               *common]

    def launch(out, steps, *extra):
        tail = ["--output-dir", str(tmp_path / out), "--max-steps", str(steps), *extra]
        if out == "single":
            done = subprocess.run([*DPOKIT, "train", "--batch-size", "4", *common, *tail],
                                  capture_output=True, text=True, env=env, check=False,
                                  timeout=300)
        else:
            done = torchrun(*sharded, *tail)
        assert done.returncode == 0, done.stderr[-3000:]

    launch("single", 4)
    launch("fsdp", 4)
    launch("fsdp-resumed", 2)
    assert (tmp_path / "fsdp-resumed" / "checkpoint-2" / "sharded").is_dir()
    launch("fsdp-resumed", 4, "--resume", "auto")
    single, fsdp, resumed = (read_metrics(tmp_path / name)
                             for name in ("single", "fsdp", "fsdp-resumed"))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b, c in zip(single, fsdp, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert c["loss"] == pytest.approx(b["loss"], abs=1e-6)
    weights = [load_file(str(tmp_path / name / "final" / "model.safetensors"))
               for name in ("single", "fsdp", "fsdp-resumed")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-5)
        torch.testing.assert_close(weights[2][name], weights[1][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_registry_hyper_parameter_is_a_key_and_a_flag(capsys, command):
    """A loss's declared hyper-parameters become config keys and flags of train and eval by
    themselves, with the registry's default and help, and the loss names appear in --help."""
    import dataclasses

    from dpokit.evaluate import EvalConfig
    from dpokit.losses import hyper_parameters, loss_names
    from dpokit.train.config import DPOConfig

    cls = {"train": DPOConfig, "eval": EvalConfig}[command]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    code, out, _ = run(capsys, command, "--help")
    flat = " ".join(out.split())
    assert code == 0 and all(name in flat for name in loss_names())
    for name, spec in hyper_parameters().items():
        assert defaults[name] == spec.default
        assert f"--{name.replace('_', '-')}" in flat and " ".join(spec.help.split()) in flat


@pytest.mark.parametrize(("loss", "smoothing", "accepted"), [
    ("exo_pair", 0.7, True), ("exo_pair", 0.0, False), ("sigmoid", 0.7, False),
    ("robust", 0.3, True), ("ipo", 0.1, False)])
def test_config_validation_is_the_losses_own(loss, smoothing, accepted):
    """One validation: the config asks the registry's declared ranges (exo_pair takes ε in
    (0, 1), sigmoid [0, 0.5); a loss that reads no ε refuses a non-zero one)."""
    from dpokit.config import build_config
    from dpokit.errors import DpokitError
    from dpokit.losses import check_loss_options
    from dpokit.train.config import DPOConfig

    values = {"model": "m", "data": "d", "loss_type": [loss], "label_smoothing": smoothing}
    try:
        check_loss_options([loss], {"label_smoothing": smoothing})
        direct = None
    except DpokitError as error:
        direct = str(error)
    if accepted:
        assert direct is None
        assert build_config(DPOConfig, values).label_smoothing == smoothing
    else:
        with pytest.raises(DpokitError) as caught:
            build_config(DPOConfig, values)
        assert str(caught.value) == direct


def test_fsdp_bf16_gathers_bfloat16_layers_over_float32_shards(workdir, tmp_path):
    """``--fsdp --bf16`` on float32 weights: FSDP2's MixedPrecisionPolicy (bf16 compute, fp32
    reduce), float32 master shards — the saved weights are float32 — and a finite run whose
    step-1 rewards are bf16 rounding away from 0 (policy = reference at step 1)."""
    from dpokit.config import load_config
    from dpokit.train.config import DPOConfig
    from dpokit.train.setup import fsdp_mixed_precision

    def policy(**keys):
        values = {"model": str(workdir / "llama"), "data": str(workdir / "prefs.jsonl"), **keys}
        return fsdp_mixed_precision(load_config(DPOConfig, None, values))

    mixed = policy(bf16="true")
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert policy() is None and policy(bf16="true", dtype="bfloat16") is None
    assert policy(fp16="true") is None
    done = torchrun("-m", "dpokit", "train", "--fsdp", "--bf16", "--device", "cpu",
                    "--batch-size", "2", "--model", workdir / "llama",
                    "--data", workdir / "prefs.jsonl", "--max-steps", "2",
                    "--logging-steps", "1", "--save-steps", "null",
                    "--output-dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    first = read_metrics(tmp_path / "out")[0]
    assert abs(first["rewards/chosen"]) < 1e-2 and first["loss"] == pytest.approx(0.6931, abs=1e-2)
    saved = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
