"""The segments of a flattened row as one FlexAttention call per layer (GPUs).

:mod:`dpokit.attention` runs the segments of a flattened ``(1, T)`` row — the rows of a padded
or shared-prompt batch, the sequences of a packed one — without a ``T × T`` mask. On a CPU it
groups short segments into padded calls; on a GPU without this module it makes a call per
segment (two or more per shared-prompt row), which leaves the GPU idle between many small
kernels. Here the whole row is one ``flex_attention`` call (PyTorch's FlexAttention, compiled
into a block-sparse Triton kernel) with a :class:`~torch.nn.attention.flex_attention.BlockMask`
built once per batch from the segments: a query at ``q`` may see a key at ``kv`` when

    segment[kv] == segment[q]  and  kv ≤ q  and  (part[kv] == part[q] or part[kv] == 0)
    [and  position[q] − position[kv] < window]

where ``part`` is 0 for a prompt (and for the whole of a plain sequence) and j for the j-th
completion of a shared-prompt row ``[x, y_1, …, y_m]`` — so y_1 sees ``[x, y_1]`` causally and
every later y_j sees x and its own earlier tokens, the pattern of the padded pass. Blocks of
128 × 128 that no query may see are skipped, so the work grows with the tokens a query sees,
not with T² — no dense mask, no L² activation (the issue's requirement for the GPU path).

The block mask is built here from the segments chunk by chunk of query blocks
(:func:`segment_block_mask`), never as a ``T × T`` tensor at once (``create_block_mask``
evaluates the whole mask, ~2 GB of int64 intermediates at 16 k tokens). The kernel is
``torch.compile(flex_attention)`` as the PyTorch docs prescribe (automatic dynamic shapes: a
batch of another length reuses the compiled kernel after one recompilation). FlexAttention has
no backward on a CPU, so the CPU tests check the forward pass (eager, unfused) against the
padded pass in float64 and the block mask against ``create_block_mask``'s; gradients on a GPU
come from the same kernel's compiled backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dpokit.attention import Segments

BLOCK = 128
"""FlexAttention's sparse block size (its default), queries and keys alike."""

CHUNK_ELEMENTS = 1 << 24
"""Mask elements evaluated at once while building a block mask (``query rows × T``)."""

_compiled: dict[str, Any] = {}


FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes FlexAttention's Triton kernels compute in (a float64 model takes the per-segment
calls)."""

MIN_HEAD_DIM = 16
"""The smallest head dimension FlexAttention's CUDA kernel takes (``tl.dot`` needs 16; below it
PyTorch raises ``NotImplementedError``): smaller heads take the per-segment calls."""


def use_flex(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the segments run as one FlexAttention call per layer: on a CUDA device with a
    PyTorch that has FlexAttention, for heads of ≥ :data:`MIN_HEAD_DIM` dimensions in a dtype
    of :data:`FLEX_DTYPES`. (Tests switch it on for a CPU, forward only.)"""
    if device.type != "cuda" or head_dim < MIN_HEAD_DIM or dtype not in FLEX_DTYPES:
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # a PyTorch before 2.5
        return False
    return True


