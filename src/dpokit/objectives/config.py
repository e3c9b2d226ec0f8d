"""The config concerns every objective shares: the model, the data, and the preference loss.

    ModelConfig        which model, on what device and precision, how log-probs are computed
    DataConfig         which rows, which prompt column, how they are tokenised and batched
    PreferenceConfig   the columns of a pair, β, the loss (its hyper-parameters come from the
                       loss registry: a loss that declares one gets its config key and flag here
                       without this file changing), the reference and the pair layout

``dpokit train`` (``DPOConfig``), ``dpokit sft`` (``SFTConfig``) and ``dpokit eval``
(``EvalConfig``) are built from these, so a key means the same in every command. All are
keyword-only dataclasses: YAML key = field name = ``--flag``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

from dpokit.config import Config, field
from dpokit.data import ColumnMap, TokenizeSettings
from dpokit.errors import DpokitError, check_beta
from dpokit.losses import (
    F_DIVERGENCES,
    check_loss_options,
    hyper_parameters,
    loss_names,
    needs_reference,
    resolve_losses,
    supports_f_divergence,
)
from dpokit.losses.registry import check_f_divergence

FDivergence = Literal[F_DIVERGENCES]  # the names come from dpokit.losses, never copied


def check_finite(config: object) -> None:
    """Every float (and every float in a list) of a config is finite, or a ``DpokitError``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise DpokitError(f"{f.name} must be a finite number, got {value}")
        if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v)
                                           for v in value):
            raise DpokitError(f"{f.name} must hold finite numbers, got {value}")


LoadDtype = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass(kw_only=True)
class PrecisionConfig(Config):
    """What the weights are stored in, and what the forward computes in — two keys, as in
    transformers/TRL: ``dtype`` is the load dtype of the weights (a full fine-tune in bfloat16
    trains bfloat16 weights), ``bf16``/``fp16`` the mixed precision (autocast) around them."""

    dtype: LoadDtype = field(
        "float32", help="Load dtype of the weights (policy, reference, LoRA base; a "
                        "full fine-tune trains them in it); auto: the dtype the model's "
                        "config.json names. Mixed precision is bf16/fp16.")
    bf16: bool = field(False, help="Mixed precision: compute in bfloat16 autocast.")
    fp16: bool = field(
        False, help="Mixed precision: float16 autocast with loss scaling (a GPU).")

    @property
    def compute_dtype(self) -> str:
        """The autocast dtype: bfloat16, float16 or float32 (none)."""
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    def validate(self) -> None:
        super().validate()
        if self.bf16 and self.fp16:
            raise DpokitError("bf16 and fp16 are both set; choose one")


