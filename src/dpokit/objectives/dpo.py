"""The DPO-family objective on offline preference pairs (:func:`dpokit.losses.dpo_loss`).

Per pair i, with summed completion log-probs of the policy and the reference:

    L_i = w_i · loss_type(log π_θ(y_w), log π_θ(y_l), log π_ref(y_w), log π_ref(y_l); β, …)

w_i the row's ``weight`` column (1 without one); margins m_i (the ``margin`` column) and soft
labels p_i (the ``label_prob`` column) reach the losses that read them (``odpo``,
``sigmoid_soft``); LD-DPO (``ld_alpha``) and WPO (``use_weighting``) act on
the log-probs. ``forward`` returns Σ_i L_i and the metric sums of :mod:`dpokit.losses.metrics`:
TRL 1.16's ``rewards/*``, ``logps/*`` and ``logits/*``, and ``num_tokens`` (input tokens trained
on since the start, 2|x| + |y_w| + |y_l| per pair; training records only).

Without a reference for a loss that needs one (``dpokit eval`` with no ``--ref-model``) the
objective only scores: it reports log-probs, no loss.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from dpokit.data import PairBatch, TokenizedPair, collate_pairs, load_preference_pairs
from dpokit.errors import DpokitError
from dpokit.losses import (
    METRIC_KEYS,
    dpo_loss,
    is_batch_coupled,
    metric_means,
    needs_label_probs,
    needs_lengths,
    needs_margins,
    preference_metrics,
    sorting_losses,
)
from dpokit.losses.metrics import (
    LOGIT_METRIC_KEYS,
    TOKEN_METRIC_KEYS,
    logit_means,
    logit_metrics,
    token_means,
    token_metrics,
)
from dpokit.objectives.base import (
    NUM_TOKENS,
    LogpsModule,
    Objective,
    Output,
    count,
    input_tokens,
    num_tokens,
)
from dpokit.objectives.reference import Reference

log = logging.getLogger("dpokit.objectives")

_LOGPS_KEYS = ("logps/chosen", "logps/rejected", "count")


class DPOObjective(Objective):
    """A DPO-family loss on preference pairs.

    Args:
        config: a :class:`~dpokit.objectives.config.PreferenceConfig` combined with the model
            and data concerns (``DPOConfig`` in training, ``EvalConfig`` in ``dpokit eval``).
        tokenizer: the policy's tokenizer (for loading and padding).
        reference: π_ref's log-probs; may be set later (training sets it up once the data is
            read), must be set before :meth:`forward`.
        score_only: allow a loss that needs a reference to run without one, reporting log-probs
            only (``dpokit eval`` without ``--ref-model``).
    """

    unit = "pairs"

    def __init__(self, config: Any, tokenizer: Any, reference: Reference | None = None, *,
                 score_only: bool = False):
        """See the class docstring."""
        self.config, self.tokenizer = config, tokenizer
        self.needs_reference = config.needs_reference
        self.reference = reference if self.needs_reference else Reference("none")
        self.score_only = score_only
        self.lengths = needs_lengths(config.loss_type) or bool(config.rpo_alpha)
        self.margins = needs_margins(config.loss_type)
        self.label_probs = needs_label_probs(config.loss_type)

    @property
    def splittable(self) -> bool:
        """Offline pairs and no loss term that couples the micro-batch (``aot`` sorts over it,
        ``sft`` is its token mean: their values depend on which pairs share a forward)."""
        return super().splittable and not is_batch_coupled(self.config.loss_type)

    @property
    def with_loss(self) -> bool:
        """Whether a loss is computed (False only for scoring without a reference)."""
        return not (self.score_only and self.needs_reference
                    and (self.reference is None or self.reference.mode == "none"))

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """TRL's reward/log-prob/logit metrics, ``count``, ``num_tokens`` and ``loss``
        (log-probs only if scoring)."""
        if not self.with_loss:
            return _LOGPS_KEYS
        return (*METRIC_KEYS, *LOGIT_METRIC_KEYS, *TOKEN_METRIC_KEYS, NUM_TOKENS, "loss")

    def load(self, path: str, split: str | None, *,
             progress: bool | None = None) -> Sequence[TokenizedPair]:
        """Preference pairs of ``path`` with this config's columns and tokenisation; a loss that
        reads margins or soft labels needs one on every row (the first row without is named)."""
        from dpokit.data.store import present

        pairs = load_preference_pairs(path, self.tokenizer,
                                      settings=self.config.tokenize_settings,
                                      columns=self.config.columns, split=split,
                                      progress=progress,  # cached in training only
                                      cache_dir=getattr(self.config, "data_cache_dir", None),
                                      dataset_num_proc=getattr(self.config, "dataset_num_proc",
                                                               None))
        losses = ", ".join(self.config.loss_type)
        sorting = sorting_losses(self.config.loss_type)
        if sorting and present(pairs, "weight").any():
            raise DpokitError(f"{path}: loss_type {', '.join(sorting)} sorts the batch (its terms "
                              f"are no pair's), so the per-pair weights of column "
                              f"{self.config.weight_column!r} cannot apply; remove the column or "
                              f"set weight_column to a name the data does not have")
        for needed, attr, key in ((self.margins, "margin", "margin_column"),
                                  (self.label_probs, "label_prob", "label_prob_column")):
            column = getattr(self.config, key)
            given = present(pairs, attr)  # a column of the store: no pair is built
            if needed:
                if not given.all():
                    missing = pairs[int(given.argmin())]  # the first without
                    raise DpokitError(f"{missing.source}, row {missing.row}: loss_type {losses} "
                                      f"needs a per-pair {attr}, and the row has no {column!r} "
                                      f"(set {key})")
            elif given.any():
                log.warning("%s has a %s column (%s) but loss_type %s reads none; it is "
                            "ignored", path, attr, column, losses)
        return pairs

    def tokens(self, item: TokenizedPair) -> int:
        """Tokens of one pair in this layout (the prompt once in the shared layout)."""
        prompt_rows = 1 if self.config.layout == "shared" else 2
        return prompt_rows * len(item.prompt_ids) + len(item.chosen_ids) + len(item.rejected_ids)

    def collate(self, items: Sequence[TokenizedPair], indices: Sequence[int]) -> PairBatch:
        """Pairs in the config's layout (a group's pairs sharing their prompt and completions,
        except under LD-DPO, whose weights depend on the partner); ``extras["indices"]`` finds
        precomputed π_ref rows."""
        if self.config.ld_alpha is not None:
            items = [replace(p, group=-1) if p.group >= 0 else p for p in items]
        batch = collate_pairs(items, self.config.layout, pad_token_id=self.tokenizer.pad_token_id)
        batch.extras["indices"] = torch.tensor(list(indices), dtype=torch.long)
        batch.extras["input_tokens"] = input_tokens(
            2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items)
        return batch

    def policy(self, model: nn.Module) -> LogpsModule:
        """Log-probs with LD-DPO's α, for WPO the per-sequence statistic, and the mean logits
        of ``logits/*``."""
        c = self.config
        return LogpsModule(model, chunk_size=c.chunk_size, ld_alpha=c.ld_alpha,
                           wpo=c.use_weighting, unpadded=c.unpadded, token_stats=True)

    def forward(self, policy: nn.Module, batch: PairBatch) -> Output:
        """Σ_i w_i L_i over the B pairs of ``batch``, metric sums, per-pair values."""
        logps, tokens, wpo, stats, plain = policy(batch)
        b = batch.num_pairs
        chosen, rejected = logps[:b], logps[b:]
        examples = {"chosen_logps": chosen.detach(), "rejected_logps": rejected.detach(),
                    "chosen_tokens": tokens[:b], "rejected_tokens": tokens[b:]}
        if not self.with_loss:
            sums = {"logps/chosen": chosen.detach().double().sum(),
                    "logps/rejected": rejected.detach().double().sum(), "count": count(b, chosen)}
            return Output(chosen.sum() * 0.0, sums, examples)
        if self.reference is None:
            raise RuntimeError("DPOObjective.forward before a reference was set")
        ref = self.reference.logps(batch)
        use_wpo = self.config.use_weighting
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, None if ref is None else ref[0], None if ref is None else ref[1],
            beta=self.config.beta, loss_type=self.config.loss_type,
            chosen_lengths=tokens[:b] if self.lengths else None,
            rejected_lengths=tokens[b:] if self.lengths else None,
            margins=batch.margins.to(chosen) if self.margins else None,
            label_probs=batch.label_probs.to(chosen) if self.label_probs else None,
            chosen_wpo_logweights=wpo[:b] if use_wpo else None,
            rejected_wpo_logweights=wpo[b:] if use_wpo else None,
            chosen_nll_logps=plain[:b] if self.config.ld_alpha is not None else None,
            **self.config.loss_options())
        if batch.weights is not None:
            examples["weight"] = batch.weights
            losses = losses * batch.weights.to(losses)
        loss_sum = losses.sum()
        sums = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        sums.update(logit_metrics(stats[:b, 0], stats[b:, 0], tokens[:b], tokens[b:]))
        sums.update(token_metrics(stats, b))
        sums[NUM_TOKENS] = num_tokens(policy, batch, chosen)
        sums["loss"] = loss_sum.detach().double()
        if ref is not None:
            examples.update(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
        examples.update(chosen_reward=chosen_rewards, rejected_reward=rejected_rewards,
                        loss=losses.detach())
        return Output(loss_sum, sums, examples)

    def means(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``loss`` and TRL's metric means (or the mean log-probs when only scoring)."""
        n = sums["count"]
        if not self.with_loss:
            return {"logps/chosen": sums["logps/chosen"] / n,
                    "logps/rejected": sums["logps/rejected"] / n}
        means = {"loss": sums["loss"] / n, **metric_means(sums), **logit_means(sums),
                 **token_means(sums)}
        if sums[NUM_TOKENS]:  # 0 in evaluation: TRL's eval_num_tokens repeats the training count
            means[NUM_TOKENS] = sums[NUM_TOKENS]
        return means

    def postfix(self, record: Mapping[str, float]) -> dict[str, str]:
        """Preference accuracy and pairs/s."""
        return {"acc": f"{record['rewards/accuracies']:.2f}",
                "pairs/s": f"{record['pairs_per_second']:.1f}"}