def compiles_here() -> bool:
    """Whether ``torch.compile`` would compile a call made now: False under a dispatch mode it
    does not see through — then Dynamo skips the frame and ``flex_attention`` runs eagerly,
    which on a GPU materialises every ``T × T`` score. PyTorch's selective activation
    checkpointing runs the layer under two such modes; recent PyTorch versions declare them
    ``ignore_compile_internals`` (the compiled kernel runs under them; 2.13 does), older ones do
    not, and then the segments take the per-segment calls instead (the same numbers, no dense
    scores). The answer is the same in a layer's forward and in its recomputation, so both run
    the same ops, as selective checkpointing requires."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # a PyTorch without it: nothing to see
        return True
    for mode in _get_current_dispatch_mode_stack():
        if getattr(mode, "is_infra_mode", lambda: False)():
            continue
        if getattr(mode, "ignore_compile_internals", lambda: False)():
            continue
        return False
    return True


def token_labels(segments: Segments) -> tuple[Tensor, Tensor]:
    """``(segment, part)``, ``(T,)`` int32 each: every token's segment index and its part in it
    (0: a plain sequence, or a shared-prompt row's prompt; j: its j-th completion)."""
    lengths, segment_ids, part_ids = [], [], []
    for s, parts in enumerate(segments.parts):
        for j, n in enumerate(parts):
            lengths.append(n)
            segment_ids.append(s)
            part_ids.append(j)
    device = segments.position_ids.device
    counts = torch.tensor(lengths, device=device)
    segment = torch.repeat_interleave(torch.tensor(segment_ids, dtype=torch.int32,
                                                   device=device), counts)
    part = torch.repeat_interleave(torch.tensor(part_ids, dtype=torch.int32, device=device),
                                   counts)
    return segment, part


def segment_mask_mod(segment: Tensor, part: Tensor, positions: Tensor, window: int | None):
    """The ``mask_mod(b, h, q_idx, kv_idx)`` of the segments (module docstring): True where a
    query may see a key. Plain tensor indexing and comparisons, so it runs on broadcast index
    tensors as well as inside the compiled kernel."""
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = ((segment[q_idx] == segment[kv_idx]) & (kv_idx <= q_idx)
                   & ((part[kv_idx] == part[q_idx]) | (part[kv_idx] == 0)))
        if window is not None:
            allowed = allowed & (positions[q_idx] - positions[kv_idx] < window)
        return allowed

    return mask_mod


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """A ``(nQ, nKV)`` bool block matrix as FlexAttention's ``(num_blocks, indices)``:
    ``(1, 1, nQ)`` counts and ``(1, 1, nQ, nKV)`` the kept blocks' columns first, in order."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[None, None], indices.to(torch.int32)[None, None]


def segment_block_mask(segments: Segments, window: int | None) -> BlockMask:
    """The :class:`BlockMask` of a flattened row's segments, built chunk by chunk of query
    blocks (at most :data:`CHUNK_ELEMENTS` mask elements at once): a block no query of it may
    see is dropped, one every query sees whole is "full" (no mask evaluated in it), the others
    are partial. Equal to ``create_block_mask(segment_mask_mod(...), 1, 1, T, T)``."""
    from torch.nn.attention.flex_attention import BlockMask

    segment, part = token_labels(segments)
    positions = segments.position_ids
    total = int(segment.numel())
    mask_mod = segment_mask_mod(segment, part, positions, window)
    blocks = -(-total // BLOCK)
    padded = blocks * BLOCK
    device = segment.device
    keys = torch.arange(padded, device=device)
    inside_keys = keys < total
    keys = keys.clamp(max=total - 1)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (padded * BLOCK)) * BLOCK
    partial, full = [], []
    zero = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, padded, rows_per_chunk):
        queries = torch.arange(start, min(start + rows_per_chunk, padded), device=device)
        inside = (queries < total)[:, None] & inside_keys[None, :]
        allowed = mask_mod(zero, zero, queries.clamp(max=total - 1)[:, None], keys[None, :])
        allowed = (allowed & inside).unflatten(0, (-1, BLOCK)).unflatten(2, (blocks, BLOCK))
        seen = allowed.any(3).any(1)  # (chunk blocks, nKV)
        whole = allowed.all(3).all(1)
        partial.append(seen & ~whole)
        full.append(whole)
    kv_num, kv_indices = _ordered(torch.cat(partial))
    full_num, full_indices = _ordered(torch.cat(full))
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices,
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(total, total))


def _kernel(device: torch.device):
    """``flex_attention``, compiled on a GPU (the docs' ``torch.compile(flex_attention)``);
    eager elsewhere (the tests' CPU forward: unfused, exact)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        return flex_attention
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention)
    return _compiled["flex"]


def flex_segment_attention(query: Tensor, key: Tensor, value: Tensor, block_mask: BlockMask, *,
                           scaling: float | None, groups: int) -> Tensor:
    """One FlexAttention call over a flattened row's segments.

    Args:
        query: ``(1, heads, T, d)``; key, value: ``(1, kv_heads, T, d)`` (GQA: ``groups`` =
            heads / kv_heads > 1).
        block_mask: :func:`segment_block_mask` of the row's segments.

    Returns:
        ``(1, T, heads, d)``, as ``transformers`` attention functions return it.
    """
    out = _kernel(query.device)(query, key, value, block_mask=block_mask, scale=scaling,
                                enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()
