"""The decoder on the real tokens of a batch only: no matmul is spent on padding.

A padded batch of ``rows × L`` tokens makes every linear layer of the decoder work on the
padding too — 12% of the tokens of the benchmark's shared-prompt batches, more with uneven
lengths. :func:`flatten` turns a :class:`~dpokit.data.collate.PairBatch` into one row of its T
real tokens, ``(1, T)`` ids and positions, so the linear layers see T rows; attention, the one
place where tokens of different sequences must not meet, runs per *segment* — a row of a padded
or shared-prompt batch, a sequence of a packed one — as plain causal attention (no mask, the
fastest SDPA kernel). The result is exact: every hidden state equals the one of the padded pass.

A shared-prompt row ``[x, y_1, …, y_m]`` needs no L × L block mask either: its first part
``x + y_1`` is one causal call, and each later completion y_j attends to ``[x, y_j]`` with the
causal mask aligned to the bottom right (its queries see all of x and y_j's earlier tokens). On
a GPU that call takes x's and y_j's keys side by side with
``torch.nn.attention.bias.causal_lower_right`` — the flash or memory-efficient kernel, no mask
materialised; on a CPU it reads the keys ``[0, end of y_j)`` in place with a boolean mask of
``|y_j| × (end of y_j)`` that hides the other completions (the CPU kernel takes a mask; no key is
copied). The largest mask of a pair is |y_l| × (|x| + |y_w| + |y_l|) on a CPU, none on a GPU,
against the (|x| + |y_w| + |y_l|)² of one masked call — at 8,192 tokens a pair, 268 MB of a float
bias per pair and layer call saved.

On a GPU with FlexAttention (PyTorch ≥ 2.5) the whole flattened row is instead one
block-sparse ``flex_attention`` call per layer, its block mask built once per batch from the
segments (:mod:`dpokit.attention_flex`); the per-segment calls above remain for attention
dropout, non-causal layers and older PyTorch.

On a CPU, where a call's fixed cost dominates short rows, the segments of at most
:data:`ONE_CALL_MAX_LENGTH` tokens run as a few batched calls per layer instead: each is cut
into pieces — a sequence, or a shared-prompt row's ``[x, y_1]``, as an unmasked causal piece;
each later completion's queries over ``[x, y_j]`` as a masked one — grouped by their padded
lengths (:func:`bucket_length`, ≤ 12.5% padding a side; :func:`_segment_plan`); longer
segments take the per-segment path. The padded lengths are functions of the segment alone,
so a row's numbers do not depend on the other rows of its batch (the CPU kernel's float
rounding depends on the padded length: padding every row to the batch's longest would make a
cached reference log-prob depend on the batch it was computed in).

It plugs into ``transformers`` through its documented attention interface:
:data:`SEGMENT_ATTENTION` is registered with ``AttentionInterface`` on first use and behaves as
SDPA unless called with the ``dpokit_segments`` keyword, which the decoder forwards to every
attention layer. A sliding-window layer (Mistral, Qwen2) passes its window, and segments longer
than the window get it in their mask.

Only the decoder families in :data:`UNPADDED_MODEL_TYPES` are switched: their every layer is
softmax attention whose whole pattern is causal + padding + the window it passes. Others run
padded — hybrids whose convolution or state-space layers would carry state from one sequence to
the next in a flat row (LFM2, Granite-H), and models whose pattern lives only in the mask
(chunked attention, a window that is not passed to the attention function, learned mask biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from dpokit import attention_flex
from dpokit.data.collate import PairBatch
from dpokit.errors import DpokitError

SEGMENT_ATTENTION = "dpokit_segment_sdpa"
"""The name under which :func:`segment_attention` is registered with ``transformers``."""

UNPADDED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma3_text",
    "phi", "phi3", "gpt2", "olmo2", "granite", "starcoder2", "cohere", "smollm3",
})
"""``config.model_type`` of the decoders checked equal to their padded pass (with a sliding
window where the family has one; ``tests/test_attention.py``)."""


@dataclass(frozen=True)
class Segments:
    """Where each segment lies in the flattened ``(1, T)`` row, and what it may attend to."""

    bounds: tuple[tuple[int, int], ...]
    """``(start, stop)`` of every segment along the T axis, in order, covering it."""
    parts: tuple[tuple[int, ...], ...]
    """Per segment the lengths of its parts: ``(n,)`` for a causal sequence, ``(|x|, |y_1|, …,
    |y_m|)`` for a shared-prompt row (:attr:`dpokit.data.collate.PairBatch.parts`)."""
    position_ids: Tensor
    """``(T,)``: the position of every token in its own sequence (for sliding windows)."""
    masks: dict = field(default_factory=dict, compare=False, repr=False)
    """The masks the attention calls build, kept for the batch's other layers (and their
    recomputation in backward): one per (segment, part, window)."""


@dataclass(frozen=True)
class FlatBatch:
    """A batch's real tokens as one row, and the way back to the padded coordinates."""

    input_ids: Tensor
    """``(1, T)`` int64."""
    position_ids: Tensor
    """``(1, T)`` int64, the batch's own positions."""
    flat_index: Tensor
    """``(rows · L,)`` int64: the column in T of each padded position, −1 on padding."""
    segments: Segments


