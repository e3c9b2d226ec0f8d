"""Epoch order, global batches, micro-batches and rank sharding against brute-force oracles,
from a review's findings (the tests marked "failed before its fix" did)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dpokit.data import batching
from dpokit.data.batching import (
    epoch_batches,
    group_ids,
    micro_batches,
    num_units,
    rows_used,
    unit_spans,
    units_of,
)
from dpokit.data.prompts import Prompt
from dpokit.data.store import ItemChain
from dpokit.errors import DpokitError


def oracle_order(n: int, seed: int, epoch: int) -> list[int]:
    """The documented permutation, drawn here without dpokit: randperm of a generator seeded
    with seed · 1000003 + epoch (mod 2⁶⁴ past its range)."""
    value = seed * 1_000_003 + epoch
    generator = torch.Generator().manual_seed(value % 2**64 if value >= 2**64 else value)
    return torch.randperm(n, generator=generator).tolist()


def random_groups(rng: random.Random, units: int) -> np.ndarray:
    """Group ids of ``units`` units of very different sizes (1 to 9 examples), some examples
    without a group (−1)."""
    groups, gid = [], 0
    for _ in range(units):
        size = rng.choice([1, 1, 2, 3, 9])
        if size == 1 and rng.random() < 0.5:
            groups.append(-1)
        else:
            groups += [gid] * size
            gid += 1
    return np.asarray(groups, dtype=np.int64)


def loop_batches(n: int, global_batch: int, seed: int, spans, start: int, total: int):
    """The global batches steps ``start`` … ``total − 1`` of train/loop.py's train_step draw:
    divmod(step, steps_per_epoch), one epoch's batches kept at a time, from a fresh process
    (the module's cache emptied, as after a resume)."""
    batching._last_epoch = None
    steps_per_epoch = math.ceil(num_units(n, spans) / global_batch)
    order: dict[int, list[list[int]]] = {}
    out = []
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in order:
            order = {epoch: epoch_batches(n, global_batch, seed=seed, epoch=epoch, spans=spans)}
        out.append(order[epoch][index])
    return out


# ------------------------------------------------------------------------------- rows_used


def test_rows_used_of_steps_that_straddle_two_epochs():
    """10 rows, batches of 4 (3 steps an epoch), steps 2–4: the last batch of epoch 0 and the
    first two of epoch 1 — 3 steps, as many as an epoch, but of two permutations. rows_used
    returned every row (its test was "as many steps as an epoch"), so the reference pass
    computed rows no step reads. Failed before its fix."""
    drawn = sorted({i for batch in loop_batches(10, 4, 7, None, 2, 5) for i in batch})
    assert len(drawn) < 10  # (seed 7 leaves rows out: the case is real)
    assert rows_used(10, 4, seed=7, total_steps=5, start_step=2) == drawn


def test_rows_used_equal_the_rows_the_loop_visits():
    """Brute force over data with and without groups of very different sizes, resume steps
    anywhere, epochs ≥ 2 with the last step mid-epoch, fewer rows than a batch, one row: the
    union of the loop's global batches (:func:`loop_batches`). Failed before its fix (the
    straddling ranges)."""
    rng = random.Random(0)
    for trial in range(400):
        groups = random_groups(rng, rng.randint(1, 25))
        if trial % 3 == 0:
            groups[:] = -1
        if trial % 50 == 0:
            groups = groups[:1]
        spans = unit_spans(groups)
        n, global_batch = len(groups), rng.randint(1, 12)
        per_epoch = math.ceil(num_units(n, spans) / global_batch)
        total = rng.randint(1, 4 * per_epoch + 2)
        start = rng.randint(0, total)
        seed = rng.choice([0, 3, 2**32 - 1])
        drawn = sorted({i for b in loop_batches(n, global_batch, seed, spans, start, total)
                        for i in b})
        got = rows_used(n, global_batch, seed=seed, total_steps=total, start_step=start,
                        spans=spans)
        assert got == drawn, (trial, n, global_batch, start, total)


# ---------------------------------------------------------------------------- epoch order


def test_a_caller_changing_its_batches_leaves_the_order_alone():
    """epoch_batches handed out its cached lists: a caller that sorted or popped one changed
    the batches the next caller (the loop after rows_used) got, silently. Failed before its
    fix."""
    first = epoch_batches(11, 4, seed=9, epoch=2)
    first[0].sort(reverse=True)
    first.pop()
    order = oracle_order(11, 9, 2)
    assert epoch_batches(11, 4, seed=9, epoch=2) == [order[i:i + 4] for i in range(0, 11, 4)]


@pytest.mark.parametrize("seed", [2**32, 2**45, 2**50 + 5, 2**64 + 1])
def test_seeds_past_2_to_the_32(seed):
    """Seeds above ~1.8·10¹³ (2⁴⁵ here) made seed · 1000003 overflow manual_seed's 64 bits
    (``ValueError: Overflow when unpacking long long``, a traceback). Oracle: the documented
    formula; the order depends on (seed, epoch) only. Failed before its fix (all but 2³²)."""
    for epoch in (0, 1):
        batches = epoch_batches(9, 4, seed=seed, epoch=epoch)
        order = oracle_order(9, seed, epoch)
        assert batches == [order[i:i + 4] for i in range(0, 9, 4)]
        batching._last_epoch = None
        assert epoch_batches(9, 4, seed=seed, epoch=epoch) == batches
    assert epoch_batches(9, 4, seed=seed, epoch=0) != epoch_batches(9, 4, seed=seed, epoch=1)


def test_small_seeds_keep_their_order():
    """Every seed the config accepts ([0, 2³²)) draws exactly the order it drew before (runs
    resume across the change)."""
    for seed in (0, 42, 2**32 - 1):
        for epoch in (0, 5):
            order = oracle_order(13, seed, epoch)
            assert epoch_batches(13, 5, seed=seed, epoch=epoch) == [order[i:i + 5]
                                                                    for i in range(0, 13, 5)]


def test_a_resume_at_any_step_continues_the_same_order():
    """The batches of steps 0…T from one process equal steps 0…k then, in a fresh process,
    k…T, for every k (groups of different sizes, 3 epochs, the last step mid-epoch)."""
    groups = random_groups(random.Random(4), 17)
    spans = unit_spans(groups)
    n = len(groups)
    per_epoch = math.ceil(num_units(n, spans) / 4)
    total = 2 * per_epoch + per_epoch // 2 + 1
    whole = loop_batches(n, 4, 11, spans, 0, total)
    for k in range(total + 1):
        assert loop_batches(n, 4, 11, spans, 0, k) + loop_batches(n, 4, 11, spans, k,
                                                                  total) == whole


# ------------------------------------------------------------- units, ranks, micro-batches


def test_every_unit_once_an_epoch_whole_in_one_batch_micro_batch_and_rank():
    """Brute force: each epoch's batches hold every row once; each unit (a group's consecutive
    examples) lies wholly inside one batch, one rank's share and one micro-batch, in order;
    the ranks' weighted micro-batches are the batch, once, in order, each ≤ micro units; every
    rank runs as many micro-batches — also with more ranks than a batch has units, one row,
    fewer rows than a batch."""
    rng = random.Random(1)
    for trial in range(250):
        groups = random_groups(rng, rng.randint(1, 20))
        if trial % 40 == 0:
            groups = groups[:1]
        spans = unit_spans(groups)
        units = spans or [(i, i + 1) for i in range(len(groups))]
        whole = {tuple(range(a, b)) for a, b in units}
        g = None if spans is None else groups
        global_batch = rng.randint(1, 2 * len(units))
        for epoch in range(2):
            batches = epoch_batches(len(groups), global_batch, seed=trial, epoch=epoch,
                                    spans=spans)
            assert sorted(i for b in batches for i in b) == list(range(len(groups)))
            assert len(batches) == math.ceil(len(units) / global_batch)
            for batch in batches:
                cut = units_of(batch, g)
                assert all(tuple(u) in whole for u in cut) and len(cut) <= global_batch
                world, micro = rng.randint(1, 2 * len(cut) + 1), rng.randint(1, 4)
                shares = [micro_batches(batch, micro, rank, world, g) for rank in range(world)]
                assert len({len(s) for s in shares}) == 1
                seen = []
                for share in shares:
                    for indices, weight in share:
                        assert weight in (0.0, 1.0) and indices
                        parts = units_of(indices, g)
                        assert all(tuple(u) in whole for u in parts)
                        if weight:
                            assert len(parts) <= micro
                            seen += indices
                assert seen == batch


def test_accumulated_loss_is_the_global_batch_mean():
    """train_step's arithmetic: each rank adds loss_sum · (world / units) · weight over its
    micro-batches; DDP averages the ranks. Oracle: the float64 mean of the batch's per-example
    losses, one process, one micro-batch — for every batch, the smaller last one too (10
    groups of 1 to 9 pairs, 23 pairs, batches of 4 groups), 1–7 ranks, micro-batches 1–3.
    Tolerance 1e-12 relative."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(10), [1, 3, 9, 2, 1, 1, 2, 1, 2, 1])
    spans = unit_spans(groups)
    losses = rng.normal(size=len(groups)) * 10
    batches = epoch_batches(len(groups), 4, seed=1, epoch=0, spans=spans)
    assert [len(units_of(b, groups)) for b in batches] == [4, 4, 2]
    for batch in batches:
        expected = float(np.mean(losses[batch]))
        for world in range(1, 8):
            for micro in (1, 2, 3):
                scale = world / len(batch)  # objective.units: the batch's examples
                per_rank = [sum(losses[indices].sum() * scale * weight
                                for indices, weight in micro_batches(batch, micro, r, world,
                                                                     groups))
                            for r in range(world)]
                assert math.isclose(sum(per_rank) / world, expected, rel_tol=1e-12,
                                    abs_tol=1e-12)


def test_a_micro_batch_size_below_one_is_one_line():
    """micro_batches(…, 0, …) raised a bare ValueError (range step 0). Failed before its fix."""
    with pytest.raises(DpokitError, match="micro-batch size"):
        micro_batches([0, 1, 2], 0, 0, 1)
    with pytest.raises(DpokitError, match="batch_size"):
        rows_used(5, 0, seed=0, total_steps=1)


# ---------------------------------------------------------------------------------- groups


@dataclass
class Grouped:
    group: int


def test_group_ids_of_a_chain_of_lists():
    """An ItemChain (``store + list``) whose parts are lists of items without the field
    (prompts) raised AttributeError from the chain's column(); each part is now read as it is:
    −1 where there is no field, the ids where there are. Failed before its fix."""
    prompts = [Prompt("a", [1]), Prompt("b", [2])]
    assert group_ids(ItemChain([prompts, [Prompt("c", [3])]])).tolist() == [-1, -1, -1]
    chain = ItemChain([[Grouped(0), Grouped(0), Grouped(1)], [Grouped(-1)]])
    assert group_ids(chain).tolist() == [0, 0, 1, -1]
    assert unit_spans(group_ids(chain)) == [(0, 2), (2, 3), (3, 4)]
