"""TRL 1.16 config files (issue 13): read with TRL's names and meanings, every key honoured or
refused with a reason, and ``dpokit config convert`` writing the native equivalent."""

import json

import pytest
import yaml

from dpokit.config import load_config
from dpokit.train.config import DPOConfig
from dpokit.trl_config import TRL_ONLY, is_trl, translate
from tests.helpers import run_cli

# TRL 1.16's DPOConfig-only fields, ModelConfig, ScriptArguments and the TrainingArguments a DPO
# user sets, each at TRL's default (read from trl 1.16 / transformers 5 dataclasses).
TRL_DEFAULTS = {
    # DPOConfig
    "model_init_kwargs": None, "trust_remote_code": False, "router_aux_loss_coef": None,
    "dataset_num_proc": None, "max_length": 1024, "truncation_mode": "keep_start",
    "padding_free": False, "pad_to_multiple_of": "auto", "precompute_ref_log_probs": False,
    "precompute_ref_batch_size": None, "loss_type": ["sigmoid"], "loss_weights": None,
    "ld_alpha": None, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
    "label_smoothing": 0.0, "beta": 0.1, "use_weighting": False, "discopop_tau": 0.05,
    "activation_offloading": False, "sync_ref_model": False, "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512, "pad_token": None, "disable_dropout": True,
    # ModelConfig
    "model_name_or_path": "m", "model_revision": "main", "dtype": "float32",
    "attn_implementation": None, "use_peft": False, "lora_r": 16, "lora_alpha": 32,
    "lora_dropout": 0.05, "lora_target_modules": None, "lora_target_parameters": None,
    "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
    "use_dora": False, "load_in_8bit": False, "load_in_4bit": False,
    "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False, "bnb_4bit_quant_storage": None,
    # ScriptArguments
    "dataset_name": "d", "dataset_config": None, "dataset_train_split": "train",
    "dataset_test_split": "test", "dataset_streaming": False, "ignore_bias_buffers": False,
    # TrainingArguments
    "output_dir": "out", "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1, "learning_rate": 1e-6, "weight_decay": 0.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
    "num_train_epochs": 3.0, "max_steps": -1, "lr_scheduler_type": "linear", "warmup_steps": 0,
    "logging_steps": 10, "save_steps": 500, "save_total_limit": None, "eval_steps": None,
    "eval_strategy": "no", "save_strategy": "steps", "logging_strategy": "steps", "seed": 42,
    "bf16": None, "fp16": False, "tf32": None, "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": None, "report_to": "none", "run_name": None,
    "resume_from_checkpoint": None, "push_to_hub": False, "hub_model_id": None,
    "dataloader_num_workers": 0, "remove_unused_columns": True, "deepspeed": None,
    "fsdp": None, "optim": "adamw_torch_fused", "logging_first_step": False,
    "do_train": False, "do_eval": False, "torch_compile": False,
    "ddp_find_unused_parameters": None, "label_names": None, "load_best_model_at_end": False,
    "metric_for_best_model": None, "lr_scheduler_kwargs": None, "save_only_model": False,
    "eval_on_start": False, "data_seed": None, "full_determinism": False,
    "dataloader_drop_last": False, "bf16_full_eval": False, "use_cpu": False, "local_rank": -1,
    "log_level": "passive", "disable_tqdm": None, "include_num_input_tokens_seen": "no",
    "average_tokens_across_devices": True, "ddp_timeout": 1800,
}


def assert_every_key_accounted_for(values, config_cls):
    """``translate(values)`` for ``config_cls``: every result is one of its fields, and every
    TRL key is passed on, converted (a note says into what) or listed as having no effect."""
    result = translate(values, known=config_cls.__dataclass_fields__)
    fields = set(config_cls.__dataclass_fields__)
    noted = {key for key, _ in result.notes}
    assert set(result.values) <= fields, set(result.values) - fields
    for key in values:
        assert key in result.values or key in noted or key in result.no_effect, key


def test_every_common_trl_key_at_its_default_is_read():
    """A YAML of every key above at TRL's default: nothing raises, and every key is accounted
    for — passed to a DPOConfig field, converted (a note says into what) or listed as having
    no effect on the result. Nothing vanishes unmentioned."""
    assert_every_key_accounted_for(TRL_DEFAULTS, DPOConfig)


def test_the_yaml_of_every_key_builds_a_dpokit_config(tmp_path, workdir):
    values = {**TRL_DEFAULTS, "model_name_or_path": str(workdir / "llama"),
              "dataset_name": str(workdir / "prefs.jsonl"), "output_dir": str(tmp_path / "o")}
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(values))
    config = load_config(DPOConfig, path)
    assert (config.model, config.batch_size, config.num_epochs, config.max_steps) == (
        str(workdir / "llama"), 8, 3.0, None)
    assert (config.lora, config.save_total_limit, config.eval_strategy) == (False, None, "no")
    assert config.lora_dropout == 0.0  # lora_* are read only with use_peft, as in TRL
    assert config.precompute_ref_logps is False and config.dtype == "float32"
    assert config.bf16 is True and config.fp16 is False  # TRL's bf16 default: autocast