def flatten(batch: PairBatch) -> FlatBatch:
    """The real tokens of ``batch`` (``sequence_ids ≥ 0``), row-major, as one row.

    Segments: each row of a ``padded`` or ``shared`` batch, each sequence of a ``packed`` one. A
    shared-prompt row (whose real tokens must be contiguous, from column 0) keeps its parts
    (prompt, completions); the others are causal.
    """
    real = batch.sequence_ids >= 0  # (rows, L)
    rows, length = real.shape
    index = real.reshape(-1).nonzero().squeeze(1)  # (T,) positions in rows·L
    if batch.layout == "packed":
        keys = batch.sequence_ids.reshape(-1)[index]
    else:
        keys = torch.arange(rows, device=real.device)[:, None].expand(rows, length)
        keys = keys.reshape(-1)[index]
    segment_keys, counts = torch.unique_consecutive(keys, return_counts=True)
    if len(set(segment_keys.tolist())) != len(segment_keys):
        raise DpokitError("a sequence of the batch is split by another one; cannot flatten it")
    stops = counts.cumsum(0).tolist()
    bounds = tuple(zip([0, *stops[:-1]], stops, strict=True))
    if batch.layout == "shared":
        parts = []
        for row, (start, stop) in zip(segment_keys.tolist(), bounds, strict=True):
            lengths = batch.parts[row]
            if sum(lengths) != stop - start or not bool(real[row, :stop - start].all()):
                raise DpokitError("the real tokens of a shared-prompt row are not contiguous")
            parts.append(tuple(lengths))
    else:
        parts = [(stop - start,) for start, stop in bounds]
    flat_index = torch.full((rows * length,), -1, dtype=torch.long, device=real.device)
    flat_index[index] = torch.arange(len(index), device=real.device)
    position_ids = batch.position_ids.reshape(-1)[index]
    return FlatBatch(batch.input_ids.reshape(-1)[index][None], position_ids[None], flat_index,
                     Segments(bounds, tuple(parts), position_ids))


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True: may attend) as the additive one eager attention and SDPA
    take: 0 where allowed, the dtype's minimum elsewhere; same shape."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, low)


def _window_band(query_positions: Tensor, key_positions: Tensor, window: int | None
                 ) -> Tensor | None:
    """``(n_q, n_k)`` True where a query at position q may see a key at position k under a
    sliding window (q − k < ``window``, ``transformers``' convention, positions counted in each
    token's own sequence), or None when no pair of them is that far apart."""
    if window is None or int(query_positions.max() - key_positions.min()) < window:
        return None
    return query_positions[:, None] - key_positions[None, :] < window


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Any, *, causal: bool,
          dropout: float, scaling: float | None, groups: int) -> Tensor:
    """One SDPA call; GQA by ``enable_gqa`` where the kernel takes it (no mask, or a CPU mask),
    else the key/value heads repeated (masked GPU kernels; the lower-right causal bias, whose
    kernels take equal heads)."""
    gqa = {}
    if groups > 1:
        if mask is None or (query.device.type == "cpu" and not isinstance(mask, CausalBias)):
            gqa = {"enable_gqa": True}
        else:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
        is_causal=mask is None and causal and query.shape[2] > 1, **gqa)


