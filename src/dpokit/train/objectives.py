"""What a training step optimises: SFT's NLL or a DPO-family loss, as sums and counts.

An objective turns the examples of one micro-batch into a model batch (``collate``) and that batch
into ``(loss_sum, sums)``: the SUM of per-example losses (the loop divides once by the number of
examples in the global batch, so accumulation and ranks never change the result) and metric sums
that reduce the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpokit.data import PairBatch, TokenizedPair, collate_pairs
from dpokit.data.collate import pack_sequences, pad_sequences
from dpokit.data.sft import SFTSequence
from dpokit.logps import completion_logps
from dpokit.losses import dpo_loss, needs_lengths, preference_metrics
from dpokit.train.config import DPOConfig, SFTConfig
from dpokit.train.reference import Reference


class LogpsModule(nn.Module):
    """The policy as one module whose ``forward`` returns completion log-probs.

    Wrapping this (not the bare LM) in DDP or FSDP makes every log-prob computation go through
    the wrapper's ``forward``, so gradient synchronisation and parameter gathering happen even
    though :func:`~dpokit.logps.completion_logps` calls the decoder and the LM head separately.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int, ld_alpha: float | None = None,
                 wpo: bool = False, unpadded: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size, self.ld_alpha, self.wpo = chunk_size, ld_alpha, wpo
        self.unpadded = unpadded

    def forward(self, batch: PairBatch) -> tuple[Tensor, Tensor, Tensor]:
        out = completion_logps(self.model, batch, chunk_size=self.chunk_size, wpo=self.wpo,
                               unpadded=self.unpadded,
                               ld_alpha=self.ld_alpha if batch.num_pairs else None)
        wpo = out.wpo if out.wpo is not None else torch.zeros_like(out.logps)
        return out.logps, out.tokens, wpo


@dataclass
class DPOObjective:
    """A DPO-family loss on preference pairs (:func:`dpokit.losses.dpo_loss`)."""

    config: DPOConfig
    reference: Reference
    pad_token_id: int

    def collate(self, pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> PairBatch:
        batch = collate_pairs(pairs, self.config.layout, pad_token_id=self.pad_token_id)
        batch.extras["indices"] = torch.tensor(list(indices), dtype=torch.long)
        return batch

    def __call__(self, policy: nn.Module, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logps, tokens, wpo = policy(batch)
        b = batch.num_pairs
        chosen, rejected = logps[:b], logps[b:]
        ref = self.reference.logps(batch)
        config = self.config
        lengths = needs_lengths(config.loss_type) or bool(config.rpo_alpha)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, None if ref is None else ref[0], None if ref is None else ref[1],
            beta=config.beta, loss_type=config.loss_type,
            chosen_lengths=tokens[:b] if lengths else None,
            rejected_lengths=tokens[b:] if lengths else None,
            chosen_wpo_logweights=wpo[:b] if config.use_weighting else None,
            rejected_wpo_logweights=wpo[b:] if config.use_weighting else None,
            **config.loss_options())
        if batch.weights is not None:
            losses = losses * batch.weights.to(losses)
        sums = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        return losses.sum(), sums


@dataclass
class SFTObjective:
    """Mean over examples of the per-token NLL of each completion (prompt tokens masked)."""

    config: SFTConfig
    pad_token_id: int

    def collate(self, items: Sequence[SFTSequence], indices: Sequence[int]) -> PairBatch:
        sequences = [(s.prompt_ids + s.completion_ids, len(s.prompt_ids)) for s in items]
        batch = (pack_sequences(sequences) if self.config.padding_free
                 else pad_sequences(sequences, pad_token_id=self.pad_token_id))
        batch.extras["indices"] = torch.tensor(list(indices), dtype=torch.long)
        return batch

    def __call__(self, policy: nn.Module, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logps, tokens, _ = policy(batch)
        nll = -logps / tokens.clamp(min=1).to(logps.dtype)
        sums = {"nll_tokens": (-logps.detach()).double().sum(),
                "tokens": tokens.double().sum(),
                "count": torch.tensor(float(len(nll)), dtype=torch.float64, device=nll.device)}
        return nll.sum(), sums


def metric_names(objective: Any) -> tuple[str, ...]:
    """Keys of the sums an objective returns, in a fixed order for all-reduce."""
    from dpokit.losses import METRIC_KEYS

    if isinstance(objective, SFTObjective):
        return ("nll_tokens", "tokens", "count")
    return METRIC_KEYS
