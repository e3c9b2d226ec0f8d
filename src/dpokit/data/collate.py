"""Token pairs → model batches: padded (rows of equal length) or packed (one long row).

Both layouts hold, for the 2B sequences of B pairs (chosen 0..B−1, then rejected 0..B−1):
``input_ids``, ``position_ids`` (restarting at 0 for every sequence), ``completion_mask`` (1 on
completion tokens) and ``sequence_ids`` (which of the 2B sequences a token belongs to, −1 on
padding). Padded batches also carry an ``attention_mask``; packed ones have none, so
``transformers`` detects the sequence boundaries from the restarting position ids (padding-free
training) and no token attends across a boundary.

Pairs of one group (k scored completions of one prompt, :attr:`TokenizedPair.group`) share their
sequences: each distinct completion is laid out once — in the shared layout one row
``[prompt, y_1, …, y_m]`` — and :attr:`PairBatch.pair_index` says which sequence is each pair's
chosen and rejected one.
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
    """``(2B, L)`` for padded batches, None for packed and shared (the shared layout's block
    mask is :meth:`dense_mask`, built only for a model that needs it)."""
    num_pairs: int
    """B: pairs in the batch (0 for a batch of single sequences, as in SFT)."""
    num_sequences: int = 0
    """Sequences in the batch: 2B for pairs (fewer when pairs of a group share one)."""
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
    parts: tuple[tuple[int, ...], ...] = ()
    """For the ``shared`` layout, per row the lengths ``(|x|, |y_1|, …, |y_m|)`` of its prompt
    and completions, laid out in that order from column 0 (m = 2 for a pair of its own)."""
    pair_index: Tensor | None = None
    """``(2, B)`` int64: the sequence holding each pair's chosen (row 0) and rejected (row 1)
    completion, when pairs of a group share sequences; None: chosen b, rejected B + b."""

    def dense_mask(self) -> Tensor:
        """The shared layout's block mask, ``(rows, 1, L, L)`` bool (True: may attend): a token of
        completion j sees the prompt and the earlier tokens of completion j; a padding column
        sees itself only. L² per row: only the padded decoder path builds it — the unpadded one
        (:mod:`dpokit.attention`) attends part by part from :attr:`parts`."""
        if self.layout != "shared":
            raise DpokitError(f"dense_mask is the shared layout's, not the {self.layout} one's")
        rows, length = self.input_ids.shape
        segment = torch.full((rows, length), -1, dtype=torch.long, device=self.input_ids.device)
        for i, lengths in enumerate(self.parts):
            start = 0
            for j, n in enumerate(lengths):
                segment[i, start:start + n] = j
                start += n
        query, key = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
        allowed = causal & (key >= 0) & ((key == 0) | (key == query))
        allowed |= torch.eye(length, dtype=torch.bool, device=segment.device)
        return allowed[:, None]

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
                       predictor=move(self.predictor), pair_index=move(self.pair_index),
                       extras={k: move(v) for k, v in self.extras.items()})


def _sequences(pairs: Sequence[TokenizedPair]
               ) -> tuple[list[tuple[list[int], int]], Tensor | None]:
    """The sequences (tokens, prompt length) of B pairs and their :attr:`PairBatch.pair_index`:
    without groups the 2B sequences, all chosen then all rejected (index None); pairs of a group
    share each distinct completion's sequence."""
    if all(p.group < 0 for p in pairs):
        return ([(p.prompt_ids + p.chosen_ids, len(p.prompt_ids)) for p in pairs]
                + [(p.prompt_ids + p.rejected_ids, len(p.prompt_ids)) for p in pairs]), None
    rows, pair_index = _group_rows(pairs)
    sequences = [(prompt + completion, len(prompt)) for prompt, completions in rows
                 for completion in completions]
    return sequences, pair_index


