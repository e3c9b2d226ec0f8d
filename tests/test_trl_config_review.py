"""Review of ``dpokit.trl_config`` against TRL 1.16 / transformers 5: every TRL key a TRL file may
hold is honoured, refused with a reason, or accepted as having no effect — never an "unknown
key" — and a TRL file that omits a key gets TRL's default.

Oracles: TRL's own dataclasses and ``TrlParser`` where TRL is importable (skipped otherwise), and
TRL 1.16's values written out (read from trl/trainer/*_config.py and transformers/training_args.py
5.x) for the assertions that run without it.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.train.config import DPOConfig, SFTConfig
from dpokit.trl_config import NONE_TEXT, translate

# transformers 5 TrainingArguments / TRL DatasetMixtureConfig keys that used to fall through to
# "unknown key" even at TRL's default (each value: TRL's default).
FORMERLY_UNKNOWN = {
    "hub_private_repo": None, "hub_strategy": "every_save", "hub_always_push": False,
    "hub_revision": None, "hub_token": None, "greater_is_better": None,
    "ignore_data_skip": False, "restore_callback_states_from_checkpoint": False,
    "accelerator_config": None, "parallelism_config": None,
    "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
    "dataloader_multiprocessing_context": None, "dataloader_in_order": True,
    "train_sampling_strategy": "random", "length_column_name": "length",
    "ddp_bucket_cap_mb": None, "ddp_broadcast_buffers": None, "ddp_static_graph": None,
    "ddp_backend": None, "fsdp_config": None, "debug": "", "skip_memory_metrics": True,
    "do_predict": False, "optim_args": None, "optim_target_modules": None,
    "label_smoothing_factor": 0.0, "activation_checkpointing": None,
    "activation_checkpointing_kwargs": None, "torch_compile_backend": None,
    "torch_compile_mode": None, "use_liger_kernel": False, "liger_kernel_config": None,
    "use_cache": False, "neftune_noise_alpha": None, "torch_empty_cache_steps": None,
    "auto_find_batch_size": False, "log_on_each_node": True, "logging_nan_inf_filter": True,
    "log_level_replica": "warning", "trackio_static_space_id": None, "eval_delay": 0,
    "prediction_loss_only": False, "eval_do_concat_batches": True,
    "eval_use_gather_object": False, "eval_accumulation_steps": None, "include_for_metrics": [],
    "batch_eval_metrics": False, "save_on_each_node": False, "enable_jit_checkpoint": False,
    "datasets": [], "streaming": False, "test_split_size": None,
}

# TRL 1.16 DPOConfig (+ TrainingArguments it inherits) defaults that decide the numbers, as
# dpokit's fields: what a TRL file that omits them must resolve to.
TRL_DPO_RESOLVED = {
    "learning_rate": 1e-6, "beta": 0.1, "loss_type": ["sigmoid"], "loss_weights": None,
    "max_length": 1024, "truncation_mode": "keep_start", "padding_free": False,
    "label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
    "ld_alpha": None, "use_weighting": False, "discopop_tau": 0.05, "disable_dropout": True,
    "sync_ref_model": False, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512,
    "bf16": True, "fp16": False, "dtype": "float32", "warmup_steps": 0, "warmup_ratio": 0.0,
    "lr_scheduler": "linear", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "seed": 42, "logging_steps": 10,
    "save_steps": 500, "save_strategy": "steps", "save_total_limit": None, "eval_strategy": "no",
    "num_epochs": 3.0, "max_steps": None, "batch_size": 8, "gradient_accumulation_steps": 1,
    "lora": False, "split": "train", "max_prompt_length": None,
}


def _write(tmp_path, values, name="trl.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def _base(workdir, tmp_path, data="prefs.jsonl"):
    return {"model_name_or_path": str(workdir / "llama"), "dataset_name": str(workdir / data),
            "output_dir": str(tmp_path / "out")}


@pytest.mark.parametrize("cls", [DPOConfig, SFTConfig], ids=["dpo", "sft"])
def test_trainingarguments_keys_at_their_default_are_read(workdir, tmp_path, cls):
    """Every formerly unknown TrainingArguments key at TRL's default: the file builds (old code:
    "unknown key 'hub_strategy'" and so on), and each key is accounted for."""
    data = "prefs.jsonl" if cls is DPOConfig else "sft.jsonl"
    values = {**_base(workdir, tmp_path, data), **FORMERLY_UNKNOWN}
    result = translate(values, known=cls.__dataclass_fields__)
    noted = {key for key, _ in result.notes}
    for key in FORMERLY_UNKNOWN:
        assert key in noted or key in result.no_effect, key
        assert key not in result.values, key
    load_config(cls, _write(tmp_path, values))


def test_every_trl_field_at_its_default_is_accounted_for_trl_oracle(workdir, tmp_path):
    """TRL's own dataclasses as the oracle: every field of DPOConfig, ModelConfig,
    ScriptArguments and DatasetMixtureConfig (SFTConfig likewise), at TRL's default, builds a
    dpokit config — no field is left to "unknown key"."""
    trl = pytest.importorskip("trl")
    for cls, target, data in ((trl.DPOConfig, DPOConfig, "prefs.jsonl"),
                              (trl.SFTConfig, SFTConfig, "sft.jsonl")):
        values = {}
        for owner in (cls, trl.ModelConfig, trl.ScriptArguments, trl.DatasetMixtureConfig):
            for f in dataclasses.fields(owner):
                default = f.default if f.default is not dataclasses.MISSING \
                    else f.default_factory()
                values[f.name] = getattr(default, "value", default)  # enums as their text
        values.update(_base(workdir, tmp_path, data), use_cpu=True)
        values = {k: v for k, v in values.items() if yaml.safe_dump(v) is not None}
        config = load_config(target, _write(tmp_path, values))
        assert config.learning_rate == cls.learning_rate  # TRL's own class default


def test_a_trl_dpo_file_without_keys_resolves_to_trls_defaults(workdir, tmp_path):
    """Omitted keys are TRL's defaults (the table above, written out from TRL 1.16)."""
    config = load_config(DPOConfig, _write(tmp_path, _base(workdir, tmp_path)))
    for key, value in TRL_DPO_RESOLVED.items():
        assert getattr(config, key) == value, (key, getattr(config, key))


