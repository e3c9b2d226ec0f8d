"""Which examples go into which batch: deterministic shuffling and sharding by rank."""

from __future__ import annotations

import math

import torch

from dpokit.errors import DpokitError


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = False) -> list[list[int]]:
    """Global batches of example indices for one epoch.

    The order is a permutation drawn from ``seed`` and ``epoch`` alone (a fresh
    ``torch.Generator``), so it is the same on every rank and after a resume.
    """
    if batch_size < 1:
        raise DpokitError(f"batch_size must be ≥ 1, got {batch_size}")
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
    else:
        order = list(range(num_examples))
    batches = [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def rows_used(num_examples: int, batch_size: int, *, seed: int, total_steps: int,
              start_step: int = 0) -> list[int]:
    """The example indices the global batches of steps ``start_step`` to ``total_steps`` of
    :func:`epoch_batches` touch, sorted (every row once those steps span an epoch)."""
    per_epoch = -(-num_examples // batch_size)
    if total_steps - start_step >= per_epoch:
        return list(range(num_examples))
    used: set[int] = set()
    for epoch in range(start_step // per_epoch, (total_steps - 1) // per_epoch + 1):
        batches = epoch_batches(num_examples, batch_size, seed=seed, epoch=epoch)
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
                  world_size: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch, as ``(indices, weight)``.

    Every rank gets the same number: ranks whose share is shorter add zero-weight repeats of one
    example, so FSDP's and DDP's collectives (one per forward and backward) stay matched.
    """
    mine = shard_for_rank(global_indices, rank, world_size)
    largest = math.ceil(len(global_indices) / world_size)
    count = max(1, math.ceil(largest / batch_size))
    micro = [(mine[i:i + batch_size], 1.0) for i in range(0, len(mine), batch_size)]
    filler = (mine or global_indices)[:1]
    return micro + [(filler, 0.0)] * (count - len(micro))