def _group_rows(pairs: Sequence[TokenizedPair]
                ) -> tuple[list[tuple[list[int], list[list[int]]]], Tensor | None]:
    """``(prompt, distinct completions)`` per row and the sequence of each pair's chosen and
    rejected completion, numbering the rows' completions in order. A pair of its own is one row
    ``(x, [y_w, y_l])``; the pairs of one group (same group id and prompt) share one row, each
    distinct completion once, in order of first use. Index None when no sequence is shared."""
    rows: list[tuple[list[int], list[list[int]]]] = []
    where: dict[tuple, tuple[int, dict[tuple[int, ...], int]]] = {}
    chosen, rejected = [], []
    for i, pair in enumerate(pairs):
        key = (pair.group, tuple(pair.prompt_ids)) if pair.group >= 0 else ("pair", i)
        if key not in where:
            where[key] = (len(rows), {})
            rows.append((pair.prompt_ids, []))
        row, seen = where[key]
        for completion, out in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
            # a pair of its own keeps both sequences, even when its completions are equal
            ids = tuple(completion) if pair.group >= 0 else (len(rows[row][1]),)
            if ids not in seen:
                seen[ids] = len(rows[row][1])
                rows[row][1].append(completion)
            out.append((row, seen[ids]))
    if all(p.group < 0 for p in pairs):
        return rows, None
    offsets = [0]
    for _, completions in rows:
        offsets.append(offsets[-1] + len(completions))
    index = torch.tensor([[offsets[r] + j for r, j in chosen],
                          [offsets[r] + j for r, j in rejected]], dtype=torch.long)
    return rows, index


def _per_pair(pairs: Sequence[TokenizedPair]) -> dict[str, Tensor | None]:
    """The optional per-pair columns of a batch: weights, margins, soft labels."""
    return {"weights": _optional(pairs, "weight"), "margins": _optional(pairs, "margin"),
            "label_probs": _optional(pairs, "label_prob")}


def _optional(pairs: Sequence[TokenizedPair], name: str) -> Tensor | None:
    """The column ``name`` of the pairs, each pair without it at the neutral value: weight 1,
    margin 0, and label_prob 1 — a pair is chosen ≻ rejected, the hard label (0 would flip it)."""
    values = [getattr(p, name) for p in pairs]
    if all(v is None for v in values):
        return None
    default = 0.0 if name == "margin" else 1.0
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
    """Pad the 2B sequences of B pairs to one length (chosen first, then rejected; a group's
    pairs share their sequences, :func:`_sequences`)."""
    sequences, pair_index = _sequences(pairs)
    batch = pad_sequences(sequences, pad_token_id=pad_token_id,
                          padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
                          num_pairs=len(pairs))
    return replace(batch, pair_index=pair_index, **_per_pair(pairs))


def collate_packed(pairs: Sequence[TokenizedPair]) -> PairBatch:
    """Concatenate the 2B sequences of B pairs into one row (chosen first, then rejected; a
    group's pairs share their sequences)."""
    sequences, pair_index = _sequences(pairs)
    batch = pack_sequences(sequences, num_pairs=len(pairs))
    return replace(batch, pair_index=pair_index, **_per_pair(pairs))


