"""Token pairs → model batches: padded (rows of equal length) or packed (one long row).

Both layouts hold, for the 2B sequences of B pairs (chosen 0..B−1, then rejected 0..B−1):
``input_ids``, ``position_ids`` (restarting at 0 for every sequence), ``completion_mask`` (1 on
completion tokens) and ``sequence_ids`` (which of the 2B sequences a token belongs to, −1 on
padding). Padded batches also carry an ``attention_mask``; packed ones have none, so
``transformers`` detects the sequence boundaries from the restarting position ids (padding-free
training) and no token attends across a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError


@dataclass(frozen=True)
class PairBatch:
    """A batch of B preference pairs laid out for one forward pass over 2B sequences."""

    layout: Literal["padded", "packed", "shared"]
    input_ids: Tensor
    """``(2B, L)`` padded, or ``(1, total_tokens)`` packed; int64."""
    position_ids: Tensor
    """Same shape; position within each sequence."""
    completion_mask: Tensor
    """Same shape; bool, True on completion tokens."""
    sequence_ids: Tensor
    """Same shape; int64 index of the sequence (0..2B−1) of each token, −1 on padding."""
    attention_mask: Tensor | None
    """``(2B, L)`` for padded batches, None for packed, ``(B, 1, L, L)`` bool for shared."""
    num_pairs: int
    """B: pairs in the batch (0 for a batch of single sequences, as in SFT)."""
    num_sequences: int = 0
    """Sequences in the batch: 2B for pairs."""
    weights: Tensor | None = None
    """``(B,)`` per-pair weights from the data, if it has a weight column."""
    margins: Tensor | None = None
    """``(B,)`` per-pair margins from the data, if it has a margin column."""
    label_probs: Tensor | None = None
    """``(B,)`` per-pair soft labels P(chosen ≻ rejected), if the data has a label_prob column."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Other per-pair tensors, e.g. precomputed ``ref_chosen_logps``/``ref_rejected_logps``."""
    predictor: Tensor | None = None
    """For the ``shared`` layout: per token, the column whose hidden state predicts it (−1 for
    tokens that are not scored). None: the previous column of the same sequence."""

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.sequence_ids >= 0).sum())

    def to(self, device: torch.device | str) -> PairBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                       completion_mask=move(self.completion_mask),
                       sequence_ids=move(self.sequence_ids),
                       attention_mask=move(self.attention_mask), weights=move(self.weights),
                       margins=move(self.margins), label_probs=move(self.label_probs),
                       predictor=move(self.predictor),
                       extras={k: move(v) for k, v in self.extras.items()})


def _sequences(pairs: Sequence[TokenizedPair]) -> list[tuple[list[int], int]]:
    """The 2B sequences (tokens, prompt length): all chosen, then all rejected."""
    return ([(p.prompt_ids + p.chosen_ids, len(p.prompt_ids)) for p in pairs]
            + [(p.prompt_ids + p.rejected_ids, len(p.prompt_ids)) for p in pairs])


def _per_pair(pairs: Sequence[TokenizedPair]) -> dict[str, Tensor | None]:
    """The optional per-pair columns of a batch: weights, margins, soft labels."""
    return {"weights": _optional(pairs, "weight"), "margins": _optional(pairs, "margin"),
            "label_probs": _optional(pairs, "label_prob")}


def _optional(pairs: Sequence[TokenizedPair], name: str) -> Tensor | None:
    values = [getattr(p, name) for p in pairs]
    if all(v is None for v in values):
        return None
    default = 1.0 if name == "weight" else 0.0
    return torch.tensor([default if v is None else v for v in values], dtype=torch.float32)


