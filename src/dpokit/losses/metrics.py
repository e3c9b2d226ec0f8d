"""Preference metrics as sums and a count, so that micro-batches and ranks reduce exactly.

:func:`preference_metrics` returns, for one batch, the SUM over pairs of each metric and the
number of pairs; add those across micro-batches (:func:`add_metric_sums`) and ranks
(``all_reduce`` of ``torch.stack([sums[k] for k in METRIC_KEYS])``), then divide once with
:func:`metric_means`. The means are TRL's logged metrics:

    rewards/chosen      mean of β(log π_θ(y_w) − log π_ref(y_w))   (the rewards dpo_loss returns)
    rewards/rejected    mean of β(log π_θ(y_l) − log π_ref(y_l))
    rewards/accuracies  fraction of pairs with chosen reward > rejected reward (ties count 0)
    rewards/margins     mean of chosen reward − rejected reward
    logps/chosen        mean of log π_θ(y_w|x) (summed over tokens)
    logps/rejected      mean of log π_θ(y_l|x)

and, per completion token rather than per pair (:func:`logit_metrics`, :func:`logit_means`):

    logits/chosen       mean over the chosen completions' tokens of the vocabulary-mean logit
                        (1/V) Σ_v z_v at the position predicting the token
    logits/rejected     the same over the rejected completions' tokens

TRL 1.16 definition (trl/kernels/chunked_logprob.py:382, ``mean_logits = z_sum / vocab`` with
``z_sum`` the sum of the transformed logits z over the vocabulary; trl/trainer/dpo_trainer.py:
1554-1568, Σ of ``mean_logits`` over the completion tokens / their number, 0 without tokens).
and ``entropy`` (mean over every completion token of the next-token entropy) and
``mean_token_accuracy`` (fraction of the chosen completions' tokens that are the policy's argmax;
:func:`token_metrics`). TRL logs the mean of its per-micro-batch values over a logging window;
here the sums and token counts of the whole window are divided once (the same when
micro-batches hold equal tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
METRIC_KEYS = (*METRIC_NAMES, "count")
"""Keys of the sums dictionary, in a fixed order for stacking before an ``all_reduce``."""


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy_chosen_logps: Tensor, policy_rejected_logps: Tensor
                       ) -> dict[str, Tensor]:
    """Sums over the batch of each metric in :data:`METRIC_NAMES`, plus ``count`` (pairs).

    Args:
        chosen_rewards: ``(B,)`` from :func:`~dpokit.losses.dpo.dpo_loss`.
        rejected_rewards: ``(B,)``.
        policy_chosen_logps: ``(B,)`` summed log π_θ(y_w|x).
        policy_rejected_logps: ``(B,)`` summed log π_θ(y_l|x).

    Returns:
        ``{key: 0-dim float64 tensor}`` for every key of :data:`METRIC_KEYS`, detached, on the
        inputs' device (no host synchronisation).
    """
    chosen, rejected = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    sums = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).double().sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": policy_chosen_logps.detach().double().sum(),
        "logps/rejected": policy_rejected_logps.detach().double().sum(),
    }
    sums["count"] = torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device)
    return sums


LOGIT_METRIC_NAMES = ("logits/chosen", "logits/rejected")
LOGIT_METRIC_KEYS = (*LOGIT_METRIC_NAMES, "tokens/chosen", "tokens/rejected")
"""Keys of :func:`logit_metrics`'s sums: the two logit sums and their token counts."""


def logit_metrics(chosen_mean_logits: Tensor, rejected_mean_logits: Tensor,
                  chosen_tokens: Tensor, rejected_tokens: Tensor) -> dict[str, Tensor]:
    """Sums over the batch for :data:`LOGIT_METRIC_NAMES`, and the completion tokens they span.

    Args:
        chosen_mean_logits: ``(B,)`` per chosen completion, Σ over its tokens of the
            vocabulary-mean logit (``CompletionLogps.mean_logits``).
        rejected_mean_logits: ``(B,)`` the same for the rejected completions.
        chosen_tokens: ``(B,)`` completion tokens of each chosen completion.
        rejected_tokens: ``(B,)``.

    Returns:
        ``{key: 0-dim float64 tensor}`` for every key of :data:`LOGIT_METRIC_KEYS`, detached.
    """
    return {"logits/chosen": chosen_mean_logits.detach().double().sum(),
            "logits/rejected": rejected_mean_logits.detach().double().sum(),
            "tokens/chosen": chosen_tokens.detach().double().sum(),
            "tokens/rejected": rejected_tokens.detach().double().sum()}


def logit_means(sums: Mapping[str, Tensor | float]) -> dict[str, float]:
    """``logits/chosen`` and ``logits/rejected``: each logit sum over its token count (0.0 when
    there are no tokens, as TRL)."""
    means = {}
    for name, tokens in zip(LOGIT_METRIC_NAMES, ("tokens/chosen", "tokens/rejected"),
                            strict=True):
        count = float(sums[tokens])
        means[name] = float(sums[name]) / count if count else 0.0
    return means


TOKEN_METRIC_NAMES = ("entropy", "mean_token_accuracy")
TOKEN_METRIC_KEYS = ("entropy", "top1/chosen")
"""Keys of :func:`token_metrics`'s sums (their token counts are :data:`LOGIT_METRIC_KEYS`')."""


def token_metrics(stats: Tensor, num_pairs: int) -> dict[str, Tensor]:
    """Sums over the batch for TRL 1.16's ``entropy`` and ``mean_token_accuracy``.

    Args:
        stats: ``(2B, 3)`` per sequence (chosen first, then rejected), the sums over its
            completion tokens of the mean logit, the next-token entropy and the argmax hits
            (``LogpsModule``'s ``stats``).
        num_pairs: B.

    Returns:
        ``{"entropy": Σ over every completion token, "top1/chosen": hits over the chosen
        completions' tokens}``, 0-dim float64, detached. TRL: ``entropy`` averages over the
        chosen and rejected completion tokens, ``mean_token_accuracy`` over the chosen ones
        (trl/trainer/dpo_trainer.py:1536-1546, 1570-1579)."""
    stats = stats.detach().double()
    return {"entropy": stats[:, 1].sum(), "top1/chosen": stats[:num_pairs, 2].sum()}


def token_means(sums: Mapping[str, Tensor | float]) -> dict[str, float]:
    """``entropy`` (per completion token) and ``mean_token_accuracy`` (per chosen completion
    token) from :func:`token_metrics` and :func:`logit_metrics` sums (0.0 without tokens)."""
    chosen, rejected = float(sums["tokens/chosen"]), float(sums["tokens/rejected"])
    return {"entropy": float(sums["entropy"]) / (chosen + rejected) if chosen + rejected else 0.0,
            "mean_token_accuracy": float(sums["top1/chosen"]) / chosen if chosen else 0.0}


def add_metric_sums(*parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-wise sum of several :func:`preference_metrics` results (e.g. over micro-batches)."""
    if not parts:
        raise ValueError("add_metric_sums needs at least one set of sums")
    return {key: sum((part[key] for part in parts[1:]), parts[0][key]) for key in METRIC_KEYS}


def metric_means(sums: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Divide the reduced sums by the count once: ``{metric name: mean}`` (NaN when count is 0)."""
    count = float(sums["count"])
    return {name: float(sums[name]) / count if count else float("nan") for name in METRIC_NAMES}
