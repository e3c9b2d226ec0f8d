"""Training configs: ``SFTConfig`` and ``DPOConfig`` (YAML keys = field names = CLI flags).

    dpokit train --config dpo.yaml --beta 0.2 --output-dir runs/dpo
    dpokit sft --model base/ --data sft.jsonl --output-dir runs/sft

Each is built from concerns: the model and the data (:mod:`dpokit.objectives.config`, shared with
``dpokit eval``), optimisation and checkpoints (:class:`TrainConfig`), and for DPO the preference
loss (:class:`~dpokit.objectives.config.PreferenceConfig`, whose loss hyper-parameters come from
the loss registry) plus the reference's training-time options. Every field has a default and a
help text; ``validate()`` rejects impossible values before any model is loaded. A config also
says which objective it trains (:meth:`DPOConfig.objective`), so the loop never asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dpokit.config import field, field_defaults
from dpokit.errors import DpokitError
from dpokit.objectives.config import DataConfig, ModelConfig, PreferenceConfig, SamplingConfig

if TYPE_CHECKING:  # (the objectives import torch: only when a run builds one)
    from dpokit.objectives import DPOObjective, SFTObjective


@dataclass(kw_only=True)
class TrainConfig(SamplingConfig, DataConfig, ModelConfig):
    """What SFT and DPO share: model, data, optimisation, precision, logging, checkpoints."""

    output_dir: str = field("out/run", help="Run directory: checkpoints, metrics, final model.")
    eval_data: str | None = field(None, help="Evaluation data, evaluated every eval_steps.")
    eval_split: str | None = field(None, help="Split of the evaluation data.")
    gradient_accumulation_steps: int = field(1, help="Micro-batches per optimizer step.")
    learning_rate: float = field(1e-6, help="Peak learning rate of AdamW.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        "linear", help="Learning-rate schedule after warmup.")
    warmup_steps: float = field(
        0, help="Linear warmup steps (overrides warmup_ratio when > 0); a value in (0, 1) is a "
                "fraction of the total steps, as in transformers 5.")
    warmup_ratio: float = field(0.0, help="Warmup as a fraction of the total steps.")
    weight_decay: float = field(0.0, help="AdamW weight decay (not on biases and norms).")
    adam_beta1: float = field(0.9, help="AdamW β1.")
    adam_beta2: float = field(0.999, help="AdamW β2.")
    adam_epsilon: float = field(1e-8, help="AdamW ε.")
    max_grad_norm: float | None = field(1.0, help="Clip the gradient norm to this (null: off).")
    max_nonfinite_steps: int = field(
        3, help="Divergence guard: a step whose loss or gradient norm is NaN/inf is skipped; "
                "this many in a row stop the run (exit 2), the last checkpoint kept.")
    num_epochs: float = field(1.0, help="Passes over the training data (fractions allowed).")
    max_steps: int | None = field(None, help="Stop after this many optimizer steps.")
    seed: int = field(42, help="Seed of data order, initialisation and dropout.")
    disable_dropout: bool = field(
        True, help="Train the policy without dropout: every nn.Dropout (LoRA's lora_dropout "
                   "too) and attention-dropout probability set to 0, as TRL's DPOConfig does.")
    gradient_checkpointing: bool | None = field(
        None, help="Recompute each decoder layer in backward (least memory, ~1/3 more time; "
                   "null: only when the longest micro-batch's activations, the LM head's "
                   "scratch and the optimizer state would not fit in 80% of the device's "
                   "available memory otherwise; the log says which mode was chosen).")
    selective_checkpointing: bool | None = field(
        None, help="Keep matmul/attention outputs, recompute the element-wise ops between them "
                   "in backward: ~40% less activation memory for ~5-12% more time (null: on "
                   "when that frees ≥ 64 MiB per micro-batch and ≥ half the trained weights' "
                   "state (weights, grads, AdamW moments); off under gradient_checkpointing).")
    logging_steps: int = field(10, help="Log metrics every this many optimizer steps.")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "all", "none"]] | None = field(
        None, help="Trackers besides metrics.jsonl: tensorboard, wandb, trackio (extras), all "
                   "(every installed one) or none (null: TensorBoard when installed).")
    run_name: str | None = field(
        None, help="The run's name in W&B/trackio (null: the output_dir's name).")
    project: str = field(
        "dpokit", help="W&B project (WANDB_PROJECT wins, as in transformers) and trackio "
                       "project.")
    eval_steps: int | None = field(None, help="Evaluate every this many steps (null: at end).")
    eval_strategy: Literal["steps", "epoch", "no"] = field(
        "steps", help="When to evaluate eval_data: every eval_steps (null: at the end), at the "
                      "end of each epoch, or never.")
    per_device_eval_batch_size: int | None = field(
        None, help="Evaluation examples per micro-batch on each device (null: batch_size).")
    eval_generate: int = field(
        0, help="At each evaluation, complete this many eval prompts with the policy (sampling "
                "settings above) into samples.jsonl and TensorBoard text.")
    reward: str | None = field(
        None, help="Reward of online pairs and of eval_generate samples: module:function or "
                   "path/file.py:function with TRL's signature f(prompts, completions, **kw) "
                   "-> list[float], or a local reward-model directory "
                   "(AutoModelForSequenceClassification, one output).")
    save_steps: int | None = field(500, help="Save a checkpoint every this many steps.")
    save_strategy: Literal["steps", "epoch", "no"] = field(
        "steps", help="When to checkpoint: every save_steps, at the end of each epoch, or never "
                      "(final/ is always saved).")
    save_total_limit: int | None = field(2, help="Keep at most this many checkpoints.")
    resume: str | None = field(
        None, help="Checkpoint directory to resume from, or 'auto' (the newest valid one in "
                   "output_dir; a fresh start when there is none).")
    tokenized_cache: bool = field(
        True, help="Keep the tokenised pairs or SFT sequences in ../.dpokit_cache beside "
                   "output_dir, keyed by the data's content, the tokenizer's files and the "
                   "tokenisation settings: a second run over them starts without tokenising.")
    overwrite: bool = field(
        False, help="Delete an earlier run's final/, metrics, samples and checkpoints in "
                    "output_dir and start afresh (without it such a directory is refused).")
    lora: bool = field(False, help="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = field(16, help="LoRA rank.")
    lora_alpha: float = field(32.0, help="LoRA scaling numerator.")
    lora_dropout: float = field(0.0, help="Dropout on the LoRA path.")
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        help="Modules to adapt ('all-linear' or names; null: peft's default for the model "
             "family, as TRL's null).")
    merge_lora: bool = field(False, help="Also save the final model with adapters merged.")
    fsdp: bool = field(False, help="Shard the model with FSDP2 (fully_shard) under torchrun.")
    ddp_timeout: int = field(
        1800, help="Seconds a rank waits in a collective under torchrun before the run stops "
                   "with an error naming it (as transformers' ddp_timeout).")
    ddp_find_unused_parameters: bool | None = field(
        None, help="DDP: look for parameters the loss leaves without a gradient each step "
                   "(slower; needed for a model with such parameters — the run says so). "
                   "Null: off (as transformers with gradient checkpointing, TRL's default).")

    def validate(self) -> None:
        """Reject impossible values with a message naming the key."""
        super().validate()
        self._continue_adapter()
        self._lora_keys_need_lora()
        if not 0 <= self.seed < 2**32:
            raise DpokitError(f"seed must be in [0, 2^32), got {self.seed}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise DpokitError("adam_beta1 and adam_beta2 must be in [0, 1)")
        if not self.adam_epsilon > 0 or not self.lora_alpha > 0:
            raise DpokitError("adam_epsilon and lora_alpha must be > 0")
        if self.fsdp and self.fp16:
            raise DpokitError("fsdp with fp16 is not supported (loss scaling is not sharded); "
                              "use bf16")
        for key in ("gradient_accumulation_steps", "logging_steps", "lora_r",
                    "max_nonfinite_steps", "ddp_timeout"):
            if getattr(self, key) < 1:
                raise DpokitError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("max_steps", "eval_steps", "save_steps", "save_total_limit",
                    "per_device_eval_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DpokitError(f"{key} must be ≥ 1 or null, got {value}")
        if not self.learning_rate > 0:
            raise DpokitError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise DpokitError("lora_target_modules is empty: it would adapt no layer; name the "
                              "modules, all-linear, or null for peft's family default")
        for key in ("output_dir", "model", "data"):
            if isinstance(getattr(self, key, None), str) and not getattr(self, key).strip():
                raise DpokitError(f"{key} is empty; give a path")
        if self.num_epochs <= 0 and self.max_steps is None:
            raise DpokitError(f"num_epochs must be > 0 (or set max_steps), got {self.num_epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise DpokitError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise DpokitError("warmup_steps and weight_decay must be ≥ 0")
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise DpokitError(f"warmup_steps must be a whole number of steps, or a fraction in "
                              f"(0, 1) of the total, got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise DpokitError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DpokitError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.merge_lora and not self.lora:
            raise DpokitError("merge_lora merges LoRA adapters into the model; set lora: true "
                              "too, or drop merge_lora")
        if self.overwrite and self.resume:
            raise DpokitError("overwrite deletes the run that resume would continue; set one "
                              "of them")
        if self.eval_generate < 0:
            raise DpokitError(f"eval_generate must be ≥ 0, got {self.eval_generate}")
        if self.reward and not self.reads_reward:
            raise DpokitError("reward is read by online training and by eval_generate samples; "
                              "set online: true or eval_generate, or remove reward")
        if self.eval_generate and self.fsdp:
            raise DpokitError("eval_generate is not supported with fsdp (generation would need "
                              "the sharded weights gathered); use DDP or dpokit generate")

    def _lora_keys_need_lora(self) -> None:
        """``lora_*`` set (to other than its default) without ``lora: true`` would silently
        train every weight: refused, naming the keys."""
        if self.lora:
            return
        defaults = {k: v for k, v in field_defaults(self).items() if k.startswith("lora_")}
        changed = [key for key, default in defaults.items() if getattr(self, key) != default]
        if changed:
            raise DpokitError(f"{', '.join(changed)} set but lora is false: this would be a full "
                              f"fine-tune; set lora: true, or drop {', '.join(changed)}")

    def _continue_adapter(self) -> None:
        """A PEFT LoRA adapter as ``model`` (an SFT LoRA run's ``final/``) trains on: ``lora``
        is on and the ``lora_*`` keys take the adapter's values, so the resolved ``config.yaml``
        records what trains; a key set to another value than the adapter's is refused."""
        from dpokit.models import read_adapter_config

        adapter = read_adapter_config(self.model)
        if adapter is None:
            return
        if adapter.get("peft_type") != "LORA":
            raise DpokitError(f"model {self.model} is a {adapter.get('peft_type')} adapter; "
                              f"dpokit trains LoRA adapters only")
        targets = adapter.get("target_modules")
        theirs = {"lora_r": adapter.get("r", 8),
                  "lora_alpha": float(adapter.get("lora_alpha", 8)),
                  "lora_dropout": float(adapter.get("lora_dropout") or 0.0),
                  "lora_target_modules": None if targets is None else sorted(
                      [targets] if isinstance(targets, str) else targets)}
        defaults = field_defaults(self)
        for key, value in theirs.items():
            ours = getattr(self, key)
            same = (sorted(ours) == value if key == "lora_target_modules" and ours and value
                    else ours == value)
            if ours != defaults[key] and not same:
                raise DpokitError(f"model {self.model} is a LoRA adapter ({key} {value}), which "
                                  f"training continues as it is; drop {key} {ours}, or pass its "
                                  f"base as model to train a new adapter")
            setattr(self, key, value)
        self.lora = True

    @property
    def reads_reward(self) -> bool:
        """Whether anything reads ``reward``: the samples of ``eval_generate``."""
        return bool(self.eval_generate)

    @property
    def cache_dir(self) -> Path:
        """Where the reference tables and the tokenised data are cached: ``.dpokit_cache``
        beside the run directory, shared by the runs next to it."""
        return Path(self.output_dir).resolve().parent / ".dpokit_cache"

    @property
    def data_cache_dir(self) -> Path | None:
        """:attr:`cache_dir` for the tokenised data, None with ``tokenized_cache: false``."""
        return self.cache_dir if self.tokenized_cache else None

    @property
    def eval_batch_size(self) -> int:
        """Examples per evaluation micro-batch: ``per_device_eval_batch_size`` or
        ``batch_size``."""
        return self.per_device_eval_batch_size or self.batch_size

    def warmup(self, total_steps: int) -> int:
        """Warmup steps: ``warmup_steps`` (a fraction in (0, 1) of ``total_steps``), else
        ``warmup_ratio`` of them."""
        if 0 < self.warmup_steps < 1:
            return math.ceil(self.warmup_steps * total_steps)
        return int(self.warmup_steps) or math.ceil(self.warmup_ratio * total_steps)

    def evaluates_at(self, step: int, steps_per_epoch: int) -> bool:
        """Whether training evaluates after ``step`` (the final evaluation aside)."""
        if self.eval_strategy == "epoch":
            return step % steps_per_epoch == 0
        return self.eval_strategy == "steps" and bool(self.eval_steps) and (
            step % self.eval_steps == 0)

    def saves_at(self, step: int, steps_per_epoch: int) -> bool:
        """Whether training checkpoints after ``step``."""
        if self.save_strategy == "epoch":
            return step % steps_per_epoch == 0
        return self.save_strategy == "steps" and bool(self.save_steps) and (
            step % self.save_steps == 0)

    def objective(self, tokenizer: Any):
        """The objective this config trains (its reference, if any, is set up by the trainer)."""
        raise NotImplementedError


@dataclass(kw_only=True)
class DPOConfig(PreferenceConfig, TrainConfig):
    """DPO (and the rest of the loss family) on preference pairs."""

    precompute_ref_logps: bool | None = field(
        None, help="One reference pass before training, cached on disk beside the output "
                   "(null: on unless sync_ref_model).")
    precompute_ref_batch_size: int | None = field(
        None, help="Pairs per batch of the precomputed reference pass (null: 2 × batch_size; "
                   "no gradients, so it can be larger).")
    sync_ref_model: bool = field(False, help="TR-DPO: move π_ref towards π_θ periodically.")
    ref_model_mixup_alpha: float = field(0.6, help="TR-DPO mixing α: ref ← α·θ + (1−α)·ref.")
    ref_model_sync_steps: int = field(512, help="TR-DPO: steps between reference updates.")
    online: bool = field(
        False, help="On-policy DPO: each step the policy completes the data's prompts "
                    "(num_generations each, the sampling settings above), the reward scores "
                    "them and DPO trains on the pairs.")
    num_generations: int = field(2, help="Online: completions per prompt (≥ 2; with more, "
                                         "the best and the worst form the pair).")
    label: Literal["soft", "sampled", "hard"] = field(
        "soft", help="Online pair labels: soft p = σ((r₁−r₂)/τ) (loss sigmoid_soft), sampled "
                     "(one Bernoulli draw), hard (higher reward wins, TRL's rule).")
    label_temperature: float = field(1.0, help="Online: τ > 0 of the labels' σ((r₁−r₂)/τ).")
    missing_eos_penalty: float | None = field(
        None, help="Online: subtracted from the reward of a completion without EOS.")

    def validate(self) -> None:
        """The loss's checks, the trainer's, and the reference options' combinations."""
        from dpokit.models import read_adapter_config

        super().validate()
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise DpokitError(f"ref_model_mixup_alpha must be in (0, 1], "
                              f"got {self.ref_model_mixup_alpha}")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise DpokitError(f"precompute_ref_batch_size must be ≥ 1 or null, "
                              f"got {self.precompute_ref_batch_size}")
        if self.ref_model_sync_steps < 1:
            raise DpokitError(f"ref_model_sync_steps must be ≥ 1, got {self.ref_model_sync_steps}")
        if self.sync_ref_model and self.precompute_ref_logps is True:
            raise DpokitError("sync_ref_model changes the reference during training; it cannot be "
                              "combined with precompute_ref_logps")
        if self.sync_ref_model and not self.needs_reference:
            raise DpokitError(f"sync_ref_model moves a reference, but loss_type "
                              f"{self.loss_type} uses none")
        if self.ref_model is not None and not self.needs_reference:
            raise DpokitError(f"ref_model is a reference, but loss_type {self.loss_type} uses "
                              f"none; remove ref_model")
        if self.online:
            self._validate_online()
        elif self.missing_eos_penalty is not None:
            raise DpokitError("missing_eos_penalty changes the rewards of online samples; set "
                              "online: true, or remove missing_eos_penalty")

        if self.sync_ref_model and read_adapter_config(self.model) is not None:
            raise DpokitError(f"sync_ref_model is not supported with a PEFT adapter as model "
                              f"({self.model}); its reference is the base with that adapter "
                              f"merged, frozen")
        if self.sync_ref_model and self.lora:
            raise DpokitError("sync_ref_model needs a separate reference model; with lora the "
                              "reference is the base model with adapters disabled")

    def _validate_online(self) -> None:
        """What on-policy DPO needs, and what it does not support yet."""
        from dpokit.losses import needs_label_probs

        if not self.reward:
            raise DpokitError("online needs a reward (module:function, path/file.py:function or "
                              "a reward-model directory)")
        if self.num_generations < 2:
            raise DpokitError(f"num_generations must be ≥ 2 online, got {self.num_generations}")
        if not self.label_temperature > 0:
            raise DpokitError(f"label_temperature must be > 0, got {self.label_temperature}")
        soft = needs_label_probs(self.loss_type)
        if self.label == "soft" and not soft:
            raise DpokitError(f"label soft trains on soft labels: set loss_type [sigmoid_soft] "
                              f"(got {self.loss_type}), or label hard/sampled")
        if self.label != "soft" and soft:
            raise DpokitError(f"label {self.label} gives no soft labels for loss_type "
                              f"{self.loss_type}; use label soft")
        for key, why in (("fsdp", "generation from sharded weights"), ("precompute_ref_logps",
                         "a precomputed reference (the pairs are new each step)")):
            if getattr(self, key):
                raise DpokitError(f"online does not support {key} yet ({why})")

    @property
    def reads_reward(self) -> bool:
        """Online training reads ``reward`` too."""
        return self.online or super().reads_reward

    @property
    def precompute(self) -> bool:
        """Whether the reference pass runs once before training (resolving ``null``)."""
        if self.precompute_ref_logps is None:
            return not (self.sync_ref_model or self.online)
        return self.precompute_ref_logps

    def objective(self, tokenizer: Any) -> DPOObjective:
        """:class:`~dpokit.objectives.DPOObjective`, or its on-policy form with ``online`` (the
        trainer sets the reference)."""
        if self.online:
            from dpokit.objectives.online import OnlineDPOObjective

            return OnlineDPOObjective(self, tokenizer)
        from dpokit.objectives import DPOObjective

        return DPOObjective(self, tokenizer)


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the NLL of completion tokens (prompt tokens masked)."""

    completion_column: str = field("completion", help="Column holding the target completion.")
    messages_column: str = field("messages", help="Column holding a whole conversation.")
    text_column: str = field(
        "text", help="Column holding plain text (language modelling: every token after the "
                     "first is trained on), TRL's dataset_text_field.")
    completion_only_loss: bool | None = field(
        True, help="Train on the completion only (a conversation's last message); false: "
                   "every token; null: TRL's rule (completion of prompt-completion rows, every "
                   "token of messages/text rows).")
    assistant_only_loss: bool = field(
        False, help="Train on a conversation's (single, final) assistant message only.")
    loss_normalization: Literal["example", "token"] = field(
        "example", help="example: mean over examples of each one's per-token NLL; token: the "
                        "NLL summed over the global batch's completion tokens / their number "
                        "(TRL's SFT loss).")
    learning_rate: float = field(2e-5, help="Peak learning rate of AdamW.")

    def objective(self, tokenizer: Any) -> SFTObjective:
        """:class:`~dpokit.objectives.SFTObjective`."""
        from dpokit.objectives import SFTObjective

        return SFTObjective(self, tokenizer)