def test_a_dpokit_config_is_not_trl():
    assert not is_trl({"model": "m", "data": "d", "batch_size": 2, "dtype": "bfloat16"})
    assert is_trl({"model_name_or_path": "m"})
    for key in ("dtype", "bf16", "fp16"):  # in both, one meaning: the other keys decide
        assert key not in TRL_ONLY


@pytest.mark.parametrize(("values", "expected"), [
    ({"bf16": True}, {"bf16": True}),
    ({"fp16": True}, {"fp16": True, "bf16": "unset"}),  # TRL: bf16 defaults to not fp16
    ({}, {"bf16": True, "dtype": "unset"}),  # load float32, compute bf16, as TRL
    # an explicit null reaches from_pretrained(dtype=None): transformers 5's auto
    ({"bf16": None, "dtype": None}, {"bf16": True, "dtype": "auto"}),
    ({"bf16": False}, {"bf16": False}),
    ({"dtype": "bfloat16"}, {"dtype": "bfloat16"}),
    ({"dtype": "auto"}, {"dtype": "auto"}),
    ({"torch_dtype": "float16"}, {"dtype": "float16"}),
    ({"max_steps": -1}, {"max_steps": None}),
    ({"max_steps": 7}, {"max_steps": 7}),
    ({"fsdp": "full_shard auto_wrap"}, {"fsdp": True}),
    ({"fsdp": ""}, {"fsdp": False}),
    ({"lr_scheduler_type": "constant_with_warmup"}, {"lr_scheduler": "constant"}),
    ({"model_name_or_path": "Org/M", "model_revision": "v2"}, {"model": "Org/M@v2"}),
    ({"dataset_name": "d", "eval_strategy": "steps", "dataset_test_split": "dev"},
     {"eval_data": "d", "eval_split": "dev"}),
    ({"use_cpu": True}, {"device": "cpu"}),
    ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
    ({"report_to": "wandb"}, {"report_to": ["wandb"]}),
    ({"truncation_mode": "keep_end"}, {"truncation_mode": "keep_end"}),
    ({"report_to": "none"}, {"report_to": ["none"]}),
    ({"report_to": []}, {"report_to": ["none"]}),
    ({"report_to": ["tensorboard", "trackio"]}, {"report_to": ["tensorboard", "trackio"]}),
    ({"run_name": "exp-1", "project": "p"}, {"run_name": "exp-1", "project": "p"}),
    ({"resume_from_checkpoint": "out/checkpoint-4"}, {"resume": "out/checkpoint-4"}),
    ({"ddp_timeout": 7200}, {"ddp_timeout": 7200}),
    ({"dataset_num_proc": 4}, {"dataset_num_proc": 4}),  # tokenises in 4 processes
])
def test_keys_converted_to_their_dpokit_meaning(values, expected):
    out = translate({"use_peft": False, **values}).values
    for key, value in expected.items():
        assert out.get(key, "unset") == value, (key, out)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("deepspeed", "ds.json", "use fsdp: true with torchrun"),
    ("load_in_4bit", True, "QLoRA"),
    ("report_to", "mlflow", "tensorboard, wandb and trackio"),
    ("trackio_space_id", "me/space", "locally"),
    ("optim", "sgd", "AdamW"),
    ("push_to_hub", True, "hf upload"),
    ("fsdp", "full_shard offload", "not supported"),
    ("eval_steps", 0.1, "fraction of the run"),
])
def test_keys_dpokit_cannot_honour_are_refused_with_a_reason(tmp_path, workdir, capsys, key,
                                                             value, says):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": str(workdir / "prefs.jsonl"), key: value}))
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and key in lines[0] and says in lines[0], lines[0]


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_trl_yaml_trains_like_its_conversion_and_its_native_twin(tmp_path, workdir, capsys):
    """The TRL file, `dpokit config convert` of it, and the same settings in dpokit's keys: the
    same losses (and the TRL file's read is announced once)."""
    trl = {"model_name_or_path": str(workdir / "llama"),
           "dataset_name": str(workdir / "prefs.jsonl"), "per_device_train_batch_size": 4,
           "max_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
           "logging_steps": 1, "beta": 0.5, "loss_type": "sigmoid", "max_length": 64,
           "report_to": "none", "dataloader_num_workers": 2, "bf16": False,
           "save_strategy": "no", "output_dir": str(tmp_path / "trl")}
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(trl))
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 0, err[-2000:]
    assert err.count("read as a TRL config") == 1 and "dataloader_num_workers" in err
    code, converted, err = run_cli(capsys, "config", "convert", str(path))
    assert code == 0, err
    assert "# per_device_train_batch_size → batch_size: 4" in converted
    native = yaml.safe_load(converted)
    native["output_dir"] = str(tmp_path / "converted")
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(native))
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "native.yaml"))
    assert code == 0, err[-2000:]
    assert "read as a TRL config" not in err
    code, _, err = run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data",
                           str(workdir / "prefs.jsonl"), "--batch-size", "4", "--max-steps",
                           "2", "--learning-rate", "1e-3", "--lr-scheduler", "constant",
                           "--logging-steps", "1", "--beta", "0.5", "--max-length", "64",
                           "--save-strategy", "no", "--num-epochs", "3",
                           "--output-dir", str(tmp_path / "twin"))
    assert code == 0, err[-2000:]
    runs = [_metrics(tmp_path / name) for name in ("trl", "converted", "twin")]
    for records in zip(*runs, strict=True):
        assert records[0]["loss"] == pytest.approx(records[1]["loss"], abs=0)
        assert records[0]["loss"] == pytest.approx(records[2]["loss"], abs=1e-6)


