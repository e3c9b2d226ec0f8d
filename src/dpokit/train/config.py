"""Training configs: ``SFTConfig`` and ``DPOConfig`` (YAML keys = field names = CLI flags).

    dpokit train --config dpo.yaml --beta 0.2 --output-dir runs/dpo
    dpokit sft --model base/ --data sft.jsonl --output-dir runs/sft

Every field has a default and a help text; ``validate()`` rejects impossible values before any
model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpokit.config import field
from dpokit.data import ColumnMap, TokenizeSettings
from dpokit.errors import DpokitError


@dataclass
class TrainConfig:
    """What SFT and DPO share: model, data, optimisation, precision, logging, checkpoints."""

    model: str = field(help="Initial policy: a local Hugging Face causal LM directory.")
    data: str = field(help="Training data: JSONL/JSON/CSV/Parquet file, saved dataset or dir.")
    output_dir: str = field("out/run", help="Run directory: checkpoints, metrics, final model.")
    eval_data: str | None = field(None, help="Evaluation data, evaluated every eval_steps.")
    split: str | None = field(None, help="Split of the training data (saved DatasetDict/shards).")
    eval_split: str | None = field(None, help="Split of the evaluation data.")
    prompt_column: str = field("prompt", help="Column holding the prompt.")
    max_length: int | None = field(1024, help="Longest prompt + completion in tokens.")
    max_prompt_length: int | None = field(None, help="Longest prompt in tokens (left-truncated).")
    text_mode: Literal["auto", "chat", "plain"] = field(
        "auto", help="Chat template for conversational rows, or plain 'role: content' text.")
    batch_size: int = field(8, help="Examples per micro-batch on each device.")
    gradient_accumulation_steps: int = field(1, help="Micro-batches per optimizer step.")
    learning_rate: float = field(1e-6, help="Peak learning rate of AdamW.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        "linear", help="Learning-rate schedule after warmup.")
    warmup_steps: int = field(0, help="Linear warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = field(0.0, help="Warmup as a fraction of the total steps.")
    weight_decay: float = field(0.0, help="AdamW weight decay (not on biases and norms).")
    adam_beta1: float = field(0.9, help="AdamW β1.")
    adam_beta2: float = field(0.999, help="AdamW β2.")
    adam_epsilon: float = field(1e-8, help="AdamW ε.")
    max_grad_norm: float | None = field(1.0, help="Clip the gradient norm to this (null: off).")
    num_epochs: float = field(1.0, help="Passes over the training data (fractions allowed).")
    max_steps: int | None = field(None, help="Stop after this many optimizer steps.")
    seed: int = field(42, help="Seed of data order, initialisation and dropout.")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="Compute precision: bfloat16/float16 autocast where the device has it.")
    device: str = field("auto", help="auto, cpu, cuda (torchrun: one GPU per process).")
    gradient_checkpointing: bool = field(
        False, help="Recompute each decoder layer in backward (least memory, ~1/3 more time).")
    selective_checkpointing: bool | None = field(
        None, help="Keep matmul/attention outputs, recompute the element-wise ops between them "
                   "in backward: ~40% less activation memory for a few % of time (null: on "
                   "when that frees ≥ 64 MiB per micro-batch; off under gradient_checkpointing).")
    padding_free: bool = field(False, help="Pack sequences into one row (no padding).")
    chunk_size: int = field(1024, help="Completion positions per LM-head chunk.")
    unpadded: bool = field(
        True, help="Run the model on the real tokens only, attention per sequence (exact; "
                   "SDPA models, others run padded).")
    logging_steps: int = field(10, help="Log metrics every this many optimizer steps.")
    eval_steps: int | None = field(None, help="Evaluate every this many steps (null: at end).")
    save_steps: int | None = field(500, help="Save a checkpoint every this many steps.")
    save_total_limit: int | None = field(2, help="Keep at most this many checkpoints.")
    resume: str | None = field(None, help="Checkpoint directory to resume from, or 'auto'.")
    lora: bool = field(False, help="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = field(16, help="LoRA rank.")
    lora_alpha: float = field(32.0, help="LoRA scaling numerator.")
    lora_dropout: float = field(0.0, help="Dropout on the LoRA path.")
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], help="Modules to adapt ('all-linear' or names).")
    merge_lora: bool = field(False, help="Also save the final model with adapters merged.")
    fsdp: bool = field(False, help="Shard the model with FSDP2 (fully_shard) under torchrun.")
    trust_remote_code: bool = field(False, help="Allow model code shipped in the directory.")

    def validate(self) -> None:
        """Reject impossible values with a message naming the key."""
        import dataclasses
        import math
        import re

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DpokitError(f"{f.name} must be a finite number, got {value}")
            if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v)
                                               for v in value):
                raise DpokitError(f"{f.name} must hold finite numbers, got {value}")
        if not 0 <= self.seed < 2**32:
            raise DpokitError(f"seed must be in [0, 2^32), got {self.seed}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise DpokitError(f"device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise DpokitError("adam_beta1 and adam_beta2 must be in [0, 1)")
        if not self.adam_epsilon > 0 or not self.lora_alpha > 0:
            raise DpokitError("adam_epsilon and lora_alpha must be > 0")
        if self.fsdp and self.dtype == "float16":
            raise DpokitError("fsdp with float16 is not supported (loss scaling is not sharded); "
                              "use bfloat16")
        positive_ints = ("batch_size", "gradient_accumulation_steps", "logging_steps",
                         "chunk_size", "lora_r")
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise DpokitError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("max_length", "max_prompt_length", "max_steps", "eval_steps", "save_steps",
                    "save_total_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DpokitError(f"{key} must be ≥ 1 or null, got {value}")
        if not self.learning_rate > 0:
            raise DpokitError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.num_epochs <= 0 and self.max_steps is None:
            raise DpokitError(f"num_epochs must be > 0 (or set max_steps), got {self.num_epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise DpokitError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise DpokitError("warmup_steps and weight_decay must be ≥ 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise DpokitError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DpokitError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        TokenizeSettings(max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                         text_mode=self.text_mode)

    @property
    def tokenize_settings(self) -> TokenizeSettings:
        return TokenizeSettings(max_length=self.max_length,
                                max_prompt_length=self.max_prompt_length,
                                text_mode=self.text_mode)


@dataclass
class DPOConfig(TrainConfig):
    """DPO (and the rest of the loss family) on preference pairs."""

    chosen_column: str = field("chosen", help="Column holding the preferred completion.")
    rejected_column: str = field("rejected", help="Column holding the dispreferred completion.")
    weight_column: str = field("weight", help="Optional per-pair weight column.")
    margin_column: str = field("margin", help="Optional per-pair margin column.")
    ref_model: str | None = field(None, help="Reference model directory (default: the policy).")
    beta: float = field(0.1, help="β > 0: strength of the KL penalty towards π_ref.")
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"],
                                 help="Loss name(s) of dpokit.losses; several are summed.")
    loss_weights: list[float] | None = field(None, help="One weight per loss_type entry.")
    label_smoothing: float = field(0.0, help="ε ∈ [0, 0.5): conservative DPO / robust / exo.")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence",
                               "alpha_divergence"] = field(
        "reverse_kl", help="f-divergence of the log-ratio scores.")
    f_alpha_divergence_coef: float = field(0.5, help="α of alpha_divergence.")
    discopop_tau: float = field(0.05, help="τ of the discopop loss.")
    simpo_gamma: float = field(0.5, help="Target margin γ of SimPO.")
    rpo_alpha: float | None = field(None, help="Weight of the RPO NLL term on chosen.")
    ld_alpha: float | None = field(None, help="LD-DPO weight of tokens past the shared length.")
    use_weighting: bool = field(False, help="WPO weighting of each pair.")
    shared_prompt: bool | None = field(
        None, help="One row per pair [prompt, chosen, rejected], the prompt computed once "
                   "(null: on unless padding_free).")
    precompute_ref_logps: bool | None = field(
        None, help="One reference pass before training, cached on disk beside the output "
                   "(null: on unless sync_ref_model).")
    sync_ref_model: bool = field(False, help="TR-DPO: move π_ref towards π_θ periodically.")
    ref_model_mixup_alpha: float = field(0.6, help="TR-DPO mixing α: ref ← α·θ + (1−α)·ref.")
    ref_model_sync_steps: int = field(512, help="TR-DPO: steps between reference updates.")

    def validate(self) -> None:
        from dpokit.losses import F_DIVERGENCES, resolve_losses

        super().validate()
        if not self.beta > 0:
            raise DpokitError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DpokitError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        resolve_losses(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise DpokitError(f"loss_weights has {len(self.loss_weights)} entries for "
                              f"{len(self.loss_type)} loss types")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise DpokitError(f"f_divergence_type must be one of {F_DIVERGENCES}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise DpokitError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise DpokitError(f"ref_model_mixup_alpha must be in (0, 1], "
                              f"got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise DpokitError(f"ref_model_sync_steps must be ≥ 1, got {self.ref_model_sync_steps}")
        if self.sync_ref_model and self.precompute_ref_logps is True:
            raise DpokitError("sync_ref_model changes the reference during training; it cannot be "
                              "combined with precompute_ref_logps")
        if self.shared_prompt is True and self.padding_free:
            raise DpokitError("shared_prompt and padding_free are two layouts; choose one")
        from dpokit.losses import needs_reference

        if self.sync_ref_model and not needs_reference(self.loss_type):
            raise DpokitError(f"sync_ref_model moves a reference, but loss_type "
                              f"{self.loss_type} uses none")
        if not self.discopop_tau > 0:
            raise DpokitError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        if self.sync_ref_model and self.lora:
            raise DpokitError("sync_ref_model needs a separate reference model; with lora the "
                              "reference is the base model with adapters disabled")

    @property
    def layout(self) -> str:
        """How pairs are laid out for the model (``dpokit.data.collate.LAYOUTS``)."""
        if self.padding_free:
            return "packed"
        return "padded" if self.shared_prompt is False else "shared"

    @property
    def precompute(self) -> bool:
        """Whether the reference pass runs once before training (resolving ``null``)."""
        if self.precompute_ref_logps is None:
            return not self.sync_ref_model
        return self.precompute_ref_logps

    @property
    def columns(self) -> ColumnMap:
        return ColumnMap(prompt=self.prompt_column, chosen=self.chosen_column,
                         rejected=self.rejected_column, weight=self.weight_column,
                         margin=self.margin_column)

    def loss_options(self) -> dict:
        """The keyword options of :func:`dpokit.losses.dpo_loss`."""
        return {"loss_weights": self.loss_weights, "label_smoothing": self.label_smoothing,
                "f_divergence_type": self.f_divergence_type,
                "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
                "discopop_tau": self.discopop_tau, "simpo_gamma": self.simpo_gamma,
                "rpo_alpha": self.rpo_alpha}


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the NLL of completion tokens (prompt tokens masked)."""

    completion_column: str = field("completion", help="Column holding the target completion.")
    messages_column: str = field("messages", help="Column holding a whole conversation.")
    learning_rate: float = field(2e-5, help="Peak learning rate of AdamW.")
