"""Config integrity: YAML ↔ CLI ↔ ``config.yaml`` and the TRL mapping (review findings).

Each test asserts the correct behaviour; those from the review failed before their fix.
Most tests only parse and validate a config (no model is loaded); one trains a single step.
"""

import dataclasses

import pytest
import yaml

from dpokit.config import config_yaml, load_config
from dpokit.errors import DpokitError
from dpokit.train.config import DPOConfig, SFTConfig
from dpokit.trl_config import translate
from tests.helpers import run_cli

BASE = {"model": "m", "data": "d"}
TRL_BASE = {"model_name_or_path": "m", "dataset_name": "d"}


def _yaml(tmp_path, values, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values) if not isinstance(values, str) else values)
    return path


def _cli_config(monkeypatch, capsys, *argv):
    """``dpokit ARGV`` through the real click command, the config it would train captured
    instead of training: (exit code, config or None, stderr)."""
    from dpokit.train import loop

    seen = {}

    def fake_train(config):
        seen["config"] = config
        return "captured"

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(loop, "last_stop_signal", None, raising=False)
    code, _, err = run_cli(capsys, *argv)
    return code, seen.get("config"), err


# ------------------------------------------------------------------------- CLI vs YAML meaning


def test_cli_report_to_none_means_no_tracker(monkeypatch, capsys):
    """``--report-to none`` must mean report_to [none] (no tracker); it is parsed as null —
    the default, TensorBoard when installed — so the flag asking for no tracker enables one."""
    from dpokit.train.trackers import resolve_report_to

    code, config, err = _cli_config(monkeypatch, capsys, "train", "--model", "m", "--data", "d",
                                    "--report-to", "none")
    assert code == 0, err
    assert config.report_to == ["none"], config.report_to
    assert resolve_report_to(config.report_to) == []


def test_list_flag_spellings_agree(monkeypatch, capsys):
    """``a,b``, a YAML list and the flag repeated give the same list (and loss_weights floats)."""
    configs = []
    for spelling in (["--loss-type", "sigmoid,ipo"], ["--loss-type", "[sigmoid, ipo]"],
                     ["--loss-type", "sigmoid", "--loss-type", "ipo"]):
        code, config, err = _cli_config(monkeypatch, capsys, "train", "--model", "m", "--data",
                                        "d", *spelling, "--loss-weights", "1,5e-1")
        assert code == 0, err
        configs.append(config)
    assert all(c.loss_type == ["sigmoid", "ipo"] for c in configs)
    assert all(c.loss_weights == [1.0, 0.5] for c in configs)


def test_cli_overrides_yaml_null_and_back(tmp_path):
    path = _yaml(tmp_path, {**BASE, "max_steps": None, "max_grad_norm": 0.5,
                            "gradient_checkpointing": True})
    config = load_config(DPOConfig, path, {"max_steps": "3", "max_grad_norm": "null",
                                           "gradient_checkpointing": "null"})
    assert (config.max_steps, config.max_grad_norm, config.gradient_checkpointing) == (
        3, None, None)


# ------------------------------------------------------------------------- malformed YAML


@pytest.mark.parametrize("text", ["1: 2\nmodel: m\ndata: d\n", "null: 3\nmodel: m\ndata: d\n",
                                  "true: x\nmodel: m\ndata: d\n"])
def test_yaml_non_string_key_is_a_one_line_error(tmp_path, capsys, text):
    """A YAML key that is not a string (``1:``, ``null:``, ``true:``) must be a one-line
    ``dpokit: error`` (exit 2); it is an AttributeError traceback (``key.replace``)."""
    path = _yaml(tmp_path, text)
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "dpokit: error" in err and "Traceback" not in err, err


@pytest.mark.parametrize("text", ["model: m\ndata: d\nbeta: 0.1\nbeta: 0.5\n",
                                  "model: m\ndata: d\noutput_dir: a\noutput-dir: b\n"])
