"""Supervised fine-tuning: the per-token NLL of each completion, prompt tokens masked.

    example (default):  L = (1/B) Σ_i −(1/|y_i|) Σ_t log π_θ(y_i,t | x_i, y_i,<t)
    token (TRL's):      L = −(Σ_i Σ_t log π_θ(y_i,t | x_i, y_i,<t)) / Σ_i |y_i|

over the B examples of a global batch (every micro-batch and rank): the loop divides the
micro-batch sums by :meth:`SFTObjective.units` of the global batch — its examples, or its
completion tokens — so with ``example`` every example weighs the same whatever its length, and
with ``token`` every token does (TRL's SFTTrainer, which divides by ``num_items_in_batch``).
``nll_per_token`` (logged) is the token mean either way, and ``num_tokens`` the input tokens
(prompt and completion, and a chat template's untrained tokens after an ``assistant_only_loss``
span, :attr:`~dpokit.data.sft.SFTSequence.tail`) trained on since the start, as TRL's
SFTTrainer logs it (``attention_mask.sum()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dpokit.data import PairBatch
from dpokit.data.collate import pack_sequences, pad_sequences
from dpokit.data.sft import SFTSequence, load_sft_sequences
from dpokit.objectives.base import (
    NUM_TOKENS,
    LogpsModule,
    Objective,
    Output,
    count,
    input_tokens,
    num_tokens,
)


class SFTObjective(Objective):
    """Mean over examples of the per-token NLL of each completion.

    ``config`` holds the model and data concerns plus ``completion_column`` and
    ``messages_column`` (``SFTConfig``).
    """

    unit = "examples"
    metric_keys = ("nll_tokens", "tokens", "entropy", "top1", "count", NUM_TOKENS, "loss")

    def __init__(self, config: Any, tokenizer: Any):
        """See the class docstring."""
        self.config, self.tokenizer = config, tokenizer

    def load(self, path: str, split: str | None, *,
             progress: bool | None = None) -> list[SFTSequence]:
        """Prompt/completion or conversation rows, tokenised and truncated."""
        c = self.config
        return load_sft_sequences(path, self.tokenizer, settings=c.tokenize_settings,
                                  cache_dir=getattr(c, "data_cache_dir", None),
                                  prompt_column=c.prompt_column,
                                  completion_column=c.completion_column,
                                  messages_column=c.messages_column,
                                  text_column=c.text_column,
                                  completion_only_loss=c.completion_only_loss,
                                  assistant_only_loss=c.assistant_only_loss, split=split,
                                  progress=progress,
                                  dataset_num_proc=getattr(c, "dataset_num_proc", None))

    @property
    def per_token(self) -> bool:
        return self.config.loss_normalization == "token"

    def units(self, items: Sequence[SFTSequence]) -> float:
        """The examples, or (``loss_normalization: token``) the completion tokens, of a global
        batch: what the loss sums are divided by."""
        if self.per_token:
            return float(sum(len(item.completion_ids) for item in items))
        return float(len(items))

    def tokens(self, item: SFTSequence) -> int:
        """Prompt and completion tokens."""
        return len(item.prompt_ids) + len(item.completion_ids)

    def collate(self, items: Sequence[SFTSequence], indices: Sequence[int]) -> PairBatch:
        """Padded (or, with ``padding_free``, packed) sequences."""
        sequences = [(s.prompt_ids + s.completion_ids, len(s.prompt_ids)) for s in items]
        batch = (pack_sequences(sequences) if self.config.padding_free
                 else pad_sequences(sequences, pad_token_id=self.tokenizer.pad_token_id))
        batch.extras["indices"] = torch.tensor(list(indices), dtype=torch.long)
        # TRL's attention mask also covers a chat template's untrained tokens after the span
        batch.extras["input_tokens"] = input_tokens(
            len(ids) + s.tail for (ids, _), s in zip(sequences, items, strict=True))
        return batch

    def policy(self, model: nn.Module) -> LogpsModule:
        """Completion log-probs of ``model``."""
        return LogpsModule(model, chunk_size=self.config.chunk_size,
                           unpadded=self.config.unpadded, token_stats=True)

    def forward(self, policy: nn.Module, batch: PairBatch) -> Output:
        """Σ_i L_i, the NLL and token sums, per-example NLL."""
        logps, tokens, _, stats, _ = policy(batch)
        nll = -logps / tokens.clamp(min=1).to(logps.dtype)
        loss_sum = -logps.sum() if self.per_token else nll.sum()
        stats = stats.detach().double()
        sums = {"nll_tokens": (-logps.detach()).double().sum(), "tokens": tokens.double().sum(),
                "entropy": stats[:, 1].sum(), "top1": stats[:, 2].sum(),
                "count": count(len(nll), nll), NUM_TOKENS: num_tokens(policy, batch, nll),
                "loss": loss_sum.detach().double()}
        return Output(loss_sum, sums, {"logps": logps.detach(), "tokens": tokens,
                                        "loss": nll.detach()})

    def means(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``loss`` (mean per-example NLL per token), ``nll_per_token``, TRL's ``entropy`` and
        ``mean_token_accuracy`` (per completion token; 0 without tokens) and, in training,
        ``num_tokens``."""
        tokens = sums["tokens"]
        loss = sums["loss"] / (max(tokens, 1.0) if self.per_token else sums["count"])
        means = {"loss": loss,
                 "nll_per_token": sums["nll_tokens"] / max(tokens, 1.0),
                 "entropy": sums["entropy"] / tokens if tokens else 0.0,
                 "mean_token_accuracy": sums["top1"] / tokens if tokens else 0.0}
        if sums[NUM_TOKENS]:  # 0 in evaluation
            means[NUM_TOKENS] = sums[NUM_TOKENS]
        return means