def test_trl_dpo_defaults_match_trls_own_dataclass(workdir, tmp_path):
    """The same, with TRL's DPOConfig constructed as the oracle (use_cpu: bf16 needs no GPU)."""
    trl = pytest.importorskip("trl")
    theirs = trl.DPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True)
    model = trl.ModelConfig()
    ours = load_config(DPOConfig, _write(tmp_path, {**_base(workdir, tmp_path),
                                                    "use_cpu": True}))
    pairs = {"learning_rate": theirs.learning_rate, "beta": theirs.beta,
             "loss_type": theirs.loss_type, "max_length": theirs.max_length,
             "truncation_mode": theirs.truncation_mode, "padding_free": theirs.padding_free,
             "label_smoothing": theirs.label_smoothing, "bf16": theirs.bf16,
             "fp16": theirs.fp16, "warmup_steps": theirs.warmup_steps,
             "lr_scheduler": str(getattr(theirs.lr_scheduler_type, "value",
                                         theirs.lr_scheduler_type)),
             "weight_decay": theirs.weight_decay, "seed": theirs.seed,
             "logging_steps": theirs.logging_steps, "save_steps": theirs.save_steps,
             "save_total_limit": theirs.save_total_limit, "num_epochs": theirs.num_train_epochs,
             "max_grad_norm": theirs.max_grad_norm,
             "batch_size": theirs.per_device_train_batch_size,
             "disable_dropout": theirs.disable_dropout, "dtype": model.dtype,
             "ref_model_sync_steps": theirs.ref_model_sync_steps,
             "discopop_tau": theirs.discopop_tau, "adam_epsilon": theirs.adam_epsilon}
    for key, value in pairs.items():
        assert getattr(ours, key) == value, (key, getattr(ours, key), value)
    assert theirs.max_steps == -1 and ours.max_steps is None
    assert str(getattr(theirs.eval_strategy, "value", theirs.eval_strategy)) == ours.eval_strategy


