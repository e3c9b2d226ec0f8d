"""Score preference data with a policy (and optionally a reference): ``dpokit eval``.

For every pair: log π_θ(y_w|x), log π_θ(y_l|x) summed over completion tokens, their token
counts, and — with a reference, or for a reference-free loss — the implicit rewards
β log(π_θ/π_ref) and the loss of :func:`dpokit.losses.dpo_loss`. Means are reduced as sums and
counts over all batches, then divided once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dpokit.data import TokenizedPair, collate_pairs
from dpokit.errors import DpokitError
from dpokit.logps import DEFAULT_CHUNK_SIZE, PairLogps, sequence_logps
from dpokit.losses import (
    add_metric_sums,
    dpo_loss,
    metric_means,
    needs_lengths,
    needs_reference,
    preference_metrics,
)


@dataclass
class EvalResult:
    """Means over the data, and one record per pair."""

    metrics: dict[str, float]
    num_pairs: int
    per_example: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Sequence[TokenizedPair], *,
                   ref_model: nn.Module | None = None, beta: float = 0.1,
                   loss_type: str = "sigmoid", loss_options: dict[str, Any] | None = None,
                   batch_size: int = 8, pad_token_id: int = 0, layout: str = "padded",
                   chunk_size: int = DEFAULT_CHUNK_SIZE, device: str | torch.device = "cpu",
                   progress: bool = False) -> EvalResult:
    """Log-probs of every pair under ``model`` (and ``ref_model``), losses and metrics."""
    if batch_size < 1:
        raise DpokitError(f"batch_size must be ≥ 1, got {batch_size}")
    with_loss = ref_model is not None or not needs_reference(loss_type)
    records: list[dict[str, Any]] = []
    sums: dict[str, torch.Tensor] | None = None
    loss_sum = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=len(pairs), unit="pair", disable=not progress, desc="evaluating")
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate_pairs(chunk, layout, pad_token_id=pad_token_id).to(device)
        policy = sequence_logps(model, batch, chunk_size=chunk_size)
        ref: PairLogps | None = None
        if ref_model is not None:
            ref = sequence_logps(ref_model, batch, chunk_size=chunk_size)
        rows = [{"source": p.source, "row": p.row} for p in chunk]
        for i, record in enumerate(rows):
            record.update(chosen_logps=float(policy.chosen_logps[i]),
                          rejected_logps=float(policy.rejected_logps[i]),
                          chosen_tokens=int(policy.chosen_tokens[i]),
                          rejected_tokens=int(policy.rejected_tokens[i]))
        if with_loss:
            lengths = needs_lengths(loss_type) or (loss_options or {}).get("rpo_alpha")
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy.chosen_logps, policy.rejected_logps,
                None if ref is None else ref.chosen_logps,
                None if ref is None else ref.rejected_logps,
                beta=beta, loss_type=loss_type,
                chosen_lengths=policy.chosen_tokens if lengths else None,
                rejected_lengths=policy.rejected_tokens if lengths else None,
                **(loss_options or {}))
            part = preference_metrics(chosen_rewards, rejected_rewards, policy.chosen_logps,
                                      policy.rejected_logps)
            sums = part if sums is None else add_metric_sums(sums, part)
            loss_sum += losses.double().sum().cpu()
            for i, record in enumerate(rows):
                if ref is not None:
                    record.update(ref_chosen_logps=float(ref.chosen_logps[i]),
                                  ref_rejected_logps=float(ref.rejected_logps[i]))
                record.update(chosen_reward=float(chosen_rewards[i]),
                              rejected_reward=float(rejected_rewards[i]), loss=float(losses[i]))
        records.extend(rows)
        bar.update(len(chunk))
    bar.close()
    n = len(records)
    metrics = {
        "logps/chosen": sum(r["chosen_logps"] for r in records) / n,
        "logps/rejected": sum(r["rejected_logps"] for r in records) / n,
    }
    if sums is not None:
        metrics = {"loss": float(loss_sum) / n, **metric_means(sums)}
    return EvalResult(metrics=metrics, num_pairs=n, per_example=records)


def write_jsonl_atomic(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write JSON lines to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        raise DpokitError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        tmp.unlink(missing_ok=True)