def test_yaml_duplicate_keys_are_refused(tmp_path, text):
    """Two values for one key (literally repeated, or spelt with - and _) must be refused
    naming it; the later value silently wins and the other is dropped."""
    path = _yaml(tmp_path, text)
    with pytest.raises(DpokitError, match=r"beta|output_dir|output-dir"):
        load_config(DPOConfig, path)


@pytest.mark.parametrize("text", ["- model\n- data\n", "just text\n", "42\n"])
def test_yaml_not_a_mapping_is_refused(tmp_path, text):
    with pytest.raises(DpokitError, match="expected a mapping"):
        load_config(DPOConfig, _yaml(tmp_path, text))


def test_yaml_anchors_and_merge_keys_are_read(tmp_path):
    text = "base: &b\n  beta: 0.3\n"  # an unknown key is refused even as an anchor holder
    with pytest.raises(DpokitError, match="unknown key 'base'"):
        load_config(DPOConfig, _yaml(tmp_path, text + "model: m\ndata: d\n"))
    text = "model: &m m\ndata: *m\nloss_type: &l [sigmoid, ipo]\n"
    config = load_config(DPOConfig, _yaml(tmp_path, text))
    assert (config.data, config.loss_type) == ("m", ["sigmoid", "ipo"])


# ------------------------------------------------------------------------- contradictions


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_use_weighting_with_sorting_losses_is_refused(tmp_path, loss):
    """aot/aot_unpaired sort the batch before the loss, so per-pair WPO weights multiply the
    wrong pairs (dpokit.losses.dpo multiplies the sorted losses elementwise). TRL 1.16 refuses
    the combination; dpokit accepts it and trains with misaligned weights."""
    path = _yaml(tmp_path, {**BASE, "loss_type": [loss], "use_weighting": True})
    with pytest.raises(DpokitError, match="use_weighting"):
        load_config(DPOConfig, path)


def test_missing_eos_penalty_without_online_is_refused(tmp_path):
    """missing_eos_penalty is read only by online training; set offline it is silently ignored
    (reward set offline is refused: the same contradiction)."""
    path = _yaml(tmp_path, {**BASE, "missing_eos_penalty": 1.0})
    with pytest.raises(DpokitError, match="missing_eos_penalty"):
        load_config(DPOConfig, path)


def test_ref_model_with_a_reference_free_loss_is_refused(tmp_path):
    """ref_model with simpo (no reference) is silently ignored (setup loads no reference),
    while sync_ref_model with such a loss is refused as a contradiction."""
    path = _yaml(tmp_path, {**BASE, "loss_type": ["simpo"], "ref_model": "ref"})
    with pytest.raises(DpokitError, match="ref_model"):
        load_config(DPOConfig, path)


# ------------------------------------------------------------------------- TRL mapping


def test_trl_use_peft_without_target_modules_means_peft_default(tmp_path):
    """TRL's ModelConfig.lora_target_modules defaults to None (get_peft_config passes it to
    LoraConfig: peft's per-architecture default, q_proj/v_proj for Llama). A TRL file with
    use_peft and no lora_target_modules gets dpokit's ['all-linear'] instead: every linear
    layer adapted, a different run."""
    config = load_config(DPOConfig, _yaml(tmp_path, {**TRL_BASE, "use_peft": True}))
    assert config.lora is True
    assert config.lora_target_modules is None, config.lora_target_modules


def test_trl_constant_scheduler_has_no_warmup(tmp_path):
    """transformers' ``constant`` schedule ignores warmup_steps (get_scheduler returns
    get_constant_schedule without it); dpokit's constant is constant_with_warmup, so a TRL
    file with ``lr_scheduler_type: constant, warmup_steps: 10`` warms up in dpokit only."""
    path = _yaml(tmp_path, {**TRL_BASE, "lr_scheduler_type": "constant", "warmup_steps": 10})
    try:
        config = load_config(DPOConfig, path)
    except DpokitError as error:  # refusing the combination, naming it, is correct too
        assert "lr_scheduler_type" in str(error) or "warmup_steps" in str(error)
        return
    assert config.warmup(100) == 0