def test_convert_refuses_a_native_config(tmp_path, capsys):
    path = tmp_path / "native.yaml"
    path.write_text("model: m\ndata: d\n")
    code, _, err = run_cli(capsys, "config", "convert", str(path))
    assert code == 2 and "already a dpokit config" in err


def test_flags_still_override_a_trl_file(tmp_path, workdir):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": "d", "per_device_train_batch_size": 4}))
    assert load_config(DPOConfig, path, {"batch_size": "2"}).batch_size == 2


def test_trl_flags_are_read_as_trl_dpo_takes_them():
    """``trl dpo --config dpo.yaml --per_device_train_batch_size 4`` — TRL's flag forms: a value,
    ``=value``, several values (a list), a boolean alone, ``--no_x``, dashes, negative and
    YAML-1.1-text numbers (``5e-7``)."""
    from dpokit.cli.options import trl_flag_values

    flags = trl_flag_values(["--per_device_train_batch_size", "4", "--learning-rate=5e-7",
                             "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
                             "--no_bf16", "--max_steps", "-1", "--dataset_name", "d.jsonl",
                             "--max_length", "None"], known=["bf16"])
    assert flags == {"per_device_train_batch_size": 4, "learning_rate": 5e-7, "use_peft": True,
                     "lora_target_modules": ["q_proj", "v_proj"], "bf16": False,
                     "max_steps": -1, "dataset_name": "d.jsonl", "max_length": "None"}
    import click

    with pytest.raises(click.UsageError, match="unexpected argument 'stray'"):
        trl_flag_values(["stray", "--beta", "0.1"])


def test_trl_flags_override_a_trl_file_and_dpokit_flags_override_both(tmp_path, workdir):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": "d", "per_device_train_batch_size": 4,
                                    "num_train_epochs": 2}))
    config = load_config(DPOConfig, path, {}, {"per_device_train_batch_size": 2,
                                               "lr_scheduler_type": "constant",
                                               "max_length": "None"})
    assert (config.batch_size, config.num_epochs, config.lr_scheduler) == (2, 2.0, "constant")
    assert config.max_length is None  # "None" read as TRL's parser reads it for an int field
    config = load_config(DPOConfig, path, {"batch_size": "3"},
                         {"per_device_train_batch_size": 2})
    assert config.batch_size == 3
    # TRL flags alone (no file) are a TRL config too, with TRL's defaults (3 epochs)
    config = load_config(DPOConfig, None, {}, {"model_name_or_path": str(workdir / "llama"),
                                               "dataset_name": "d"})
    assert config.model == str(workdir / "llama") and config.num_epochs == 3.0


def test_trl_flags_on_the_command_line(tmp_path, workdir, capsys):
    """Through the CLI: a TRL flag reaches the config (its value checked as dpokit's key), a
    TRL flag with a dpokit file is refused naming it (with the dpokit flag it resembles), and
    commands other than train/sft keep click's own refusal."""
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(workdir / "llama"),
                                    "dataset_name": str(workdir / "prefs.jsonl")}))
    code, _, err = run_cli(capsys, "train", "--config", str(path),
                           "--per_device_train_batch_size", "0")
    assert code == 2 and "batch_size must be ≥ 1" in err and "Traceback" not in err, err
    native = tmp_path / "native.yaml"
    native.write_text(yaml.safe_dump({"model": str(workdir / "llama"), "data": "d"}))
    code, _, err = run_cli(capsys, "train", "--config", str(native), "--batch_sise", "2")
    lines = [x for x in err.splitlines() if "error" in x]
    assert code == 2 and len(lines) == 1, err
    assert "No such option '--batch-sise'" in lines[0] and "'--batch-size'" in lines[0], lines[0]
    code, _, err = run_cli(capsys, "bench", "--per_device_train_batch_size", "2")
    assert code == 2 and "No such option" in err