def _memo(masks: dict, key: tuple, build: Any) -> Any:
    if key not in masks:
        masks[key] = build()
    return masks[key]


def _causal_part(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, window: int | None,
                 causal: bool, masks: dict, key: tuple, **sdpa: Any) -> Tensor:
    """Causal attention of a run of tokens over themselves (a sequence; a row's prompt and first
    completion), with the window's band where it bites (built once per batch: ``masks``)."""
    def build() -> Tensor | None:
        band = _window_band(positions, positions, window) if causal else None
        return None if band is None else band & torch.ones_like(band).tril()

    band = _memo(masks, (*key, window), build) if window is not None else None
    return _sdpa(q, k, v, band, causal=causal, **sdpa)


def keys_side_by_side(device: torch.device) -> bool:
    """Whether a later completion's attention takes the prompt's and its own keys side by side
    with the lower-right causal bias (GPUs: a flash/memory-efficient kernel, no mask) rather
    than the keys in place with a boolean mask (CPUs, whose kernel materialises the bias
    anyway). Both are exact; tests switch the GPU path on for a CPU."""
    return device.type != "cpu"


def _later_completion(query: Tensor, key: Tensor, value: Tensor, prompt: int, start: int,
                      stop: int, positions: Tensor, window: int | None, masks: dict,
                      memo_key: tuple, **sdpa: Any) -> Tensor:
    """Completion ``[start, stop)`` of a shared-prompt row (not its first) attending to the
    prompt ``[0, prompt)`` and to its own earlier tokens — the bottom-right-aligned causal mask
    over the keys ``[x, y_j]``. GPU without a window: those keys side by side, the lower-right
    causal bias (no mask materialised). Otherwise the keys ``[0, stop)`` in place and a boolean
    ``(stop − start, stop)`` mask hiding the other completions (and what the window hides)."""
    n = stop - start
    q = query[:, :, start:stop]
    if window is None and keys_side_by_side(query.device):
        k = torch.cat([key[:, :, :prompt], key[:, :, start:stop]], dim=2)
        v = torch.cat([value[:, :, :prompt], value[:, :, start:stop]], dim=2)
        return _sdpa(q, k, v, causal_lower_right(n, prompt + n), causal=False, **sdpa)

    def build() -> Tensor:
        columns = torch.arange(stop, device=query.device)
        rows = torch.arange(start, stop, device=query.device)
        mask = (columns[None, :] < prompt) | ((columns[None, :] >= start)
                                              & (columns[None, :] <= rows[:, None]))
        band = _window_band(positions[start:stop], positions[:stop], window)
        return mask if band is None else mask & band

    mask = _memo(masks, (*memo_key, window), build)
    return _sdpa(q, key[:, :, :stop], value[:, :, :stop], mask, causal=False, **sdpa)


ONE_CALL_BUDGET = 1 << 23
"""Largest ``pieces × Lq × Lk`` (8 Mi elements: the boolean mask of a masked call) of one
padded SDPA call of :func:`_segment_plan`; a bucket of more pieces is split into several
calls. A segment whose own padded length squared passes it runs on its own."""

ONE_CALL_MAX_LENGTH = 512
"""Longest segment for the padded calls: past it a masked call's attention (every key block,
where a causal call skips the upper triangle) costs more than the calls it saves."""