def test_trl_constant_with_warmup_keeps_its_warmup(tmp_path):
    path = _yaml(tmp_path, {**TRL_BASE, "lr_scheduler_type": "constant_with_warmup",
                            "warmup_steps": 10})
    config = load_config(DPOConfig, path)
    assert (config.lr_scheduler, config.warmup(100)) == ("constant", 10)


def test_trl_dtype_null_loads_the_checkpoint_dtype(tmp_path):
    """The TRL script passes ``dtype=model_args.dtype`` to create_model_from_path; with
    ``dtype: null`` that is from_pretrained(dtype=None), which transformers 5 turns into
    "auto" (a bfloat16 checkpoint loads in bfloat16; checked with TRL 1.16 in /tmp/bv).
    dpokit reads null as float32."""
    path = _yaml(tmp_path, {**TRL_BASE, "dtype": None})
    config = load_config(DPOConfig, path)
    assert config.dtype == "auto", config.dtype


def test_trl_eval_steps_default_to_logging_steps(tmp_path):
    """TrainingArguments: eval_strategy steps with eval_steps unset evaluates every
    logging_steps. dpokit leaves eval_steps null (evaluate only at the end)."""
    path = _yaml(tmp_path, {**TRL_BASE, "eval_strategy": "steps", "logging_steps": 5})
    config = load_config(DPOConfig, path)
    assert config.eval_data == "d" and config.eval_strategy == "steps"
    assert config.eval_steps == 5, config.eval_steps


def test_trl_data_seed_is_not_silently_dropped(tmp_path):
    """data_seed seeds the training sampler in transformers (accelerate's seedable sampler),
    so data_seed: 7 with seed: 42 trains on another data order than seed alone. dpokit lists
    it as having no effect at any value and orders the data by seed."""
    path = _yaml(tmp_path, {**TRL_BASE, "seed": 42, "data_seed": 7})
    with pytest.raises(DpokitError, match="data_seed"):
        load_config(DPOConfig, path)


@pytest.mark.parametrize(("key", "value"), [
    ("fsdp", 1), ("fsdp", [1]), ("fsdp", {"a": 1}), ("report_to", 5),
    ("lr_scheduler_type", ["linear"]), ("max_steps", "abc"), ("max_steps", [1]),
])
def test_trl_malformed_values_are_one_line_errors(tmp_path, capsys, key, value):
    """A wrong type for a TRL key that translate() converts must be a one-line error naming
    the key; these raise TypeError/ValueError/AttributeError tracebacks."""
    path = _yaml(tmp_path, {**TRL_BASE, key: value})
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert key in lines[0], lines[0]


def test_trl_renamed_key_with_true_is_read_or_refused_by_its_name(tmp_path):
    """``resume_from_checkpoint: true`` is TRL's "the last checkpoint in output_dir" (dpokit's
    resume: auto). It is refused as ``resume: expected str or null`` — a key the file does
    not have."""
    path = _yaml(tmp_path, {**TRL_BASE, "resume_from_checkpoint": True})
    try:
        config = load_config(DPOConfig, path)
    except DpokitError as error:
        assert "resume_from_checkpoint" in str(error), str(error)
        return
    assert config.resume == "auto"


def test_cli_fp16_over_a_trl_file(tmp_path):
    """TRL's bf16 is ``not fp16`` when unset, so ``--fp16`` over a TRL file that sets neither
    trains in float16. dpokit applies bf16: true before the flag, then refuses 'bf16 and fp16
    are both set' — a bf16 the user never set."""
    config = load_config(DPOConfig, _yaml(tmp_path, TRL_BASE), {"fp16": "true"})
    assert (config.fp16, config.bf16) == (True, False)


def test_cli_no_lora_over_a_trl_peft_file(tmp_path):
    """``--no-lora`` over a TRL file with use_peft: dpokit's TRL default lora_dropout 0.05 stays
    and the run is refused as 'lora_dropout set but lora is false' — a key the user never
    set. (TRL reads lora_* only with use_peft.)"""
    config = load_config(DPOConfig, _yaml(tmp_path, {**TRL_BASE, "use_peft": True}),
                         {"lora": "false"})
    assert config.lora is False