def test_a_trl_sft_file_keeps_the_models_dropout(workdir, tmp_path):
    """TRL's SFTTrainer never disables dropout (SFTConfig has no disable_dropout): a TRL SFT
    file must train with it (old code: dpokit's own default true, dropout silently off — another
    loss and gradient for GPT-2's 0.1 dropout). DPO keeps TRL's DPOConfig default, true; a flag
    still decides."""
    sft = _write(tmp_path, _base(workdir, tmp_path, "sft.jsonl"), "sft.yaml")
    assert load_config(SFTConfig, sft).disable_dropout is False
    assert load_config(SFTConfig, sft, {"disable_dropout": "true"}).disable_dropout is True
    dpo = _write(tmp_path, _base(workdir, tmp_path), "dpo.yaml")
    assert load_config(DPOConfig, dpo).disable_dropout is True
    native = load_config(SFTConfig, None, {"model": str(workdir / "llama"),
                                           "data": str(workdir / "sft.jsonl")})
    assert native.disable_dropout is True  # dpokit's own default untouched


def test_sft_dropout_oracle_trl():
    trl = pytest.importorskip("trl")
    assert "disable_dropout" not in {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert trl.DPOConfig.disable_dropout is True


@pytest.mark.parametrize(("values", "expected"), [
    # peft takes TRL's string all-linear as it is (old code: "expected list of str")
    ({"use_peft": True, "lora_target_modules": "all-linear"},
     {"lora_target_modules": ["all-linear"]}),
    # transformers clips only when max_grad_norm > 0 (old code: "must be > 0 or null")
    ({"max_grad_norm": 0}, {"max_grad_norm": None}),
    ({"max_grad_norm": 0.0}, {"max_grad_norm": None}),
    # transformers: max_steps > 0 overrides the epochs, anything else leaves them (old: error)
    ({"max_steps": 0}, {"max_steps": None}),
    # transformers takes whole floats as steps (old code: "expected int, got 10.0")
    ({"logging_steps": 5.0, "save_steps": 100.0}, {"logging_steps": 5, "save_steps": 100}),
    # eval_steps 0 with eval_strategy steps: logging_steps' (transformers; old: "must be ≥ 1")
    ({"eval_strategy": "steps", "eval_steps": 0, "logging_steps": 4}, {"eval_steps": 4}),
    # TRL's parser reads the text None as None (old code: "expected int or null, got 'None'")
    ({"max_length": "None"}, {"max_length": None}),
    ({"eval_strategy": "steps", "eval_steps": "null", "logging_steps": 3}, {"eval_steps": 3}),
    ({"use_peft": True, "lora_target_modules": "None"}, {"lora_target_modules": None}),
    # report_to's none is a tracker name, not None
    ({"report_to": "none"}, {"report_to": ["none"]}),
    # TRL's YAML 5e-7 is text to PyYAML; TRL's parser (and dpokit's) reads it as a float
    ({"learning_rate": "5e-7"}, {"learning_rate": 5e-7}),
    ({"loss_type": "ipo", "beta": 0.5}, {"loss_type": ["ipo"], "beta": 0.5}),
])
def test_trl_values_resolve_as_trl_reads_them(workdir, tmp_path, values, expected):
    path = _write(tmp_path, {**_base(workdir, tmp_path), **values})
    config = load_config(DPOConfig, path)
    for key, value in expected.items():
        assert getattr(config, key) == value, (key, getattr(config, key))


def test_trl_values_resolve_as_trls_parser_reads_them_trl_oracle(workdir, tmp_path):
    """One YAML, read by TRL's own TrlParser and by dpokit: the same numbers."""
    trl = pytest.importorskip("trl")
    values = {**_base(workdir, tmp_path), "use_cpu": True, "learning_rate": "5e-7",
              "max_length": "None", "loss_type": "sigmoid", "use_peft": True,
              "lora_target_modules": "all-linear", "logging_steps": 5.0, "max_grad_norm": 0,
              "eval_strategy": "steps", "eval_steps": 0, "max_steps": 0, "report_to": "none"}
    path = _write(tmp_path, values)
    parser = trl.TrlParser((trl.ScriptArguments, trl.DPOConfig, trl.ModelConfig))
    _, args, model = parser.parse_args_and_config(["--config", str(path)],
                                                  fail_with_unknown_args=False)
    ours = load_config(DPOConfig, path)
    assert ours.learning_rate == args.learning_rate == 5e-7
    assert ours.max_length is None and args.max_length is None
    assert ours.loss_type == args.loss_type == ["sigmoid"]
    assert model.lora_target_modules == "all-linear" and ours.lora_target_modules == ["all-linear"]
    assert ours.logging_steps == args.logging_steps == 5
    assert ours.eval_steps == args.eval_steps == 5
    assert args.max_grad_norm == 0 and ours.max_grad_norm is None  # both: no clipping
    assert args.max_steps == 0 and ours.max_steps is None  # both: the epochs decide
    assert args.report_to == [] and ours.report_to == ["none"]


def test_none_text_keys_are_trls_optional_non_str_fields_trl_oracle():
    """:data:`NONE_TEXT` is exactly where TRL's parser reads "None" as None."""
    import types
    import typing

    trl = pytest.importorskip("trl")
    theirs = set()
    for cls in (trl.DPOConfig, trl.SFTConfig, trl.ModelConfig, trl.ScriptArguments,
                trl.DatasetMixtureConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name])
            if typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType) and \
                    len(args) == 2 and type(None) in args and not {bool, str} & set(args):
                theirs.add(f.name)
    assert theirs == NONE_TEXT


