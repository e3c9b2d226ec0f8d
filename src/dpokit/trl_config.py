"""TRL 1.16 config files read as they are: ``trl dpo --config dpo.yaml`` → ``dpokit train --config
dpo.yaml``.

A file is *TRL-flavoured* when it uses a key that only TRL has (``model_name_or_path``,
``per_device_train_batch_size``, ``use_peft``, …; :data:`TRL_ONLY`). Such a file is read with TRL's
names and meanings — said once — and every TRL key is either honoured or refused with a one-line
reason and what to use instead; nothing is dropped silently:

- renamed keys (:data:`RENAMED`) map onto dpokit's field of the same meaning;
- keys dpokit shares with TRL (``learning_rate``, ``beta``, ``loss_type``, …) pass through;
- keys whose TRL value has another form are converted (``max_steps: -1`` → null,
  ``max_grad_norm: 0`` → null, ``lora_target_modules: all-linear`` → a list,
  ``fsdp: "full_shard auto_wrap"`` → ``fsdp: true``, ``model_revision`` → ``Org/Name@revision``,
  ``report_to: wandb`` → a list, ``dataset_test_split`` with an ``eval_strategy`` → the
  evaluation data);
- keys that only change speed or logging, at the values TRL users set
  (``dataloader_num_workers``, ``optim: adamw_torch_fused``, …) are accepted and listed once
  as having no effect on the result;
- everything else is refused at a value dpokit cannot honour (``deepspeed`` → "use fsdp: true
  with torchrun", ``load_in_4bit: true``, …).

TRL's defaults that change the result are applied to a TRL-flavoured file when it does not set
them (:data:`TRL_DEFAULTS`: 3 epochs, LoRA dropout 0.05 on peft's default modules, no
evaluation unless ``eval_strategy`` asks, every checkpoint kept, bfloat16 autocast unless
``fp16``, the ``train`` split; for SFT the model's own dropout, :data:`TRL_SFT_DEFAULTS`) —
by ``load_config`` once command-line flags are merged, so a flag that decides one
(``--fp16``, ``--no-lora``) keeps it out (:func:`trl_defaults`).
:func:`translate` is a pure function of the mapping; ``dpokit config convert`` prints its result
as a native YAML with a comment per changed key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpokit.errors import DpokitError

log = logging.getLogger("dpokit")

RENAMED = {
    "model_name_or_path": "model",
    "dataset_name": "data",
    "dataset_train_split": "split",
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "num_epochs",
    "lr_scheduler_type": "lr_scheduler",
    "precompute_ref_log_probs": "precompute_ref_logps",
    "use_peft": "lora",
    "resume_from_checkpoint": "resume",
    "overwrite_output_dir": "overwrite",
    "use_cpu": "device",
    "dataset_test_split": "eval_split",
    "model_revision": "model",
    "torch_dtype": "dtype",
    "dataset_text_field": "text_column",
}
"""TRL key → the dpokit key it sets."""

NO_EFFECT = {
    "dataloader_num_workers": None, "pad_to_multiple_of": None,
    "average_tokens_across_devices": None,  # (False refused for SFT, in translate)
    "include_num_input_tokens_seen": None, "log_level": None, "disable_tqdm": None,
    "logging_first_step": None, "log_level_replica": None, "log_on_each_node": None,
    "logging_nan_inf_filter": None, "skip_memory_metrics": None, "do_predict": None,
    "hub_strategy": None, "hub_token": None, "hub_private_repo": None, "hub_always_push": None,
    "hub_revision": None, "greater_is_better": None, "length_column_name": None,
    "dataloader_persistent_workers": None, "dataloader_prefetch_factor": None,
    "dataloader_multiprocessing_context": None, "dataloader_in_order": None,
    "ddp_bucket_cap_mb": None, "ddp_broadcast_buffers": None, "ddp_static_graph": None,
    "ddp_backend": None, "save_on_each_node": None, "torch_empty_cache_steps": None,
    "use_cache": None, "prediction_loss_only": None, "eval_do_concat_batches": None,
    "eval_use_gather_object": None, "eval_accumulation_steps": None,
    "batch_eval_metrics": None, "include_for_metrics": None,
    "activation_checkpointing": None,
    "activation_checkpointing_kwargs": (None, {}, {"use_reentrant": False}),
    "remove_unused_columns": None, "do_train": None, "do_eval": None, "local_rank": None,
    "label_names": None, "save_only_model": None, "dataloader_pin_memory": None,
    "logging_dir": None, "tf32": None, "seed_data": None, "data_seed": (None,),
    "ignore_bias_buffers": None, "bnb_4bit_quant_type": None, "use_bnb_nested_quant": None,
    "bnb_4bit_quant_storage": None, "lora_task_type": ("CAUSAL_LM",),
    "optim": ("adamw_torch", "adamw_torch_fused"),
    "logging_strategy": ("steps",), "packing_strategy": None, "shuffle_dataset": None,
    "gradient_checkpointing_kwargs": (None, {}, {"use_reentrant": False}),
    "attn_implementation": (None, "sdpa", "eager"),
}
"""Keys accepted because they change only speed, logging or bookkeeping (None: any value;
else the values accepted)."""

DEFAULT_ONLY = {
    "push_to_hub": (False,), "hub_model_id": (None,), "load_in_4bit": (False,),
    "load_in_8bit": (False,), "use_rslora": (False,), "use_dora": (False,),
    "lora_modules_to_save": (None,), "lora_target_parameters": (None,),
    "model_init_kwargs": (None, {}), "ref_model_init_kwargs": (None, {}),
    "router_aux_loss_coef": (None,), "activation_offloading": (False,), "pad_token": (None,),
    "dataset_config": (None,), "dataset_streaming": (False,), "torch_compile": (False,),
    "load_best_model_at_end": (False,), "metric_for_best_model": (None,),
    "eval_on_start": (False,), "group_by_length": (False,), "dataloader_drop_last": (False,),
    "full_determinism": (False,), "lr_scheduler_kwargs": (None, {}),
    "bf16_full_eval": (False,), "fp16_full_eval": (False,), "deepspeed": (None,),
    "generate_during_eval": (False,),
    # transformers 5's TrainingArguments that change the numbers, the data or the run at any
    # other value
    "label_smoothing_factor": (0, 0.0), "neftune_noise_alpha": (None,),
    "use_liger_kernel": (False,), "liger_kernel_config": (None, {}), "optim_args": (None, ""),
    "optim_target_modules": (None,), "torch_compile_backend": (None,),
    "torch_compile_mode": (None,), "auto_find_batch_size": (False,),
    "train_sampling_strategy": ("random",), "ignore_data_skip": (False,),
    "restore_callback_states_from_checkpoint": (False,), "enable_jit_checkpoint": (False,),
    "eval_delay": (0, 0.0), "accelerator_config": (None, {}), "parallelism_config": (None,),
    "fsdp_config": (None, {}), "debug": ("", None, []), "trackio_static_space_id": (None,),
    # TRL's DatasetMixtureConfig
    "datasets": (None, []), "streaming": (False,), "test_split_size": (None,),
    "use_logits_to_keep": (False,), "trackio_space_id": (None,), "trackio_bucket_id": (None,),
    "packing": (False,), "eval_packing": (None, False), "eos_token": (None,),
    "chat_template_path": (None,), "dataset_kwargs": (None, {}),
}
"""Keys accepted only at the value that asks for nothing dpokit lacks (TRL's default, usually)."""

WHY = {
    "deepspeed": "dpokit shards with PyTorch FSDP2: use fsdp: true with torchrun",
    "push_to_hub": "dpokit never uploads: push final/ with `hf upload` after the run",
    "hub_model_id": "dpokit never uploads: push final/ with `hf upload` after the run",
    "load_in_4bit": "quantised (QLoRA) training is not supported; use use_peft without it",
    "load_in_8bit": "quantised (QLoRA) training is not supported; use use_peft without it",
    "use_rslora": "rank-stabilised LoRA is not supported yet",
    "use_dora": "DoRA is not supported yet",
    "optim": "dpokit trains with AdamW (fused): optim adamw_torch or adamw_torch_fused",
    "report_to": "dpokit reports to tensorboard, wandb and trackio (or all, none)",
    "trackio_space_id": "dpokit logs trackio locally (TRACKIO_DIR); a Space is not supported",
    "trackio_bucket_id": "dpokit logs trackio locally (TRACKIO_DIR); a Space is not supported",
    "attn_implementation": "dpokit picks its attention kernel (SDPA); leave it null",
    "generate_during_eval": "use eval_generate: N (samples written to samples.jsonl)",
    "logging_strategy": "dpokit logs every logging_steps",
    "packing": "dpokit does not bin-pack rows into max_length blocks; padding_free: true runs "
               "each batch without padding",
    "eval_packing": "dpokit does not bin-pack rows into max_length blocks",
    "eos_token": "dpokit appends the tokenizer's eos_token; set it in the tokenizer directory",
    "chat_template_path": "dpokit uses the tokenizer's chat template; save the template into "
                          "the tokenizer directory",
    "dataset_kwargs": "dpokit always prepares the data itself",
    "lr_scheduler_type": "lr_scheduler is linear, cosine or constant",
    "data_seed": "dpokit orders the data by seed alone (transformers' data_seed seeds the "
                 "sampler apart from it); set seed, or leave data_seed null",
    "label_smoothing_factor": "dpokit's SFT loss is the plain NLL",
    "neftune_noise_alpha": "NEFTune embedding noise is not supported",
    "use_liger_kernel": "dpokit computes log-probs in its own chunked LM head",
    "liger_kernel_config": "dpokit computes log-probs in its own chunked LM head",
    "optim_args": "dpokit trains with AdamW: set adam_beta1, adam_beta2, adam_epsilon",
    "optim_target_modules": "dpokit trains with AdamW on every trained parameter",
    "torch_compile_backend": "torch.compile is not supported",
    "torch_compile_mode": "torch.compile is not supported",
    "auto_find_batch_size": "dpokit does not change batch_size during a run",
    "train_sampling_strategy": "dpokit samples the training rows at random (by seed)",
    "ignore_data_skip": "a resumed dpokit run always continues the interrupted data order",
    "restore_callback_states_from_checkpoint": "dpokit has no callbacks",
    "enable_jit_checkpoint": "dpokit checkpoints every save_steps",
    "eval_delay": "dpokit evaluates from the first eval_steps on",
    "accelerator_config": "dpokit does not run through accelerate",
    "parallelism_config": "dpokit shards with FSDP2 (fsdp: true) under torchrun",
    "fsdp_config": "dpokit's fsdp: true is FSDP2 fully_shard per decoder layer, without options",
    "debug": "transformers' debug options are not supported",
    "trackio_static_space_id": "dpokit logs trackio locally (TRACKIO_DIR); a Space is not "
                               "supported",
    "datasets": "dpokit reads one data source: dataset_name (or data)",
    "streaming": "dpokit reads the whole data source before training",
    "test_split_size": "give the evaluation data as dataset_test_split (or eval_data)",
    "average_tokens_across_devices": "dpokit's SFT loss divides by the global batch's token "
                                     "count, TRL's default true",
    "lora_target_modules": "peft reads a string as a regular expression over whole module "
                           "names; give a list of module names, or all-linear",
}
"""Why a key (at that value) is refused, and what to use instead."""

TRL_DEFAULTS = {"num_epochs": 3.0, "lora_dropout": 0.05, "lora_target_modules": None,
                "save_total_limit": None,
                "eval_strategy": "no", "bf16": True, "split": "train",
                # SFTConfig's: the loss's token mean, and which tokens it covers
                "loss_normalization": "token", "completion_only_loss": None}
"""TRL 1.16 defaults that change the result, applied to a TRL-flavoured file that sets none of
the keys that mean them (``bf16``: unless ``fp16`` is set, as DPOConfig's ``__post_init__``)."""

TRL_SFT_DEFAULTS = {"disable_dropout": False}
"""TRL 1.16 defaults of SFT alone: SFTTrainer trains with the model's dropout (only DPOConfig
has ``disable_dropout``, default true, as dpokit's own)."""

REPORT_TO = ("tensorboard", "wandb", "trackio", "all", "none")

NONE_TEXT = frozenset({
    "data_seed", "dataloader_prefetch_factor", "dataset_num_proc", "ddp_bucket_cap_mb",
    "eval_accumulation_steps", "eval_steps", "label_names", "ld_alpha", "liger_kernel_config",
    "lora_modules_to_save", "lora_target_modules", "lora_target_parameters", "loss_weights",
    "max_length", "neftune_noise_alpha", "parallelism_config", "precompute_ref_batch_size",
    "router_aux_loss_coef", "save_total_limit", "test_split_size", "torch_empty_cache_steps"})
"""TRL keys typed ``X | None`` with X not str (nor bool): TRL's argument parser reads the text
``None``/``null`` (any case) there as None, in a YAML file too (``max_length: None``)."""

_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant",
               "constant_with_warmup": "constant"}