def test_trl_keys_that_mean_the_same_pass_through(tmp_path):
    values = {**TRL_BASE, "loss_type": ["sigmoid", "ipo"], "loss_weights": [1, 0.5],
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
              "num_train_epochs": 0.5, "max_steps": -1, "learning_rate": "1e-5",
              "warmup_steps": 0.1, "precompute_ref_log_probs": True, "eval_strategy": "epoch",
              "report_to": "none", "save_strategy": "epoch"}
    config = load_config(DPOConfig, _yaml(tmp_path, values))
    assert (config.loss_type, config.loss_weights) == (["sigmoid", "ipo"], [1.0, 0.5])
    assert (config.batch_size, config.gradient_accumulation_steps) == (4, 2)
    assert (config.num_epochs, config.max_steps, config.learning_rate) == (0.5, None, 1e-5)
    assert config.warmup(100) == 10 and config.precompute_ref_logps is True
    assert (config.eval_data, config.eval_split, config.eval_strategy) == ("d", "test", "epoch")
    assert config.report_to == ["none"] and config.save_strategy == "epoch"


@pytest.mark.parametrize(("key", "value"), [("logging_steps", 0.5), ("save_steps", 0.25),
                                            ("eval_steps", 0.1)])
def test_trl_step_ratios_are_refused(tmp_path, key, value):
    with pytest.raises(DpokitError, match=key):
        load_config(DPOConfig, _yaml(tmp_path, {**TRL_BASE, key: value}))


def test_trl_sft_loss_type_and_defaults(tmp_path):
    config = load_config(SFTConfig, _yaml(tmp_path, {**TRL_BASE, "loss_type": "nll"}))
    assert (config.loss_normalization, config.completion_only_loss) == ("token", None)
    with pytest.raises(DpokitError, match="loss_type"):
        load_config(SFTConfig, _yaml(tmp_path, {**TRL_BASE, "loss_type": "dft"}))


def test_translate_is_pure():
    values = {**TRL_BASE, "loss_type": "ipo", "report_to": "wandb"}
    before = dict(values)
    translate(values)
    assert values == before


# ------------------------------------------------------------------------- config.yaml


def test_config_yaml_round_trips_non_defaults(tmp_path):
    values = {**BASE, "split": "none", "eval_data": "e", "eval_split": "null",
              "run_name": "1.10", "report_to": ["none"], "warmup_steps": 0.5,
              "loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5],
              "max_grad_norm": None, "max_steps": 5, "lora": True,
              "lora_target_modules": None, "lora_dropout": 0.1,
              "gradient_checkpointing": False, "project": "on", "prompt_column": "yes"}
    config = load_config(DPOConfig, _yaml(tmp_path, values))
    again = load_config(DPOConfig, _yaml(tmp_path, config_yaml(config), "again.yaml"))
    assert dataclasses.asdict(again) == dataclasses.asdict(config)


def test_a_run_config_yaml_reproduces_the_run(tmp_path, workdir, capsys):
    """One step from flags; the written config.yaml read back is the same config, and
    training from it (another output_dir) gives the same loss."""
    import json

    argv = ["train", "--model", str(workdir / "llama"), "--data", str(workdir / "prefs.jsonl"),
            "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--logging-steps",
            "1", "--save-strategy", "no", "--loss-type", "sigmoid,ipo", "--loss-weights",
            "1,0.5", "--report-to", "tensorboard", "--no-tokenized-cache"]
    code, _, err = run_cli(capsys, *argv, "--output-dir", str(tmp_path / "a"))
    assert code == 0, err[-2000:]
    written = tmp_path / "a" / "config.yaml"
    config = load_config(DPOConfig, written)
    assert config.loss_weights == [1.0, 0.5] and config.report_to == ["tensorboard"]
    code, _, err = run_cli(capsys, "train", "--config", str(written), "--output-dir",
                           str(tmp_path / "b"))
    assert code == 0, err[-2000:]
    losses = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
              for run in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