def collate_shared(pairs: Sequence[TokenizedPair], *, pad_token_id: int) -> PairBatch:
    """One row per pair, ``[prompt, chosen, rejected]``: the prompt is computed once — and one
    row ``[prompt, y_1, …, y_m]`` for the pairs of a group, each distinct completion once.

    Positions continue from the prompt in every completion, and the block mask
    (:meth:`PairBatch.dense_mask`, from :attr:`PairBatch.parts`) lets a completion's tokens see
    the prompt and its own earlier tokens — so every hidden state equals the one of its own
    ``prompt + completion`` sequence. The first token of each completion after the first is
    predicted from the prompt's last position (``predictor``). Tokens per pair: |x| + |y_w| +
    |y_l| instead of 2|x| + |y_w| + |y_l| (plus padding); per group |x| + Σ_j |y_j|.
    """
    if not pairs:
        raise DpokitError("cannot collate an empty batch")
    rows, pair_index = _group_rows(pairs)
    b = len(rows)
    length = max(len(prompt) + sum(map(len, completions)) for prompt, completions in rows)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    completion_mask = torch.zeros((b, length), dtype=torch.bool)
    sequence_ids = torch.full((b, length), -1, dtype=torch.long)
    predictor = torch.full((b, length), -1, dtype=torch.long)
    numbers = _sequence_numbers(rows, pair_index is None)
    for i, (prompt, completions) in enumerate(rows):
        p = len(prompt)
        input_ids[i, :p] = torch.tensor(prompt, dtype=torch.long)
        position_ids[i, :p] = torch.arange(p)
        sequence_ids[i, :p] = numbers[i][0]
        start = p
        for j, completion in enumerate(completions):
            n, stop = len(completion), start + len(completion)
            input_ids[i, start:stop] = torch.tensor(completion, dtype=torch.long)
            position_ids[i, start:stop] = torch.arange(p, p + n)
            sequence_ids[i, start:stop] = numbers[i][j]
            completion_mask[i, start:stop] = True
            predictor[i, start:stop] = torch.arange(start - 1, stop - 1)
            if n:  # the first token follows the prompt (an empty completion has none)
                predictor[i, start] = p - 1
            start = stop
    return PairBatch("shared", input_ids, position_ids, completion_mask, sequence_ids,
                     attention_mask=None, num_pairs=len(pairs),
                     num_sequences=sum(len(c) for _, c in rows), **_per_pair(pairs),
                     predictor=predictor, pair_index=pair_index,
                     parts=tuple((len(prompt), *map(len, completions))
                                 for prompt, completions in rows))


def _sequence_numbers(rows: list[tuple[list[int], list[list[int]]]],
                      pairs_of_their_own: bool) -> list[list[int]]:
    """The sequence number of each completion of each row: pairs of their own are numbered as
    in the other layouts (chosen b, rejected B + b); grouped rows in order."""
    if pairs_of_their_own:
        return [[i, len(rows) + i] for i in range(len(rows))]
    numbers, next_number = [], 0
    for _, completions in rows:
        numbers.append(list(range(next_number, next_number + len(completions))))
        next_number += len(completions)
    return numbers


def as_padded(batch: PairBatch) -> PairBatch:
    """The sequences of a ``packed`` or ``shared`` batch laid out right-padded: the same
    sequence numbers, pairs (:attr:`PairBatch.pair_index`) and per-pair columns, each sequence
    ``prompt + completion`` in a row of its own with a 2D attention mask — the plain batch every
    causal LM takes. A ``padded`` batch is returned as it is."""
    if batch.layout == "padded":
        return batch
    ids, numbers = batch.input_ids.cpu(), batch.sequence_ids.cpu()
    completion = batch.completion_mask.cpu()
    sequences: dict[int, tuple[list[int], int]] = {}
    if batch.layout == "packed":
        for s in numbers[0].unique().tolist():
            if s < 0:
                continue
            where = numbers[0] == s
            sequences[s] = (ids[0][where].tolist(), int((~completion[0][where]).sum()))
    else:
        for row, lengths in enumerate(batch.parts):
            prompt = ids[row, :lengths[0]].tolist()
            start = lengths[0]
            for n in lengths[1:]:
                sequences[int(numbers[row, start])] = (prompt + ids[row, start:start + n].tolist(),
                                                       len(prompt))
                start += n
    count = batch.num_sequences or len(sequences)
    if sorted(sequences) != list(range(count)):
        raise DpokitError("the batch's sequence numbers are not 0..n−1; cannot lay it out padded")
    padded = pad_sequences([sequences[s] for s in range(count)], pad_token_id=0,
                           num_pairs=batch.num_pairs)
    return replace(padded, weights=batch.weights, margins=batch.margins,
                   label_probs=batch.label_probs, extras=batch.extras,
                   pair_index=batch.pair_index).to(batch.input_ids.device)


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
