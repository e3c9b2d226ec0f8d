"""Which examples go into which batch: deterministic shuffling and sharding by rank.

The unit of batching is an example — or, for pairs drawn from one prompt's k scored completions
(:mod:`dpokit.data.groups`), the group of them: a group's pairs are consecutive in the data and
stay together in one micro-batch (its prompt and completions computed once), and ``batch_size``
counts groups. Data without groups is batched exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dpokit.errors import DpokitError

Spans = list[tuple[int, int]]
"""``(start, stop)`` of each batching unit: consecutive examples of one group."""


def group_ids(items: Sequence[Any]) -> np.ndarray:
    """The ``group`` of every item (−1 for an item of its own, or one without the field), read
    as a column when the items are a store that has one."""
    from dpokit.data.store import ItemChain

    if isinstance(items, ItemChain):  # store + list: each part as it has the field or not
        return np.concatenate([group_ids(part) for part in items.parts]
                              or [np.zeros(0, dtype=np.int64)])
    column = getattr(items, "column", None)
    if column is not None:
        try:
            return np.asarray(column("group"), dtype=np.int64)
        except (KeyError, ValueError):  # a store of items without groups (SFT sequences)
            return np.full(len(items), -1, dtype=np.int64)
    return np.fromiter((getattr(item, "group", -1) for item in items), dtype=np.int64,
                       count=len(items))


def unit_spans(groups: np.ndarray | Sequence[int]) -> Spans | None:
    """The units of examples with these group ids: runs of one group id ≥ 0, every other
    example alone. None when every unit is one example (no groups)."""
    groups = np.asarray(groups, dtype=np.int64)
    if not len(groups) or not (groups >= 0).any():
        return None
    new = np.ones(len(groups), dtype=bool)
    new[1:] = (groups[1:] != groups[:-1]) | (groups[1:] < 0)
    starts = np.flatnonzero(new).tolist()
    return list(zip(starts, [*starts[1:], len(groups)], strict=True))


def num_units(num_examples: int, spans: Spans | None) -> int:
    """How many batching units ``num_examples`` examples with these spans are."""
    return num_examples if spans is None else len(spans)


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = False,
                  spans: Spans | None = None) -> list[list[int]]:
    """Global batches of example indices for one epoch.

    The order is a permutation drawn from ``seed`` and ``epoch`` alone (a fresh
    ``torch.Generator``), so it is the same on every rank and after a resume. With ``spans``
    (:func:`unit_spans`) the units are permuted and ``batch_size`` counts units; a unit's
    examples follow each other in its batch. When the units do not divide by ``batch_size``
    the last batch is smaller (``drop_last``: left out); the trainer divides each batch's loss
    sums by that batch's own size, so every step is its batch's mean.
    """
    if batch_size < 1:
        raise DpokitError(f"batch_size must be ≥ 1, got {batch_size}")
    global _last_epoch
    key = (num_examples, batch_size, seed, epoch, shuffle, drop_last)
    if _last_epoch is not None and _last_epoch[0] == key and _last_epoch[1] is spans:
        batches = _last_epoch[2]  # the set-up's rows_used and step 1 ask for the same epoch
    else:
        batches = _epoch_batches(num_examples, batch_size, seed=seed, epoch=epoch,
                                 shuffle=shuffle, drop_last=drop_last, spans=spans)
        _last_epoch = (key, spans, batches)
    # a copy: a caller that sorts or pops a batch must not change the next caller's order
    return [list(batch) for batch in batches]


_last_epoch: tuple[tuple, Spans | None, list[list[int]]] | None = None
"""The last epoch :func:`epoch_batches` drew (private: callers get copies): at 10⁶ rows a
permutation costs ~0.3 s, and the start of a run asks for it twice."""


def _order_seed(seed: int, epoch: int) -> int:
    """The generator seed of (``seed``, ``epoch``): ``seed · 1000003 + epoch`` as always, taken
    mod 2⁶⁴ where it leaves the range ``torch.Generator.manual_seed`` takes (seeds above
    ~1.8·10¹³ raised ``Overflow when unpacking long long``)."""
    value = seed * 1_000_003 + epoch
    if not -2**63 <= value < 2**64:
        value %= 2**64
    return value


def _epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int,
                   shuffle: bool, drop_last: bool, spans: Spans | None) -> list[list[int]]:
    n = num_units(num_examples, spans)
    if shuffle:
        generator = torch.Generator().manual_seed(_order_seed(seed, epoch))
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if spans is None:
        return batches
    return [[i for unit in batch for i in range(*spans[unit])] for batch in batches]


def rows_used(num_examples: int, batch_size: int, *, seed: int, total_steps: int,
              start_step: int = 0, spans: Spans | None = None) -> list[int]:
    """The example indices the global batches of steps ``start_step`` to ``total_steps`` of
    :func:`epoch_batches` touch, sorted: every row once those steps hold a whole epoch, first
    batch to last. As many steps as an epoch that straddle two epochs are the end of one
    permutation and the start of the next, which may leave rows out."""
    if batch_size < 1:
        raise DpokitError(f"batch_size must be ≥ 1, got {batch_size}")
    per_epoch = -(-num_units(num_examples, spans) // batch_size)
    if per_epoch == 0 or total_steps <= start_step:
        return []
    if -(-start_step // per_epoch) * per_epoch + per_epoch <= total_steps:
        return list(range(num_examples))
    used: set[int] = set()
    for epoch in range(start_step // per_epoch, (total_steps - 1) // per_epoch + 1):
        batches = epoch_batches(num_examples, batch_size, seed=seed, epoch=epoch, spans=spans)
        first = max(start_step - epoch * per_epoch, 0)
        last = min(total_steps - epoch * per_epoch, per_epoch)
        for batch in batches[first:last]:
            used.update(batch)
    return sorted(used)


def shard_for_rank(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise DpokitError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start:start + base + (rank < extra)]


def micro_batches(global_indices: list[int], batch_size: int, rank: int,
                  world_size: int, groups: np.ndarray | None = None
                  ) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch, as ``(indices, weight)``.

    Every rank gets the same number: ranks whose share is shorter add zero-weight repeats of one
    example (one unit), so FSDP's and DDP's collectives (one per forward and backward) stay
    matched. ``groups`` (:func:`group_ids` of the data): ranks and micro-batches take whole
    units, ``batch_size`` of them.
    """
    if batch_size < 1:
        raise DpokitError(f"micro-batch size must be ≥ 1, got {batch_size}")
    units = units_of(global_indices, groups)
    if not units:
        raise DpokitError("an empty batch: no examples to split into micro-batches")
    mine = shard_for_rank(units, rank, world_size)
    largest = math.ceil(len(units) / world_size)
    count = max(1, math.ceil(largest / batch_size))
    micro = [([i for unit in mine[a:a + batch_size] for i in unit], 1.0)
             for a in range(0, len(mine), batch_size)]
    filler = (mine or units)[0]
    return micro + [(filler, 0.0)] * (count - len(micro))


def units_of(indices: Sequence[int], groups: np.ndarray | None) -> list[list[int]]:
    """``indices`` cut into batching units: consecutive indices of one group ≥ 0 together (no
    ``groups``: one unit per index)."""
    if groups is None:
        return [[i] for i in indices]
    units: list[list[int]] = []
    previous = -1
    for i in indices:
        group = int(groups[i])
        if group >= 0 and group == previous and units[-1][-1] == i - 1:
            units[-1].append(i)
        else:
            units.append([i])
        previous = group
    return units