def bucket_length(n: int) -> int:
    """The padded length of a segment of ``n`` tokens in :func:`_segment_plan`: ``n`` rounded up
    to a multiple of 1/8 of the next power of two (at least 16), so padding costs ≤ 12.5% a side.
    It depends on the segment alone: the CPU kernel's float rounding depends on the padded
    length, so a segment's result does not depend on the other rows of its batch."""
    step = max(16, (1 << max(0, n - 1).bit_length()) // 8)
    return -(-n // step) * step


@dataclass(frozen=True)
class PaddedCall:
    """Pieces of one bucket as one padded SDPA call: ``(S, heads, Lq, d)`` queries over
    ``(S, heads, Lk, d)`` keys, each piece right-padded."""

    query_index: Tensor
    """``(S, Lq)`` int64: the column in T of each padded query (0 on padding)."""
    key_index: Tensor
    """``(S, Lk)`` int64: the column in T of each padded key (0 on padding); the same tensor as
    :attr:`query_index` for a causal piece."""
    real_keys: Tensor
    """``(S, Lk)`` bool: which keys are a token's (not padding)."""
    mask: Tensor | None
    """``(S, 1, Lq, Lk)`` bool, True where a query may see a key; None for causal pieces
    without a window: plain causal SDPA (a right-padded piece needs no mask — a real query
    sees no key after it, so no padding — and the kernel skips the key blocks above the
    diagonal)."""


@dataclass(frozen=True)
class SegmentPlan:
    """How :func:`segment_attention` runs a batch's segments on a CPU: the short ones as pieces
    in padded calls (:func:`_segment_plan`), the others (:attr:`single`) a call or two each."""

    calls: tuple[PaddedCall, ...]
    single: tuple[int, ...]
    """Indices of the segments that run on their own (the per-segment path)."""
    back: Tensor
    """``(T,)`` int64: each token's place in the calls' padded query outputs, flattened and
    concatenated, followed by the single segments' tokens in order."""
    query_gather: Tensor
    """``(Pq,)`` int64: every call's :attr:`PaddedCall.query_index`, flattened, concatenated."""
    key_gather: Tensor
    """``(Pk,)`` int64: every call's :attr:`PaddedCall.key_index`, flattened, concatenated."""
    query_take: Tensor
    """``(1, T)`` int64: each token's query slot in ``[0, Pq)`` (clamped for single segments'
    tokens, which :attr:`query_valid` zeroes)."""
    query_valid: Tensor | None
    """``(1, T)`` bool, True for the tokens of the padded calls; None when that is all."""
    key_take: Tensor
    """``(R, T)`` int64: the r-th key slot of each token in ``[0, Pk)`` — a prompt token is a
    key of its row's causal piece and of every later completion's piece (R: the most)."""
    key_valid: Tensor | None
    """``(R, T)`` bool: which of :attr:`key_take` are a token's slots; None when all are."""


@dataclass(frozen=True)
class _Piece:
    """A run of queries of one segment and the keys they attend to, as column ranges in T:
    ``queries`` ``[q0, q0 + nq)``; keys ``[k0, k0 + prompt)`` then ``[q0, q0 + nq)`` for a later
    completion (``causal`` False), or the queries themselves (``causal``)."""

    q0: int
    nq: int
    k0: int
    prompt: int
    causal: bool

    @property
    def nk(self) -> int:
        return self.nq if self.causal else self.prompt + self.nq

    def bucket(self) -> tuple:
        return ((0, bucket_length(self.nq)) if self.causal
                else (1, bucket_length(self.nq), bucket_length(self.nk)))


def _pieces(segments: Segments, s: int) -> list[_Piece]:
    """A plain sequence is one causal piece; a shared-prompt row ``[x, y_1, …, y_m]`` is the
    causal piece ``[x, y_1]`` and, per later completion, y_j's queries over ``[x, y_j]``."""
    (start, stop), parts = segments.bounds[s], segments.parts[s]
    if len(parts) == 1:
        return [_Piece(start, stop - start, start, 0, True)]
    prompt = parts[0]
    pieces = [_Piece(start, prompt + parts[1], start, 0, True)]
    begin = start + prompt + parts[1]
    for n in parts[2:]:
        if n:  # (an empty completion has no queries)
            pieces.append(_Piece(begin, n, start, prompt, False))
        begin += n
    return pieces


def _padded_call(segments: Segments, pieces: list[_Piece], lq: int, lk: int,
                 window: int | None) -> PaddedCall:
    """The pieces as one call: query i of a piece sees key j of it when j is a prompt key
    or j's token is not after i's (within ``window`` positions); a padded query sees key 0 (its
    output is dropped: no NaN)."""
    device = segments.position_ids.device
    q_off = torch.arange(lq, device=device)
    k_off = torch.arange(lk, device=device)
    q0 = torch.tensor([p.q0 for p in pieces], device=device)[:, None]
    nq = torch.tensor([p.nq for p in pieces], device=device)[:, None]
    real_q = q_off[None, :] < nq  # (S, Lq)
    query_index = torch.where(real_q, q0 + q_off[None, :], 0)
    if pieces[0].causal:
        key_index, prompt, real_k = query_index, torch.zeros_like(nq), real_q
        if window is None:
            return PaddedCall(query_index, key_index, real_k, None)
    else:
        k0 = torch.tensor([p.k0 for p in pieces], device=device)[:, None]
        prompt = torch.tensor([p.prompt for p in pieces], device=device)[:, None]
        own = k_off[None, :] - prompt  # (S, Lk): the key's offset in the completion
        real_k = own < nq
        key_index = torch.where(own < 0, k0 + k_off[None, :], torch.where(real_k, q0 + own, 0))
    own = k_off[None, None, :] - prompt[:, :, None]  # (S, 1, Lk)
    mask = (own < 0) | ((own <= q_off[None, :, None]) & (own < nq[:, :, None]))
    mask = mask & real_q[:, :, None]  # (S, Lq, Lk)
    if window is not None:
        positions = segments.position_ids
        mask &= positions[query_index][:, :, None] - positions[key_index][:, None, :] < window
    mask[:, :, 0] |= ~real_q
    return PaddedCall(query_index, key_index, real_k, mask[:, None])


def _slots(index: Tensor, real: Tensor, total: int) -> tuple[Tensor, Tensor | None]:
    """``(R, T)`` slot of each token's r-th occurrence among the ``real`` entries of the
    flattened padded ``index``, and which of them exist (None: all)."""
    slots = real.nonzero().squeeze(1)
    tokens = index[slots]
    order = torch.argsort(tokens, stable=True)
    tokens, slots = tokens[order], slots[order]
    counts = torch.bincount(tokens, minlength=total)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(tokens), device=index.device) - first[tokens]
    rows = int(counts.max()) if total else 1
    take = torch.zeros(rows, total, dtype=torch.long, device=index.device)
    valid = torch.zeros(rows, total, dtype=torch.bool, device=index.device)
    take[rank, tokens] = slots
    valid[rank, tokens] = True
    return take, (None if bool(valid.all()) else valid)


def _segment_plan(segments: Segments, window: int | None) -> SegmentPlan:
    """Cut the segments of at most :data:`ONE_CALL_MAX_LENGTH` tokens into pieces
    (:func:`_pieces`) and group those by their :func:`bucket_length` into padded calls (on a
    CPU, many short rows are dominated by the fixed cost of a call each, not by their
    arithmetic), at most :data:`ONE_CALL_BUDGET` ``Lq × Lk`` elements a call; longer segments
    run on their own. A shared-prompt row's causal ``[x, y_1]`` needs no mask and its later
    completions see only ``[x, y_j]``: about half the attention work of one masked call over
    the whole row."""
    buckets: dict[tuple, list[_Piece]] = {}
    single = []
    for s, (start, stop) in enumerate(segments.bounds):
        n = stop - start
        if n > ONE_CALL_MAX_LENGTH or bucket_length(n) ** 2 > ONE_CALL_BUDGET:
            single.append(s)
            continue
        for piece in _pieces(segments, s):
            buckets.setdefault(piece.bucket(), []).append(piece)
    device = segments.position_ids.device
    total = segments.bounds[-1][1] if segments.bounds else 0
    calls = []
    back = torch.empty(total, dtype=torch.long, device=device)
    offset = 0
    for key in sorted(buckets):
        lq, lk = key[1], key[-1]
        members = buckets[key]
        per_call = max(1, ONE_CALL_BUDGET // (lq * lk))
        for a in range(0, len(members), per_call):
            chunk = members[a:a + per_call]
            calls.append(_padded_call(segments, chunk, lq, lk, window))
            for slot, piece in enumerate(chunk):
                first = offset + slot * lq
                back[piece.q0:piece.q0 + piece.nq] = torch.arange(first, first + piece.nq,
                                                                  device=device)
            offset += len(chunk) * lq
    padded = offset
    for s in single:
        start, stop = segments.bounds[s]
        back[start:stop] = torch.arange(offset, offset + stop - start, device=device)
        offset += stop - start
    empty = back.new_zeros(0)
    query_gather = torch.cat([c.query_index.flatten() for c in calls]) if calls else empty
    key_gather = torch.cat([c.key_index.flatten() for c in calls]) if calls else empty
    real_keys = torch.cat([c.real_keys.flatten() for c in calls]) if calls else empty.bool()
    key_take, key_valid = _slots(key_gather, real_keys, total)
    query_valid = (back < padded)[None] if single else None
    return SegmentPlan(tuple(calls), tuple(single), back, query_gather, key_gather,
                       back.clamp(max=max(padded - 1, 0))[None], query_valid, key_take,
                       key_valid)


class _TakePadded(torch.autograd.Function):
    """``source.index_select(1, gather)``: the padded queries (or keys) of every call,
    ``(h, T, d)`` → ``(h, P, d)``.

    Its backward sums each token's gradient over its real slots (``take``: ``(R, T)``, the r-th
    slot of each token, ``valid`` which exist) with R gathers, instead of the accumulating
    scatter autograd runs for an index with repeats (the padding slots all read token 0) —
    single-threaded on a CPU, 2.3 ms a layer against ~0.5 for this gather at the benchmark's
    1,232 tokens. A query has one slot; a prompt token is a key of its row's causal piece and
    of each later completion's. Exact: a padding slot's gradient is exactly zero (a padded
    query's output is dropped, a padded key is masked or after every real query), so the
    scatter only adds zeros there; the tokens of single segments get zero here and their
    gradient from their own slices."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, gather: Tensor, take: Tensor,
                valid: Tensor | None) -> Tensor:
        ctx.save_for_backward(take, valid)
        return source.index_select(1, gather)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        take, valid = ctx.saved_tensors
        out = None
        for r in range(take.shape[0]):
            part = grad.index_select(1, take[r])
            if valid is not None:  # (in place: ``part`` is the gather's own new tensor)
                part = part.masked_fill_(~valid[r][None, :, None], 0)
            out = part if out is None else out.add_(part)
        return out, None, None, None


class _Permute(torch.autograd.Function):
    """``source.index_select(0, index)`` for an ``index`` without repeats; its backward writes
    the gradient back with ``index_copy_`` into zeros (what autograd's accumulating scatter
    computes for such an index, without its serial accumulation). Rows not indexed (the padded
    calls' padding outputs) get zero."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = source.shape[0]
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        return out.index_copy_(0, index, grad), None


def _padded_outputs(query: Tensor, key: Tensor, value: Tensor, plan: SegmentPlan,
                    **sdpa: Any) -> list[Tensor]:
    """Every padded call's result, ``(S · Lq, heads, d)`` each.

    The calls' queries, keys and values are ``split`` off the gathered tensors, not sliced: the
    backward of a split is one concatenation of the calls' gradients, where each slice's
    backward zero-fills a tensor of the whole gather and autograd adds them up (a call's worth
    of ``fill_`` and ``add_`` passes over ``(h, P, d)`` per call and layer). The same values."""
    # squeeze, not [0]: a view whose backward is one too (select's zero-fills and copies)
    queries = _TakePadded.apply(query.squeeze(0), plan.query_gather, plan.query_take,
                                plan.query_valid)
    keys, values = (_TakePadded.apply(t.squeeze(0), plan.key_gather, plan.key_take,
                                      plan.key_valid) for t in (key, value))  # (h, P, d) each
    shapes = [(call.query_index.shape, call.key_index.shape[1]) for call in plan.calls]
    q_parts = queries.split([rows * lq for (rows, lq), _ in shapes], dim=1)
    k_parts, v_parts = (t.split([rows * lk for (rows, _), lk in shapes], dim=1)
                        for t in (keys, values))
    outputs = []
    for call, ((rows, lq), lk), q, k, v in zip(plan.calls, shapes, q_parts, k_parts, v_parts,
                                                strict=True):
        q = q.unflatten(1, (rows, lq)).transpose(0, 1)
        k, v = (t.unflatten(1, (rows, lk)).transpose(0, 1) for t in (k, v))  # (S, h, L, d)
        out = _sdpa(q, k, v, call.mask, causal=True, **sdpa)
        outputs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3]))
    return outputs