@dataclass(kw_only=True)
class ModelConfig(PrecisionConfig):
    """The model and how its log-probabilities are computed."""

    model: str = field(
        help="The policy (in training, the initial one): a local Hugging Face causal LM dir.")
    device: str = field("auto", help="auto, cpu, cuda (torchrun: one GPU per process).")
    chunk_size: int = field(1024, help="Completion positions per LM-head chunk.")
    unpadded: bool = field(
        True, help="Run the model on the real tokens only, attention per sequence (exact; "
                   "SDPA models, others run padded).")
    trust_remote_code: bool = field(False, help="Allow model code shipped in the directory.")

    def validate(self) -> None:
        """Reject impossible values with a message naming the key."""
        super().validate()
        check_finite(self)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise DpokitError(f"device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.chunk_size < 1:
            raise DpokitError(f"chunk_size must be ≥ 1, got {self.chunk_size}")


@dataclass(kw_only=True)
class DataConfig(Config):
    """Which rows, how they are tokenised, and how many go into one batch."""

    data: str = field(help="Data: JSONL/JSON/CSV/Parquet file, saved dataset or directory.")
    split: str | None = field(
        None, help="Split of the data (saved DatasetDict, JSON object or shards); required "
                   "when the data holds several.")
    prompt_column: str = field(
        "prompt", help="Column holding the prompt (renamed: it must exist; 'prompt' absent: "
                       "implicit prompts).")
    max_length: int | None = field(1024, help="Longest prompt + completion in tokens.")
    max_prompt_length: int | None = field(None, help="Longest prompt in tokens (left-truncated).")
    truncation_mode: Literal["keep_start", "keep_end"] = field(
        "keep_start", help="What max_length keeps: the prompt and the completions' starts "
                           "(keep_start), or the completions and the prompt's end (keep_end).")
    text_mode: Literal["auto", "chat", "plain"] = field(
        "auto", help="Chat template for conversational rows, or plain 'role: content' text.")
    max_row_chars: int | None = field(
        1_000_000, help="Longest row in characters (its text columns summed), refused before "
                        "tokenising (null: no limit).")
    dataset_num_proc: int | None = field(
        None, help="Processes that tokenise the data (null: this one); the same tokens.")
    batch_size: int = field(8, help="Examples per micro-batch on each device.")
    padding_free: bool = field(False, help="Pack sequences into one row (no padding).")

    def validate(self) -> None:
        """Reject impossible values with a message naming the key."""
        super().validate()
        if self.batch_size < 1:
            raise DpokitError(f"batch_size must be ≥ 1, got {self.batch_size}")
        for key in ("max_length", "max_prompt_length", "max_row_chars"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DpokitError(f"{key} must be ≥ 1 or null, got {value}")
        self.tokenize_settings  # noqa: B018  (its own checks)

    @property
    def tokenize_settings(self) -> TokenizeSettings:
        """The settings that turn rows into tokens (:class:`dpokit.data.TokenizeSettings`)."""
        return TokenizeSettings(max_length=self.max_length,
                                max_prompt_length=self.max_prompt_length,
                                truncation_mode=self.truncation_mode,
                                text_mode=self.text_mode, max_row_chars=self.max_row_chars)


@dataclass(kw_only=True)
class SamplingConfig(Config):
    """How completions are generated (``dpokit generate``, samples at evaluation)."""

    max_new_tokens: int = field(64, help="Longest generated completion in tokens.")
    temperature: float = field(1.0, help="Sampling temperature (0: greedy).")
    top_p: float = field(1.0, help="Nucleus sampling mass (1: off).")
    top_k: int = field(0, help="Sample from the k most likely tokens (0: off).")

    def validate(self) -> None:
        """The generation settings' own checks."""
        from dpokit.generation import check_sampling

        super().validate()
        check_sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       top_p=self.top_p, top_k=self.top_k)

    @property
    def sampling(self) -> dict:
        """The keyword arguments of :func:`dpokit.generation.generate_completions`."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k}


@dataclass(kw_only=True)
class _PreferenceConfig(Config):
    """Preference pairs and the loss of the DPO family (:func:`dpokit.losses.dpo_loss`).

    Combined with :class:`DataConfig` (it reads ``prompt_column`` and ``padding_free``)."""

    chosen_column: str = field("chosen", help="Column holding the preferred completion.")
    rejected_column: str = field("rejected", help="Column holding the dispreferred completion.")
    weight_column: str = field("weight", help="Optional per-pair weight column (scales its loss).")
    margin_column: str = field(
        "margin", help="Optional per-pair margin column (the offset m of losses that read one).")
    label_prob_column: str = field(
        "label_prob", help="Optional per-pair soft label column: P(chosen ≻ rejected) ∈ [0, 1], "
                           "read by sigmoid_soft.")
    completions_column: str = field(
        "completions", help="k scored completions of a prompt in one row: a list of texts or "
                            "conversations (or of objects with their score).")
    scores_column: str = field("scores", help="The scores of completions_column, one each.")
    completion_column: str = field(
        "completion", help="One scored completion per row (rows of one prompt form a group).")
    score_column: str = field("score", help="The score of completion_column's completion.")
    pairs_from_scores: Literal["best_vs_worst", "best_vs_each", "all"] = field(
        "best_vs_worst", help="Pairs of k scored completions: the best against the worst, "
                              "against each lower one, or every pair of different scores.")
    ref_model: str | None = field(None, help="Reference model directory (default: the policy).")
    beta: float = field(0.1, help="β > 0: strength of the KL penalty towards π_ref.")
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        help=f"Loss name(s), summed when several: {', '.join(loss_names())}.")
    loss_weights: list[float] | None = field(None, help="One weight per loss_type entry.")
    f_divergence_type: FDivergence = field(
        "reverse_kl", help="f-divergence of the log-ratio scores.")
    f_alpha_divergence_coef: float = field(0.5, help="α of alpha_divergence.")
    rpo_alpha: float | None = field(None, help="Weight of the RPO NLL term on chosen.")
    ld_alpha: float | None = field(None, help="LD-DPO weight of tokens past the shared length.")
    use_weighting: bool = field(False, help="WPO weighting of each pair.")
    shared_prompt: bool | None = field(
        None, help="One row per pair [prompt, chosen, rejected], the prompt computed once "
                   "(null: on unless padding_free).")

    def validate(self) -> None:
        """The losses' own checks (:func:`dpokit.losses.check_loss_options`) and the layout's."""
        super().validate()
        check_beta(self.beta)
        resolve_losses(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise DpokitError(f"loss_weights has {len(self.loss_weights)} entries for "
                              f"{len(self.loss_type)} loss types")
        check_loss_options(self.loss_type, self.hyper_parameters())
        check_f_divergence(self.f_divergence_type, self.f_alpha_divergence_coef)
        if self.f_divergence_type != "reverse_kl" and not supports_f_divergence(self.loss_type):
            raise DpokitError(f"f_divergence_type={self.f_divergence_type!r} is not defined for "
                              f"loss_type {self.loss_type}; use reverse_kl")
        if self.rpo_alpha is not None and not (math.isfinite(self.rpo_alpha)
                                               and self.rpo_alpha >= 0):
            raise DpokitError(f"rpo_alpha must be a finite number ≥ 0 or null, got "
                              f"{self.rpo_alpha}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise DpokitError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.shared_prompt is True and self.padding_free:
            raise DpokitError("shared_prompt and padding_free are two layouts; choose one")
        sorting = [name for name in self.loss_type if name in ("aot", "aot_unpaired")]
        if self.use_weighting and sorting:  # as TRL: a pair's weight, a sorted batch's term
            raise DpokitError(f"use_weighting weighs each pair, but loss_type {sorting[0]} "
                              f"sorts the batch (its terms are no pair's); drop one")

    @property
    def needs_reference(self) -> bool:
        """Whether the losses read π_ref log-probs (:func:`dpokit.losses.needs_reference`)."""
        return needs_reference(self.loss_type)

    @property
    def layout(self) -> str:
        """How pairs are laid out for the model (``dpokit.data.collate.LAYOUTS``)."""
        if self.padding_free:
            return "packed"
        return "padded" if self.shared_prompt is False else "shared"

    @property
    def columns(self) -> ColumnMap:
        """The user's column names of a pair."""
        return ColumnMap(prompt=self.prompt_column, chosen=self.chosen_column,
                         rejected=self.rejected_column, weight=self.weight_column,
                         margin=self.margin_column, label_prob=self.label_prob_column,
                         completions=self.completions_column, scores=self.scores_column,
                         completion=self.completion_column, score=self.score_column,
                         pairs_from_scores=self.pairs_from_scores)

    def hyper_parameters(self) -> dict[str, float]:
        """The registry's loss hyper-parameters as set in this config (``label_smoothing``, …)."""
        return {name: getattr(self, name) for name in hyper_parameters()}

    def loss_options(self) -> dict:
        """The keyword options of :func:`dpokit.losses.dpo_loss`."""
        return {"loss_weights": self.loss_weights, "f_divergence_type": self.f_divergence_type,
                "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
                "rpo_alpha": self.rpo_alpha, **self.hyper_parameters()}


def _hyper_parameter_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """One float field per hyper-parameter the loss registry declares, in registry order; its
    help names the losses that read it, each with its valid range."""
    from dpokit.losses import LOSSES

    fields = []
    for p in hyper_parameters().values():
        readers = [f"{name} {h.describe_range()}" for name, spec in LOSSES.items()
                   for h in spec.hyper_parameters if h.name == p.name]
        fields.append((p.name, float, field(p.default,
                                            help=f"{p.help} (read by {', '.join(readers)})")))
    return fields


PreferenceConfig = dataclasses.make_dataclass(
    "PreferenceConfig", _hyper_parameter_fields(), bases=(_PreferenceConfig,), kw_only=True,
    namespace={"__doc__": _PreferenceConfig.__doc__, "__module__": __name__})
""":class:`_PreferenceConfig` plus a field per hyper-parameter of :data:`dpokit.losses.LOSSES`."""