@pytest.mark.parametrize(("key", "value", "says"), [
    ("lora_target_modules", "q_proj", "regular expression"),
    ("label_smoothing_factor", 0.1, "plain NLL"),
    ("neftune_noise_alpha", 5.0, "NEFTune"),
    ("use_liger_kernel", True, "LM head"),
    ("train_sampling_strategy", "group_by_length", "at random"),
    ("auto_find_batch_size", True, "does not change batch_size"),
    ("datasets", [{"path": "d"}], "one data source"),
    ("average_tokens_across_devices", False, "global batch's token count"),
])
def test_result_changing_trl_keys_are_refused_with_a_reason(workdir, tmp_path, capsys, key,
                                                            value, says):
    """One line, exit 2, naming the file, the key and why (old code: "unknown key" with no
    reason, or for average_tokens_across_devices false nothing: accepted as no effect)."""
    from tests.helpers import run_cli

    values = {**_base(workdir, tmp_path, "sft.jsonl"), "use_peft": True, key: value}
    path = _write(tmp_path, values)
    code, _, err = run_cli(capsys, "sft", "--config", str(path))
    lines = [x for x in err.splitlines() if "dpokit: error" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and key in lines[0] and says in lines[0], lines[0]


def test_average_tokens_across_devices_false_has_no_effect_on_dpo():
    """TRL's DPO loss never reads num_items_in_batch: the key changes nothing there."""
    result = translate({"model_name_or_path": "m", "average_tokens_across_devices": False},
                       known=DPOConfig.__dataclass_fields__)
    assert "average_tokens_across_devices" in result.no_effect
    with pytest.raises(DpokitError, match="average_tokens_across_devices"):
        translate({"model_name_or_path": "m", "average_tokens_across_devices": False},
                  known=SFTConfig.__dataclass_fields__)


@pytest.mark.parametrize(("key", "value"), [
    ("logging_first_step", True), ("logging_nan_inf_filter", False), ("hub_strategy", "end"),
    ("skip_memory_metrics", False), ("dataloader_persistent_workers", True),
    ("activation_checkpointing", True),
])
def test_logging_and_speed_keys_are_accepted_at_any_value(key, value):
    """Logging-only keys are listed as having no effect (old code: logging_first_step true
    refused, the others "unknown key")."""
    result = translate({"model_name_or_path": "m", key: value},
                       known=DPOConfig.__dataclass_fields__)
    assert key in result.no_effect and key not in result.values