def pad_sequences(sequences: Sequence[tuple[list[int], int]], *, pad_token_id: int,
                  padding_side: Literal["right", "left"] = "right",
                  pad_to_multiple_of: int | None = None, num_pairs: int = 0) -> PairBatch:
    """Pad ``(token ids, prompt length)`` sequences to one length; positions count real tokens."""
    if not sequences:
        raise DpokitError("cannot collate an empty batch")
    length = max(len(ids) for ids, _ in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    n = len(sequences)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    completion_mask = torch.zeros((n, length), dtype=torch.bool)
    sequence_ids = torch.full((n, length), -1, dtype=torch.long)
    for i, (ids, prompt_length) in enumerate(sequences):
        start = 0 if padding_side == "right" else length - len(ids)
        span = slice(start, start + len(ids))
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        position_ids[i, span] = torch.arange(len(ids))
        completion_mask[i, start + prompt_length:start + len(ids)] = True
        sequence_ids[i, span] = i
    return PairBatch("padded", input_ids, position_ids, completion_mask, sequence_ids,
                     attention_mask=(sequence_ids >= 0).long(), num_pairs=num_pairs,
                     num_sequences=n)


def pack_sequences(sequences: Sequence[tuple[list[int], int]], *,
                   num_pairs: int = 0) -> PairBatch:
    """Concatenate ``(token ids, prompt length)`` sequences into one row, positions restarting."""
    if not sequences:
        raise DpokitError("cannot collate an empty batch")
    input_ids, position_ids, completion_mask, sequence_ids = [], [], [], []
    for i, (ids, prompt_length) in enumerate(sequences):
        input_ids.append(torch.tensor(ids, dtype=torch.long))
        position_ids.append(torch.arange(len(ids)))
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[prompt_length:] = True
        completion_mask.append(mask)
        sequence_ids.append(torch.full((len(ids),), i, dtype=torch.long))
    return PairBatch("packed", torch.cat(input_ids)[None], torch.cat(position_ids)[None],
                     torch.cat(completion_mask)[None], torch.cat(sequence_ids)[None],
                     attention_mask=None, num_pairs=num_pairs, num_sequences=len(sequences))


def collate_padded(pairs: Sequence[TokenizedPair], *, pad_token_id: int,
                   padding_side: Literal["right", "left"] = "right",
                   pad_to_multiple_of: int | None = None) -> PairBatch:
    """Pad the 2B sequences of B pairs to one length (chosen first, then rejected)."""
    batch = pad_sequences(_sequences(pairs), pad_token_id=pad_token_id,
                          padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
                          num_pairs=len(pairs))
    return replace(batch, **_per_pair(pairs))


def collate_packed(pairs: Sequence[TokenizedPair]) -> PairBatch:
    """Concatenate the 2B sequences of B pairs into one row (chosen first, then rejected)."""
    batch = pack_sequences(_sequences(pairs), num_pairs=len(pairs))
    return replace(batch, **_per_pair(pairs))


def collate_shared(pairs: Sequence[TokenizedPair], *, pad_token_id: int) -> PairBatch:
    """One row per pair, ``[prompt, chosen, rejected]``: the prompt is computed once.

    Positions continue from the prompt in both completions, and a block mask lets chosen tokens
    see the prompt and earlier chosen tokens, rejected tokens the prompt and earlier rejected
    tokens — so every hidden state equals the one of its own ``prompt + completion`` sequence.
    The first rejected token is predicted from the prompt's last position (``predictor``).
    Tokens per pair: |x| + |y_w| + |y_l| instead of 2|x| + |y_w| + |y_l| (plus padding).
    """
    if not pairs:
        raise DpokitError("cannot collate an empty batch")
    b = len(pairs)
    length = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    completion_mask = torch.zeros((b, length), dtype=torch.bool)
    sequence_ids = torch.full((b, length), -1, dtype=torch.long)
    segment = torch.full((b, length), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    predictor = torch.full((b, length), -1, dtype=torch.long)
    for i, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        input_ids[i, :p + c + r] = torch.tensor(pair.prompt_ids + pair.chosen_ids
                                                + pair.rejected_ids)
        position_ids[i, :p] = torch.arange(p)
        position_ids[i, p:p + c] = torch.arange(p, p + c)
        position_ids[i, p + c:p + c + r] = torch.arange(p, p + r)
        segment[i, :p], segment[i, p:p + c], segment[i, p + c:p + c + r] = 0, 1, 2
        sequence_ids[i, :p + c] = i
        sequence_ids[i, p + c:p + c + r] = b + i
        completion_mask[i, p:p + c + r] = True
        predictor[i, p:p + c] = torch.arange(p - 1, p + c - 1)
        predictor[i, p + c:p + c + r] = torch.cat([torch.tensor([p - 1]),
                                                   torch.arange(p + c, p + c + r - 1)])
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves only
    return PairBatch("shared", input_ids, position_ids, completion_mask, sequence_ids,
                     attention_mask=allowed[:, None], num_pairs=b, num_sequences=2 * b,
                     **_per_pair(pairs),
                     predictor=predictor)


LAYOUTS = ("padded", "packed", "shared")


def collate_pairs(pairs: Sequence[TokenizedPair], layout: str, *,
                  pad_token_id: int) -> PairBatch:
    """B pairs in the named layout: ``padded``, ``packed`` (padding-free) or ``shared`` (the
    prompt once per pair)."""
    if layout == "packed":
        return collate_packed(pairs)
    if layout == "shared":
        return collate_shared(pairs, pad_token_id=pad_token_id)
    if layout == "padded":
        return collate_padded(pairs, pad_token_id=pad_token_id)
    raise DpokitError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
