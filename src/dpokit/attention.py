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

On a CPU, where a call's fixed cost dominates short rows, the segments of at most
:data:`ONE_CALL_MAX_LENGTH` tokens run as a few masked calls per layer instead, grouped by
their padded length (:func:`bucket_length`, ≤ 12.5% padding a side; :func:`_segment_plan`);
longer ones take the per-segment path. The padded length is a function of the segment alone,
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
"""Largest boolean mask (``segments × L² `` elements, 8 MiB) of one padded SDPA call of
:func:`_segment_plan`; a bucket of more segments is split into several calls."""

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
    """Segments of one bucket as one padded ``(S, heads, L, d)`` SDPA call."""

    index: Tensor
    """``(S, L)`` int64: the column in T of each padded token (0 on padding)."""
    mask: Tensor
    """``(S, 1, L, L)`` bool, True where a query may see a key."""


@dataclass(frozen=True)
class SegmentPlan:
    """How :func:`segment_attention` runs a batch's segments on a CPU: the short ones in padded
    calls by :func:`bucket_length`, the others (:attr:`single`) a call or two each."""

    calls: tuple[PaddedCall, ...]
    single: tuple[int, ...]
    """Indices of the segments that run on their own (the per-segment path)."""
    back: Tensor
    """``(T,)`` int64: each token's place in the calls' padded outputs, flattened and
    concatenated, followed by the single segments' tokens in order."""
    gather: Tensor
    """``(P,)`` int64: every call's :attr:`PaddedCall.index`, flattened and concatenated — the
    column in T of each of the P padded tokens."""
    take: Tensor
    """``(T,)`` int64: :attr:`back` clamped into ``[0, P)`` (where a token's gradient is read
    from the padded ``(h, P, d)`` gradient; a single segment's token reads a slot it zeroes)."""
    in_calls: Tensor | None
    """``(T,)`` bool, True for the tokens of the padded calls; None when that is every token."""


def _padded_call(segments: Segments, members: list[int], length: int,
                 window: int | None) -> PaddedCall:
    """Query i of a segment sees key j ≤ i of the same part or of the prompt (part 0) — causal
    for a sequence, the shared-prompt pattern for a row ``[x, y_1, …, y_m]`` — within
    ``window`` positions; a padded query sees key 0 (its output is dropped: no NaN)."""
    device = segments.position_ids.device
    offsets = torch.arange(length, device=device)
    starts = torch.tensor([segments.bounds[s][0] for s in members], device=device)
    sizes = torch.tensor([segments.bounds[s][1] - segments.bounds[s][0] for s in members],
                         device=device)
    real = offsets[None, :] < sizes[:, None]  # (S, L)
    index = torch.where(real, starts[:, None] + offsets[None, :], 0)
    part = torch.stack([torch.bucketize(offsets, torch.tensor(segments.parts[s], device=device)
                                        .cumsum(0), right=True) for s in members])
    same = (part[:, :, None] == part[:, None, :]) | (part[:, None, :] == 0)
    mask = same & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask &= real[:, :, None] & real[:, None, :]
    if window is not None:
        positions = segments.position_ids[index]
        mask &= positions[:, :, None] - positions[:, None, :] < window
    mask[:, :, 0] |= ~real
    return PaddedCall(index, mask[:, None])


def _segment_plan(segments: Segments, window: int | None) -> SegmentPlan:
    """Group the segments of at most :data:`ONE_CALL_MAX_LENGTH` tokens by
    :func:`bucket_length` into padded masked calls (on a CPU, many short rows are dominated by
    the fixed cost of a call each — two for a shared-prompt row — not by their arithmetic), at
    most :data:`ONE_CALL_BUDGET` mask elements a call; longer segments run on their own."""
    buckets: dict[int, list[int]] = {}
    single = []
    for s, (start, stop) in enumerate(segments.bounds):
        n = stop - start
        length = bucket_length(n)
        if n > ONE_CALL_MAX_LENGTH or length * length > ONE_CALL_BUDGET:
            single.append(s)
        else:
            buckets.setdefault(length, []).append(s)
    device = segments.position_ids.device
    calls = []
    back = torch.empty(segments.bounds[-1][1] if segments.bounds else 0, dtype=torch.long,
                       device=device)
    offset = 0
    for length, members in sorted(buckets.items()):
        per_call = max(1, ONE_CALL_BUDGET // (length * length))
        for a in range(0, len(members), per_call):
            chunk = members[a:a + per_call]
            calls.append(_padded_call(segments, chunk, length, window))
            for slot, s in enumerate(chunk):
                start, stop = segments.bounds[s]
                first = offset + slot * length
                back[start:stop] = torch.arange(first, first + stop - start, device=device)
            offset += len(chunk) * length
    padded = offset
    for s in single:
        start, stop = segments.bounds[s]
        back[start:stop] = torch.arange(offset, offset + stop - start, device=device)
        offset += stop - start
    in_calls = back < padded if single else None
    gather = (torch.cat([call.index.flatten() for call in calls]) if calls
              else back.new_zeros(0))
    return SegmentPlan(tuple(calls), tuple(single), back, gather,
                       back.clamp(max=max(padded - 1, 0)), in_calls)


class _TakePadded(torch.autograd.Function):
    """``source.index_select(1, gather)``: the padded tokens of every call, ``(h, T, d)`` →
    ``(h, P, d)``.

    Its backward reads each token's gradient at its one real slot (``take``) instead of the
    accumulating scatter autograd runs for an index with repeats (the padding slots all read
    token 0) — single-threaded on a CPU, 2.3 ms a layer against ~0.5 for this gather at the
    benchmark's 1,232 tokens. Exact: a padding slot's gradient is exactly zero (a padded query's
    output is dropped, a padded key is masked for every real query), so the scatter only adds
    zeros; the tokens of single segments (``in_calls`` False) get zero here and their gradient
    from their own slices."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, gather: Tensor, take: Tensor,
                in_calls: Tensor | None) -> Tensor:
        ctx.save_for_backward(take, in_calls)
        return source.index_select(1, gather)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        take, in_calls = ctx.saved_tensors
        out = grad.index_select(1, take)
        if in_calls is not None:
            out = out.masked_fill(~in_calls[None, :, None], 0)
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
    """Every padded call's result, ``(S · L, heads, d)`` each."""
    taken = [_TakePadded.apply(t[0], plan.gather, plan.take, plan.in_calls)
             for t in (query, key, value)]  # (h, P, d) each
    outputs, offset = [], 0
    for call in plan.calls:
        rows, length = call.index.shape
        q, k, v = (t[:, offset:offset + rows * length].unflatten(1, (rows, length))
                   .transpose(0, 1) for t in taken)  # (S, h, L, d)
        out = _sdpa(q, k, v, call.mask, causal=False, **sdpa)
        outputs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3]))
        offset += rows * length
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
            outputs.append(_later_completion(q, k, v, prompt, begin, begin + n, positions,
                                             window, masks, (index, part), **sdpa))
            begin += n
    if plan is None:
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None
    pieces = _padded_outputs(query, key, value, plan, **sdpa) if plan.calls else []
    pieces += [out[0].transpose(0, 1) for out in outputs]  # (n, h, d) each
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
