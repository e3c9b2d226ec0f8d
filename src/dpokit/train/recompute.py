"""Activation recomputation: what the backward pass recomputes instead of keeping.

Two settings, both through ``transformers``' per-layer checkpointing hook and PyTorch's
non-reentrant ``torch.utils.checkpoint``:

- ``full``: every decoder layer keeps only its input and recomputes everything (≈ +⅓ compute);
- ``selective``: PyTorch's selective activation checkpointing — a layer keeps the outputs of its
  matrix multiplications and attention kernels (:data:`SAVED_OPS`) and recomputes only the
  element-wise work between them (norms, activations, rotary embeddings, residual adds). On the
  benchmark's Llama that drops the saved activations per token and layer from about 9·H + 4·I to
  6·H + 2·I floats for 5–7% more time: the recomputed ops are memory-bound and small.

Numbers are unchanged either way: dropout is replayed with the saved RNG state, and an
attention kernel that draws its own dropout is recomputed rather than served from the cache
(skipping it would shift the RNG for the layer's later dropouts).

Selective recomputation pays a fixed cost per recorded op (PyTorch intercepts every op of the
layer in Python) that the memory it frees justifies only when activations are large: on the
benchmark's 1 M-parameter model it slows a step by ~35% to free 10 MB, on its 26 M-parameter
model by ~12% to free ~150 MB of a 1.3 GB run. So by default (:func:`auto_selective`) the
trainer turns it on when the activations it frees per micro-batch (:func:`freed_bytes`, from
the model's shape and the data's mean token count) are at least :data:`AUTO_MIN_FREED_BYTES`
and at least half the memory of the trained parameters' own state (weights, gradients and two
AdamW moments, :func:`training_state_bytes`): where activations are small next to the model,
keeping them costs little memory and saves the time.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dpokit.errors import DpokitError
from dpokit.logps import logit_transform, text_config

_aten = torch.ops.aten
SAVED_OPS = frozenset(
    getattr(_aten, name).default for name in (
        "mm", "addmm", "bmm", "baddbmm", "_grouped_mm",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    ) if hasattr(_aten, name))
"""Ops whose outputs selective checkpointing keeps: the expensive ones."""


def _draws_random(op, args, kwargs) -> bool:
    """Whether this call consumes the RNG (attention with ``dropout_p > 0``)."""
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    names = [argument.name for argument in op._schema.arguments]
    if "dropout_p" not in names:
        return True
    index = names.index("dropout_p")
    dropout = kwargs.get("dropout_p", args[index] if index < len(args) else 0.0)
    return bool(dropout)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save matmul/attention outputs, recompute the rest (PyTorch SAC's policy function)."""
    # An op that draws random numbers is recomputed, never replayed from the cache: skipping
    # it in the recomputation would shift the RNG for every later dropout of the layer.
    if op in SAVED_OPS and not _draws_random(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint`` for selective recomputation."""
    return create_selective_checkpoint_contexts(_policy)


AUTO_MIN_FREED_BYTES = 64 * 2**20
"""Selective recomputation turns itself on from this estimated saving per micro-batch (and
half the trained parameters' state, :func:`auto_selective`)."""


def training_state_bytes(model: nn.Module, *, lora: bool) -> int:
    """Memory of the trained parameters' state: each weight, its gradient and AdamW's two
    moments, ``4 · numel · element_size`` summed over trainable parameters; 0 for a LoRA run
    (its adapters are a rounding error next to the frozen model)."""
    if lora:
        return 0
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def auto_selective(freed: float, state: float) -> bool:
    """A null ``selective_checkpointing``: on when the activations it frees per micro-batch,
    ``freed``, reach both :data:`AUTO_MIN_FREED_BYTES` and half of ``state``
    (:func:`training_state_bytes`) — then activations are a large part of the run's memory."""
    return freed >= max(AUTO_MIN_FREED_BYTES, state / 2)


KEPT_PER_TOKEN = {"none": (9, 4), "selective": (6, 2)}
"""Values a Llama-style decoder layer keeps per token for backward, as (a, b) of a·H + b·I
(H hidden size, I MLP width): without recomputation its norm outputs, rotated queries/keys,
attention output and the MLP's four I-wide tensors; with selective recomputation only the
matmul and attention outputs (5·H), the layer's input (H) and the MLP's two I-wide matmul
outputs.

Under mixed precision (autocast around weights of a wider dtype) autocast narrows only the
matmul and attention inputs: the residual stream, the norms and the rotary embeddings stay in
the weights' dtype, so the H-wide values kept without recomputation are in the weights' dtype
(measured on float32 Llama weights under bfloat16 autocast: 35·H + 8.75·I bytes a token and
layer, against 9·H·4 + 4·I·2 = 36·H + 8·I), and of selective recomputation's 6·H the layer's
input (14·H measured, 5·H·2 + H·4 estimated); the I-wide values are matmul outputs, in the
compute dtype (:func:`kept_bytes`'s ``residual_bytes``)."""


def _shape(model_config) -> tuple[int, int, int]:
    """(hidden size H, decoder layers, MLP width I) of a ``transformers`` config; models without
    an MLP width in their config count I = 4·H."""
    config = text_config(model_config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    inner = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or 4 * hidden)
    return hidden, layers, inner


def kept_bytes(model_config, tokens: float, bytes_per_value: int,
               mode: Literal["none", "selective", "full"], *,
               residual_bytes: int | None = None) -> float:
    """Activation bytes the backward pass needs for ``tokens`` tokens of a micro-batch.

    ``bytes_per_value``: the element size of the compute dtype (autocast's, else the weights');
    ``residual_bytes``: the weights' element size, that of the residual stream, norms and rotary
    embeddings (default ``bytes_per_value``; float32 weights under bfloat16 autocast: 4 and 2).
    Per token with s = ``bytes_per_value`` and w = ``residual_bytes`` (:data:`KEPT_PER_TOKEN`):
    ``none`` keeps ≈ layers · (9·H·w + 4·I·s) bytes, ``selective`` layers · (5·H·s + H·w +
    2·I·s), ``full`` each layer's input, layers · H·w, plus one layer's ``none`` while backward
    recomputes it. (Measured on the benchmark's 26 M model at 8,192 tokens a pair: selective −
    full = 2.16 GB estimated, 2.31 GB of peak RSS.)
    """
    hidden, layers, inner = _shape(model_config)
    s = bytes_per_value
    w = bytes_per_value if residual_bytes is None else residual_bytes
    a, b = KEPT_PER_TOKEN["none"]
    layer = a * hidden * w + b * inner * s  # one layer, nothing recomputed
    if mode == "full":
        per_token = layers * hidden * w + layer
    elif mode == "none":
        per_token = layers * layer
    else:
        a, b = KEPT_PER_TOKEN["selective"]
        per_token = layers * ((a - 1) * hidden * s + hidden * w + b * inner * s)
    return tokens * per_token


def freed_bytes(model_config, tokens: float, bytes_per_value: int, *,
                residual_bytes: int | None = None) -> float:
    """Activation bytes selective recomputation frees for ``tokens`` tokens of a micro-batch:
    ``kept_bytes(none) − kept_bytes(selective)`` ≈ tokens · layers · (3·H + 2·I) values (with
    ``residual_bytes`` above ``bytes_per_value``, the 8·H values the two keep in the weights'
    dtype count at its size)."""
    return (kept_bytes(model_config, tokens, bytes_per_value, "none",
                       residual_bytes=residual_bytes)
            - kept_bytes(model_config, tokens, bytes_per_value, "selective",
                         residual_bytes=residual_bytes))


def lm_head_scratch_bytes(model_config, tokens: float, chunk_size: int) -> float:
    """Peak scratch memory of the LM head, any recomputation mode: one chunk of ``chunk_size``
    completion positions (at most ``tokens``) of float32 logits over the vocabulary V, about
    three such tensors at once in its backward (logits, their softmax, the gradient):
    3 · min(chunk_size, tokens) · V · 4 bytes — ~1.9 GB for a 152 k vocabulary at 1,024. A head
    the chunked path cannot reproduce (:func:`dpokit.logps.completion_logps` then runs the
    model's own forward) holds the logits of every position: 3 · tokens · V · 4."""
    vocab = getattr(text_config(model_config), "vocab_size", 0) or 0
    chunked = logit_transform(model_config) is not None
    return 3 * (min(chunk_size, tokens) if chunked else tokens) * vocab * 4


MEMORY_SHARE = 0.8
"""The share of the device's available memory a run's estimated optimizer state, activations
and LM-head scratch may take before the automatic choice recomputes more (:func:`fit_memory`):
the estimate leaves out the attention kernel's scratch, the activation gradients of the layer in
backward and the allocator's fragmentation."""

MODES = ("none", "selective", "full")
"""Recomputation modes, most memory (and least time) first."""


def fit_memory(preferred: str, allowed: set[str], need, available: float | None,
               share: float = MEMORY_SHARE) -> str:
    """The automatic recomputation under a memory budget: ``preferred`` (the fastest mode the
    time rule picks) when its ``need(mode)`` bytes fit in ``share · available``, else the first
    mode of :data:`MODES` after it, in ``allowed``, that fits — or the leanest allowed one when
    none fits. ``available`` None (unknown): ``preferred``."""
    if available is None:
        return preferred
    budget = share * available
    leaner = [mode for mode in MODES[MODES.index(preferred):] if mode == preferred
              or mode in allowed]
    for mode in leaner:
        if need(mode) <= budget:
            return mode
    return leaner[-1]


def supports_recompute(model: nn.Module) -> bool:
    """Whether ``model`` has ``transformers``' per-layer checkpointing hook."""
    return bool(getattr(model, "supports_gradient_checkpointing", False))


def enable_recompute(model: nn.Module, mode: Literal["none", "selective", "full"]) -> None:
    """Turn on recomputation of ``model``'s decoder layers (a bare ``transformers`` model)."""
    if mode == "none":
        return
    if not supports_recompute(model):
        raise DpokitError(f"{type(model).__name__} does not support activation checkpointing; "
                          "run without gradient_checkpointing/selective_checkpointing")
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_context
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