_UNSUPPORTED = ("position_bias", "s_aux", "softcap")
"""Attention extras some models pass (T5-style biases, sinks, soft caps) that the segment
path does not reproduce."""


def segment_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, *, dpokit_segments: Segments | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """SDPA per segment of a flattened row; plain ``transformers`` SDPA without segments.

    Args:
        query, key, value: ``(1, heads, T, head_dim)``; key/value may have fewer heads (GQA).
        attention_mask: ignored when ``dpokit_segments`` is given (segments carry their masks).
        dpokit_segments: the :class:`Segments` of the row.

    Returns:
        ``(1, T, heads, head_dim)``, as ``transformers`` attention functions return it.
    """
    if dpokit_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    extras = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if extras:
        raise DpokitError(f"{type(module).__name__} passes {', '.join(extras)} to attention, "
                          "which unpadded mode does not handle; run with --no-unpadded")
    window = kwargs.get("sliding_window")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    sdpa = {"dropout": dropout, "scaling": scaling,
            "groups": getattr(module, "num_key_value_groups", 1)}
    segments = dpokit_segments
    masks = segments.masks
    if (causal and not dropout and attention_flex.use_flex(query.device, query.shape[-1],
                                                            query.dtype)
            and attention_flex.compiles_here()):
        block_mask = _memo(masks, ("flex", window),
                           lambda: attention_flex.segment_block_mask(segments, window))
        return attention_flex.flex_segment_attention(query, key, value, block_mask,
                                                     scaling=scaling, groups=sdpa["groups"]), None
    plan = None
    order: Any = range(len(segments.bounds))
    if causal and not keys_side_by_side(query.device):
        plan = _memo(masks, ("plan", window), lambda: _segment_plan(segments, window))
        order = plan.single
    outputs = []
    for index in order:
        (start, stop), parts = segments.bounds[index], segments.parts[index]
        q, k, v = (t[:, :, start:stop] for t in (query, key, value))
        positions = segments.position_ids[start:stop]
        if len(parts) == 1:
            outputs.append(_causal_part(q, k, v, positions, window, causal, masks, (index, 0),
                                        **sdpa))
            continue
        prompt, first = parts[0], parts[0] + parts[1]
        outputs.append(_causal_part(q[:, :, :first], k[:, :, :first], v[:, :, :first],
                                    positions[:first], window, causal, masks, (index, 0),
                                    **sdpa))
        begin = first
        for part, n in enumerate(parts[2:], start=2):
            if n:
                outputs.append(_later_completion(q, k, v, prompt, begin, begin + n, positions,
                                                 window, masks, (index, part), **sdpa))
            begin += n
    if plan is None:
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None
    pieces = _padded_outputs(query, key, value, plan, **sdpa) if plan.calls else []
    pieces += [out.squeeze(0).transpose(0, 1) for out in outputs]  # (n, h, d) each
    flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return _Permute.apply(flat, plan.back)[None], None


def enable_segment_attention(model: nn.Module) -> bool:
    """Switch ``model`` (a bare ``transformers`` model) to :func:`segment_attention` if it is one
    of :data:`UNPADDED_MODEL_TYPES` and runs SDPA; True when it does (it then behaves as before
    on calls without segments). Registration with ``transformers`` happens here, on first use."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == SEGMENT_ATTENTION:
        return True
    if (current != "sdpa" or getattr(model.config, "model_type", None) not in UNPADDED_MODEL_TYPES
            or not getattr(model, "_supports_attention_backend", False)):
        return False
    if not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # Idempotent. Without segments the function is SDPA, so it takes SDPA's masks too.
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True
