"""The decoder on the real tokens of a batch only: no matmul is spent on padding.

A padded batch of ``rows × L`` tokens makes every linear layer of the decoder work on the
padding too — 12% of the tokens of the benchmark's shared-prompt batches, more with uneven
lengths. :func:`flatten` turns a :class:`~dpokit.data.collate.PairBatch` into one row of its T
real tokens, ``(1, T)`` ids and positions, so the linear layers see T rows; attention, the one
place where tokens of different sequences must not meet, runs per *segment* — a row of a padded
or shared-prompt batch, a sequence of a packed one — with the segment's own block mask (shared
layout) or as plain causal attention (no mask, the fastest SDPA kernel). The result is exact:
every hidden state equals the one of the padded pass.

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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    masks: tuple[Tensor | None, ...]
    """Per segment a ``(n, n)`` boolean mask (True: may attend), or None for causal."""
    biases: tuple[Tensor | None, ...]
    """The same masks as ``(1, 1, n, n)`` additive biases (0 or the dtype's minimum), as the
    padded pass gives them to SDPA; built once per batch, not per layer."""
    position_ids: Tensor
    """``(T,)``: the position of every token in its own sequence (for sliding windows)."""


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


def flatten(batch: PairBatch, dtype: torch.dtype = torch.float32) -> FlatBatch:
    """The real tokens of ``batch`` (``sequence_ids ≥ 0``), row-major, as one row.

    Segments: each row of a ``padded`` or ``shared`` batch, each sequence of a ``packed`` one. A
    shared-prompt row (whose real tokens must be contiguous) keeps its block mask, as an
    additive bias of ``dtype``; the others are causal.
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
    masks: list[Tensor | None] = []
    if batch.layout == "shared":
        first = index[[start for start, _ in bounds]] % length  # first real column of each row
        for row, (start, stop), column in zip(segment_keys.tolist(), bounds, first.tolist(),
                                              strict=True):
            n = stop - start
            if not bool(real[row, column:column + n].all()):
                raise DpokitError("the real tokens of a shared-prompt row are not contiguous")
            masks.append(batch.attention_mask[row, 0, column:column + n, column:column + n])
    else:
        masks = [None] * len(bounds)
    flat_index = torch.full((rows * length,), -1, dtype=torch.long, device=real.device)
    flat_index[index] = torch.arange(len(index), device=real.device)
    position_ids = batch.position_ids.reshape(-1)[index]
    biases = tuple(None if mask is None else additive_mask(mask, dtype)[None, None]
                   for mask in masks)
    return FlatBatch(batch.input_ids.reshape(-1)[index][None], position_ids[None], flat_index,
                     Segments(bounds, tuple(masks), biases, position_ids))


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask (True: may attend) as the additive one eager attention and SDPA
    take: 0 where allowed, the dtype's minimum elsewhere; same shape."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, low)


def _with_window(mask: Tensor | None, positions: Tensor, window: int | None) -> Tensor | None:
    """The segment's mask with a sliding window: a query at position q sees keys at positions
    k with q − k < ``window`` (``transformers``' convention), counted in its own sequence — in a
    shared-prompt row the rejected completion's positions continue from the prompt."""
    if window is None or len(positions) <= window:
        return mask
    distance = positions[:, None] - positions[None, :]
    band = distance < window
    if mask is None:  # causal segment: positions are 0..n-1
        return band & (distance >= 0)
    return mask & band


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
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = {}
    if groups > 1:
        masked = any(b is not None for b in dpokit_segments.biases) or (
            window is not None
            and max(stop - start for start, stop in dpokit_segments.bounds) > window)
        if query.device.type == "cpu" or not masked:
            gqa = {"enable_gqa": True}  # CPU kernels and mask-free GPU kernels support it
        else:  # masked GPU kernels do not: repeat the key/value heads once for the whole row
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    lengths = [stop - start for start, stop in dpokit_segments.bounds]
    outputs = []
    for q, k, v, mask, bias, (start, stop) in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2),
            dpokit_segments.masks, dpokit_segments.biases, dpokit_segments.bounds, strict=True):
        windowed = _with_window(mask, dpokit_segments.position_ids[start:stop], window)
        if windowed is not mask:
            bias = additive_mask(windowed, query.dtype)[None, None]
        elif bias is not None and bias.dtype != query.dtype:
            bias = bias.to(query.dtype)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling,
            is_causal=bias is None and causal and stop - start > 1, **gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


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