TRL_ONLY = frozenset({*RENAMED, *NO_EFFECT, *DEFAULT_ONLY})
"""Keys only TRL has: one of them makes a file TRL-flavoured (``dtype``, ``bf16`` and ``fp16``
mean the same in both)."""


@dataclass
class Translation:
    """A TRL mapping read as dpokit keys, with a line per key saying what became of it."""

    values: dict[str, Any]
    notes: list[tuple[str, str]] = field(default_factory=list)
    """``(TRL key, what it became)`` for every key not passed through as it is."""
    no_effect: list[str] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)
    """Keys TRL does not read in this file (``lora_*`` without ``use_peft``), said at read
    time."""


def is_trl(keys: Iterable[str]) -> bool:
    """Whether a mapping with these keys is a TRL config (uses a key only TRL has)."""
    return any(key.replace("-", "_") in TRL_ONLY for key in keys)


def _refuse(source: str, key: str, value: Any) -> DpokitError:
    why = WHY.get(key, "dpokit has no equivalent")
    return DpokitError(f"{source}: TRL key {key}: {value!r} is not supported ({why})")


def translate(values: Mapping[str, Any], *, source: str = "config",
              known: Iterable[str] | None = None, defaults: bool = True) -> Translation:
    """``values`` (a TRL-flavoured mapping) as dpokit keys; a key dpokit cannot honour is a
    :class:`DpokitError` naming it, its value, why and what to use instead. ``known``: the
    target config's fields (TRL's defaults are applied only to those). ``defaults``: False
    leaves TRL's defaults out (:func:`trl_defaults`: the caller applies them once command-line
    flags are merged, which decide some of them)."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = set(known) if known is not None else None
    constant = False
    out: dict[str, Any] = {}
    result = Translation(out)
    note = result.notes.append
    sft = known is not None and "completion_only_loss" in known  # SFTConfig's key alone
    for key, value in values.items():
        if key in NONE_TEXT and isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        if key == "average_tokens_across_devices" and value is False and sft:
            # transformers then divides each rank's token sum by its own count: another
            # gradient under torchrun (DPO's loss never reads it)
            raise _refuse(source, key, value)
        if key in NO_EFFECT:
            allowed = NO_EFFECT[key]
            if allowed is not None and value not in allowed:
                raise _refuse(source, key, value)
            result.no_effect.append(key)
            continue
        if key in DEFAULT_ONLY:
            if value not in DEFAULT_ONLY[key]:
                raise _refuse(source, key, value)
            note((key, f"{value!r}: the default, nothing to set"))
            continue
        if key in ("dtype", "torch_dtype") and value is None:
            # TRL passes it to from_pretrained as it is, and transformers 5 reads None as
            # auto (the checkpoint's dtype); unset, TRL's default is float32
            out["dtype"] = "auto"
            note((key, "null: dtype auto (from_pretrained(dtype=None), as TRL loads it)"))
            continue
        if key in ("bf16", "fp16") and value is None:
            note((key, "null: TRL's default"))
            continue  # TRL's default below
        if key == "fsdp":
            if not (value is None or isinstance(value, bool | str) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise DpokitError(f"{source}: TRL key fsdp: expected true/false, a string of "
                                  f"FSDP options or a list of them, got {value!r}")
            text = " ".join(value) if isinstance(value, list) else (value or "")
            if isinstance(value, bool):
                out["fsdp"] = value
                note((key, f"fsdp: {str(value).lower()}"))
                continue
            if "offload" in text:
                raise _refuse(source, key, value)
            out["fsdp"] = bool(text.strip())
            note((key, f"fsdp: {str(out['fsdp']).lower()} (FSDP2 fully_shard per decoder "
                       f"layer, under torchrun)"))
            continue
        if key == "use_cpu":
            if value:
                out["device"] = "cpu"
                note((key, "device: cpu"))
            else:
                note((key, f"{value!r}: the default (device auto)"))
            continue
        if key == "loss_type" and known is not None and "loss_type" not in known:  # SFT's
            if value not in ("nll", "chunked_nll", ["nll"]):
                raise DpokitError(f"{source}: TRL key loss_type: {value!r} is not supported "
                                  f"(dpokit's SFT loss is the NLL, loss_type nll)")
            note((key, f"{value!r}: the NLL, dpokit's SFT loss"))
            continue
        if key == "report_to":
            if not (value is None or isinstance(value, str | list)):
                raise _refuse(source, key, value)
            names = [value] if isinstance(value, str) else list(value or ["none"])
            if any(not isinstance(name, str) or name not in REPORT_TO for name in names):
                raise _refuse(source, key, value)
            out["report_to"] = names
            if names != value:
                note((key, f"report_to: {names}"))
            continue
        if key == "lr_scheduler_type":
            if not isinstance(value, str) or value not in _SCHEDULERS:
                raise _refuse(source, key, value)
            out["lr_scheduler"] = _SCHEDULERS[value]
            note((key, f"lr_scheduler: {_SCHEDULERS[value]}"))
            if value == "constant":  # transformers' constant has no warmup, whatever is set
                constant = True
            continue
        if key == "max_steps" and value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DpokitError(f"{source}: TRL key max_steps: expected a number of steps "
                                  f"(-1: no limit), got {value!r}")
            if value <= 0:  # transformers: max_steps > 0 overrides the epochs, else unset
                out["max_steps"] = None
                note((key, f"{value!r}: null (num_epochs decides)"))
                continue
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            if value:
                out["resume"] = "auto"
                note((key, "true: resume auto (the last checkpoint, as TRL)"))
            continue
        if key in ("eval_steps", "save_steps", "logging_steps") and isinstance(value, float):
            if 0 < value < 1:
                raise DpokitError(f"{source}: TRL key {key}: {value} (a fraction of the run) is "
                                  f"not supported; give a number of steps")
            if value == int(value):  # transformers takes 10.0 as 10 steps
                value = int(value)
        if key == "max_grad_norm" and isinstance(value, int | float) \
                and not isinstance(value, bool) and value <= 0:
            out["max_grad_norm"] = None  # transformers clips only when max_grad_norm > 0
            note((key, f"{value!r}: null (no clipping, as transformers)"))
            continue
        if key == "lora_target_modules" and isinstance(value, str):
            # TRL hands a string to peft as it is: all-linear, or a regex over whole names
            if value != "all-linear":
                raise _refuse(source, key, value)
            value = [value]
        if key in ("model_revision", "dataset_test_split"):
            continue  # combined below
        if key == "eval_steps" and not value:  # set once the flags are in (trl_defaults)
            note((key, f"{value!r}: logging_steps' under eval_strategy steps (as transformers)"))
            continue
        target = RENAMED.get(key, key)
        out[target] = value
        if target != key:
            note((key, f"{target}: {value!r}"))
    if constant and (out.get("warmup_steps") or out.get("warmup_ratio")):
        out["warmup_steps"], out["warmup_ratio"] = 0, 0.0
        note(("lr_scheduler_type", "constant: no warmup (transformers' constant ignores "
                                   "warmup_steps and warmup_ratio)"))
    revision = values.get("model_revision")
    if revision not in (None, "main") and out.get("model"):
        out["model"] = f"{out['model']}@{revision}"
        note(("model_revision", f"model: {out['model']}"))
    elif "model_revision" in values:
        note(("model_revision", f"{revision!r}: the default, nothing to set"))
    if "dataset_test_split" in values:  # read once eval_strategy is known (trl_defaults)
        out["eval_split"] = values["dataset_test_split"]
        note(("dataset_test_split", f"eval_split: {out['eval_split']!r} (read when "
                                    f"eval_strategy is not no, as TRL)"))
    peft = values.get("use_peft") or values.get("lora")
    if not peft:  # TRL reads lora_* only with use_peft
        for key in [k for k in out if k.startswith("lora_")]:
            del out[key]
            note((key, "no effect without use_peft (as in TRL)"))
            result.unread.append(key)
    if isinstance(out.get("loss_type"), str):
        out["loss_type"] = [out["loss_type"]]  # TRL takes one name or a list
    smoothing = values.get("label_smoothing")
    if smoothing and "sigmoid" in (out.get("loss_type") or ["sigmoid"]) and (
            known is None or "loss_type" in known):
        raise DpokitError(f"{source}: TRL key label_smoothing: {smoothing!r} has no effect on "
                          f"TRL 1.16's sigmoid loss (TRL ignores it there, dpokit's sigmoid "
                          f"applies it: cDPO); remove it for TRL's result, or set it in a "
                          f"native dpokit config for cDPO")
    if defaults:
        for key, default in trl_defaults(out.get, known).items():
            if key not in out:
                out[key] = default
                note((key, f"{default!r} ({_DERIVED.get(key, TRL_DEFAULT_NOTE)})"))
    return result


TRL_DEFAULT_NOTE = "TRL's default; dpokit's own differs"
_DERIVED = {"eval_steps": "logging_steps', as transformers",
            "eval_data": "the training data's eval_split, as TRL's scripts",
            "eval_split": "TRL's dataset_test_split default"}


def trl_defaults(given: Callable[[str], Any], known: Iterable[str] | None) -> dict[str, Any]:
    """The :data:`TRL_DEFAULTS` that apply where ``given(key)`` is what the file and the
    flags set (None: unset): ``bf16`` unless ``fp16`` is set (TRL's bf16 is ``not fp16``), the
    LoRA defaults only with LoRA, :data:`TRL_SFT_DEFAULTS` only for an SFT config; only keys of
    ``known`` (the target config's fields)."""
    known = set(known) if known is not None else None
    peft = bool(given("lora"))
    sft = known is not None and "completion_only_loss" in known  # SFTConfig's key alone
    defaults = {**TRL_DEFAULTS, **(TRL_SFT_DEFAULTS if sft else {})}
    # what TRL derives from other keys, from their final values (a flag may set them):
    # TrainingArguments' eval_steps fallback, and the scripts' evaluation data
    strategy = given("eval_strategy")
    if strategy == "steps" and not given("eval_steps"):  # (None or 0)
        defaults["eval_steps"] = given("logging_steps") or 10  # (TRL's logging_steps: 10)
    if strategy not in (None, "no") and given("data") and given("eval_data") is None:
        defaults["eval_data"] = given("data")
        defaults["eval_split"] = given("eval_split") or "test"
    return {key: default for key, default in defaults.items()
            if not ((key == "bf16" and given("fp16")) or (key.startswith("lora_") and not peft))
            and (known is None or key in known)}


def read_trl(values: Mapping[str, Any], *, source: str, known: Iterable[str] | None = None,
             defaults: bool = True) -> dict[str, Any]:
    """:func:`translate`, saying once that the file is read with TRL's meanings."""
    result = translate(values, source=source, known=known, defaults=defaults)
    log.warning("%s: read as a TRL config (TRL's key names, meanings and defaults)%s%s", source,
                f"; no effect on the result: {', '.join(result.no_effect)}"
                if result.no_effect else "",
                f"; not read without use_peft (as TRL; use_peft: true or --use_peft reads "
                f"them): {', '.join(result.unread)}" if result.unread else "")
    return result.values
