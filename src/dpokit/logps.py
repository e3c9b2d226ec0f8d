"""Sequence log-probabilities log π(y|x) = Σ_t log π(y_t | x, y_<t) of completions
(docs/theory.md §4).

The only place in dpokit that shifts labels and masks tokens. One forward pass covers the chosen
and the rejected completions of a batch together (padded or packed, see
:mod:`dpokit.data.collate`). The decoder runs once; the LM head and the log-softmax then run only
at the positions that predict a completion token, in chunks of ``chunk_size`` positions, each
chunk recomputed in the backward pass (activation checkpointing), so full-vocabulary float32
logits never exist for the whole batch at once.

Also here, because they act on per-token log-probabilities:

- LD-DPO's ``ld_alpha`` (Liu et al. 2024): tokens of a completion beyond the shared length
  min(|y_w|, |y_l|) of its pair count with weight α ∈ [0, 1];
- WPO's per-sequence statistic (Zhou et al. 2024, Eq. 2): the token mean of
  log π(y_t|·) − log Σ_v π(v|·)², computed without gradient; the losses turn it into the weight
  exp(w_chosen + w_rejected), as TRL 1.x does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpokit.attention import (
    SEGMENT_ATTENTION,
    UNPADDED_MODEL_TYPES,
    additive_mask,
    enable_segment_attention,
    flatten,
)
from dpokit.data.collate import PairBatch, as_padded
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.logps")

DEFAULT_CHUNK_SIZE = 1024

KEEP_LOGITS_BYTES = 64 << 20
"""Largest logits of a batch's completion tokens (all chunks together; float32, or the model's
wider dtype) kept for the backward pass; past it each LM-head chunk is recomputed in backward
instead (a 128 k-token vocabulary passes it at 128 tokens). Below it the recomputation costs an
LM-head matmul per chunk and saves next to nothing (the benchmark's small model: 7 MB)."""


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probabilities of a batch of pairs, each ``(B,)``."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_tokens: Tensor
    """Completion tokens scored per chosen sequence (int64)."""
    rejected_tokens: Tensor
    chosen_wpo: Tensor | None = None
    """WPO statistic per chosen sequence (no gradient), when requested."""
    rejected_wpo: Tensor | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside DDP/FSDP/``torch.compile``/PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        else:
            return model


_UNHANDLED_HEAD_SCALES = ("output_multiplier", "scale_width", "dim_model_base",
                          "mup_output_alpha", "width_multiplier", "logits_mup_width_multiplier")
"""Config attributes of models whose head does more than the transforms below: for these the
model's own forward (full logits) is used instead of the chunked head."""

_MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax"})
"""``config.model_type`` of the families that multiply their logits by ``logits_scaling``
(HyperCLOVA X: ``lm_head(h) * logits_scaling``); Granite and the others divide by it."""


def text_config(config: Any) -> Any:
    """The language model's part of a ``transformers`` config (itself for a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(config) -> Callable[[Tensor], Tensor] | None:
    """Post-processing some models apply to their logits — Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``, Gemma's final soft cap
    (RecurrentGemma's ``logits_soft_cap``) — or None when the head is one this module cannot
    reproduce."""
    config = text_config(config)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _UNHANDLED_HEAD_SCALES):
        return None
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    multiplier = getattr(config, "lm_head_multiplier", None)
    if getattr(config, "model_type", None) in _MULTIPLYING_LOGITS_SCALING and divisor is not None:
        multiplier = divisor * (1.0 if multiplier is None else multiplier)
        divisor = None
    cap = getattr(config, "final_logit_softcapping", None)
    for name in ("logits_soft_cap", "output_logit_soft_cap"):  # RecurrentGemma's, xLSTM's
        cap = getattr(config, name, None) if cap is None else cap
    vocab = getattr(config, "unpadded_vocab_size", None)  # Inkling: the head's padded rows cut

    def transform(logits: Tensor) -> Tensor:
        if vocab is not None and vocab < logits.shape[-1]:
            logits = logits[..., :vocab]
        if scale is not None:
            logits = logits * scale
        if multiplier is not None:
            logits = logits * multiplier
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    return transform


def _token_stats(logits: Tensor, log_normaliser: Tensor, targets: Tensor) -> Tensor:
    """``(n, 3)`` per position, without gradient: the vocabulary-mean logit (1/V) Σ_v z_v, the
    entropy H = log Z − Σ_v softmax(z)_v z_v of the next-token distribution, and 1.0 where the
    target is its argmax (TRL's ``mean_logits``, ``entropy`` and ``is_top1``)."""
    with torch.no_grad():
        logits, log_normaliser = logits.detach(), log_normaliser.detach()
        expected = ((logits - log_normaliser[:, None]).exp() * logits).sum(dim=-1)
        top1 = (logits.argmax(dim=-1) == targets).to(logits.dtype)
        return torch.stack([logits.mean(dim=-1), log_normaliser - expected, top1], dim=-1)


def _chunk_logps(hidden: Tensor, targets: Tensor, lm_head: nn.Module,
                 transform: Callable[[Tensor], Tensor], wpo: bool,
                 token_stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """log π(target | ·) for ``(n, H)`` hidden states and the WPO term (zeros unless ``wpo``),
    each ``(n,)``, and :func:`_token_stats` ``(n, 3)`` (zeros unless ``token_stats``)."""
    logits = transform(lm_head(hidden))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_normaliser = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - log_normaliser
    if wpo:
        with torch.no_grad():
            log_probs = logits.detach() - log_normaliser.detach()[:, None]
            wpo_terms = token_logps.detach() - torch.logsumexp(2 * log_probs, dim=-1)
    else:
        wpo_terms = torch.zeros_like(token_logps.detach())
    stats = (_token_stats(logits, log_normaliser, targets) if token_stats
             else token_logps.new_zeros(len(token_logps), 3))
    return token_logps, wpo_terms, stats


def _hidden_states(model: nn.Module, batch: PairBatch, rows: Tensor, columns: Tensor, *,
                   unpadded: bool) -> Tensor:
    """Last hidden states of the decoder (no LM head) at the padded positions ``(rows,
    columns)``, ``(N, H)``. ``unpadded`` runs the decoder on the real tokens only
    (:mod:`dpokit.attention`) when the model allows it; the states are the same."""
    base = unwrap_model(model)
    decoder = _decoder(base)
    dtype = next(base.parameters()).dtype
    if unpadded and enable_segment_attention(base):
        flat = flatten(batch)
        # A 4D mask makes transformers use it as given (no mask is built for the flat row);
        # segment attention ignores it and masks each segment itself.
        outputs = decoder(input_ids=flat.input_ids, position_ids=flat.position_ids,
                          attention_mask=torch.zeros((1, 1, 1, 1), dtype=dtype,
                                                     device=flat.input_ids.device),
                          use_cache=False, dpokit_segments=flat.segments)
        hidden = _last_hidden(outputs)[0]  # (T, H)
        return hidden[flat.flat_index[rows * batch.input_ids.shape[1] + columns]]
    outputs = decoder(input_ids=batch.input_ids, attention_mask=_mask(batch, dtype, base.config),
                      position_ids=batch.position_ids, use_cache=False)
    return _last_hidden(outputs)[rows, columns]


def _decoder(base: nn.Module) -> nn.Module | None:
    """The decoder of a bare ``transformers`` causal LM (its layers and final norm, no LM head),
    or None when ``get_decoder`` finds none but the model itself (Llama-4's text model names
    its base ``language_model`` but keeps it in ``model``)."""
    decoder = base.get_decoder()
    if decoder is base:
        decoder = getattr(base, "model", None)
    if not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return decoder


def _head_is_child(base: nn.Module) -> bool:
    """Whether the output embedding is a module of the causal LM itself (``lm_head``,
    ``embed_out``), the one its forward applies to the decoder's last hidden state. BERT- and
    RoBERTa-style decoders keep theirs inside a prediction head (dense, activation, norm, then
    the embedding), which the chunked head would skip."""
    head = base.get_output_embeddings()
    return head is not None and any(child is head for child in base.children())


def _check_token_ids(base: nn.Module, batch: PairBatch) -> None:
    """Raise :class:`DpokitError` for a token id outside the model's input embedding (a
    tokenizer with more tokens than the model), instead of an indexing traceback. Run for
    batches on the host only: on a GPU the two reductions would stall the queue at every
    forward, and an id out of range stops there with the device's own assert."""
    try:
        size = getattr(base.get_input_embeddings(), "num_embeddings", None)
    except NotImplementedError:  # a model without the accessor: its own error stands
        return
    if size is None or not batch.input_ids.numel():
        return
    low, high = int(batch.input_ids.min()), int(batch.input_ids.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        row, column = (batch.input_ids == bad).nonzero()[0].tolist()
        raise DpokitError(f"token id {bad} (batch row {row}, column {column}) is outside the "
                          f"model's vocabulary of {size} embeddings; the tokenizer does not "
                          f"belong to this model, or its embeddings need resizing")


LAYOUT_MODEL_TYPES = UNPADDED_MODEL_TYPES | frozenset({
    "apertus", "arcee", "bitnet", "codegen", "cohere2", "cohere2_moe", "deepseek_v3",
    "diffllama", "doge", "ernie4_5", "exaone4", "falcon", "gemma2", "glm", "glm4", "gpt_bigcode",
    "gpt_neox", "gptj", "granite_swa", "granitemoe", "helium", "hunyuan_v1_dense", "internlm3",
    "jetmoe", "minicpm3", "ministral", "nemotron", "olmo", "olmo3", "olmoe", "persimmon",
    "phimoe", "qwen2_moe", "seed_oss", "stablelm", "vaultgemma",
})
"""``config.model_type`` of the families whose own forward is checked (each sequence alone as
the oracle, ``tests/test_logps_integrity.py``) to read a packed row's restarting position ids
as sequence boundaries and to take the shared layout's 4D block mask as given, sliding windows
included: softmax attention only, positions from the position ids. Any other model — hybrids
whose convolution, recurrence or state-space layers carry state from one sequence into the
next (LFM2, Qwen3-Next, Jamba, Falcon-H1, Nemotron-H, RecurrentGemma, MiniMax), ALiBi models
that build their biases from a 2D mask (Bloom, MPT, Falcon with ``alibi``), models that count
positions from the mask (OPT) or keep their window out of it (GPT-Neo), attention sinks
(gpt-oss) — gets a packed or shared batch laid out right-padded
(:func:`~dpokit.data.collate.as_padded`): its plain forward, each sequence its own row."""

_RELAID: set[str] = set()
"""Model classes whose batches were laid out padded (logged once each)."""

_MASK_IMPLEMENTATIONS = ("sdpa", "eager", SEGMENT_ATTENTION)
"""Attention implementations that apply a custom 4D mask as given (the shared layout's)."""


def takes_layout(model: nn.Module, layout: str) -> bool:
    """Whether ``model`` (bare) computes a ``packed`` or ``shared`` batch exactly as each of its
    sequences alone (:data:`LAYOUT_MODEL_TYPES`; a packed row also under flash attention, which
    reads the restarting position ids; a shared one only where the 4D mask is applied as
    given)."""
    config = text_config(model.config)
    if (getattr(config, "model_type", None) not in LAYOUT_MODEL_TYPES
            or getattr(config, "alibi", False)):
        return False
    implementation = str(getattr(model.config, "_attn_implementation", None))
    if implementation in _MASK_IMPLEMENTATIONS:
        return True
    return layout == "packed" and "flash" in implementation


def _mask(batch: PairBatch, dtype: torch.dtype, config: Any = None) -> Tensor | dict | None:
    """The batch's attention mask as the model takes it: a custom 4D boolean mask (shared
    layout) becomes additive, which eager and SDPA attention accept. transformers uses a 4D
    mask as given on every layer, so for a model with sliding-window layers the shared layout's
    mask carries the window itself — a key at position p is seen from position q when
    q − p < ``sliding_window`` (transformers' rule, on the position ids: a later completion's
    positions continue from the prompt) — and a model that mixes full and sliding layers gets
    both, keyed by layer type as its forward takes them."""
    if batch.layout != "shared":
        mask = batch.attention_mask
        return additive_mask(mask, dtype) if mask is not None and mask.dim() == 4 else mask
    allowed = batch.dense_mask()
    window, mixed = sliding_window(config)
    if window is None:
        return additive_mask(allowed, dtype)
    positions = batch.position_ids
    near = (positions[:, :, None] - positions[:, None, :]) < window  # (rows, L, L)
    windowed = allowed & near[:, None]
    if not mixed:
        return additive_mask(windowed, dtype)
    return {"full_attention": additive_mask(allowed, dtype),
            "sliding_attention": additive_mask(windowed, dtype)}


def sliding_window(config: Any) -> tuple[int | None, bool]:
    """``(window, mixed)`` of a model config: the sliding window of its sliding layers (None
    when no layer slides) and whether full-attention layers sit beside them. Read from
    ``layer_types`` where the config lists them, else from ``sliding_window`` (every layer)."""
    if config is None:
        return None, False
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return None, False
    if types is not None:
        kinds = set(types)
        if "sliding_attention" not in kinds:
            return None, False
        return int(window), len(kinds) > 1
    if getattr(config, "use_sliding_window", True) is False:
        return None, False
    return int(window), False


def _last_hidden(outputs) -> Tensor:
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


@dataclass(frozen=True)
class CompletionLogps:
    """Per-sequence sums over completion tokens, each ``(num_sequences,)`` — for pairs whose
    group shares sequences (``batch.pair_index``), ``(2B,)`` as if each pair had its own."""

    logps: Tensor
    tokens: Tensor
    wpo: Tensor | None = None
    mean_logits: Tensor | None = None
    """Σ over the completion tokens of the vocabulary-mean logit (1/V) Σ_v z_v at the position
    predicting each (after the head's logit transforms; no gradient), when requested: TRL's
    ``mean_logits``, which its ``logits/chosen`` and ``logits/rejected`` average per token."""
    entropy: Tensor | None = None
    """Σ over the completion tokens of the entropy of π(·|x, y_<t) (no gradient): TRL's
    ``entropy`` metric averages it per token."""
    top1: Tensor | None = None
    """Completion tokens that are the argmax of π(·|x, y_<t): ``mean_token_accuracy``'s count."""
    plain: Tensor | None = None
    """With LD-DPO's ``ld_alpha``: Σ log π over the completion tokens without its weights (the
    NLL terms, ``sft`` and RPO, read them as TRL does); None otherwise (``logps`` is plain)."""


def completion_logps(model: nn.Module, batch: PairBatch, *,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, wpo: bool = False,
                     fused: bool = True, ld_alpha: float | None = None,
                     unpadded: bool = True, token_stats: bool = False) -> CompletionLogps:
    """Σ_t log π(y_t | x, y_<t) over the completion tokens of every sequence of ``batch``.

    Args:
        model: a ``transformers`` causal LM (possibly PEFT-, DDP- or compile-wrapped).
        batch: sequences as a :class:`~dpokit.data.collate.PairBatch` (padded or packed).
        chunk_size: completion positions per LM-head chunk.
        wpo: also return the WPO statistic of each sequence.
        fused: False runs the model's own forward (full logits) instead of the chunked LM head;
            slower and hungrier, for models whose head is more than a linear layer + the logit
            transforms handled here.
        ld_alpha: LD-DPO weight α for tokens beyond the pair's shared completion length (pair
            batches only: sequence i and i + B are the two completions of pair i).
        unpadded: run the decoder on the real tokens only, attention per sequence
            (:mod:`dpokit.attention`; exact). Only SDPA models of the families in
            ``dpokit.attention.UNPADDED_MODEL_TYPES`` are switched; others run padded whatever
            this says. The switch sets the model's attention implementation to
            ``dpokit_segment_sdpa``, which behaves as SDPA on every other call.
        token_stats: also return each sequence's sums over its completion tokens of the
            vocabulary-mean logit, the next-token entropy and the argmax hits (the
            ``logits/*``, ``entropy`` and ``mean_token_accuracy`` metrics), taken from the
            logits each chunk already holds.

    Returns:
        :class:`CompletionLogps` (float32, or float64 for a float64 model).
    """
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise DpokitError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if chunk_size < 1:
        raise DpokitError(f"chunk_size must be ≥ 1, got {chunk_size}")
    base = unwrap_model(model)
    if batch.layout != "padded" and not takes_layout(base, batch.layout):
        if type(base).__name__ not in _RELAID:
            _RELAID.add(type(base).__name__)
            log.info("%s is not checked to compute a %s batch as its sequences alone "
                     "(LAYOUT_MODEL_TYPES); running its batches padded", type(base).__name__,
                     batch.layout)
        batch = as_padded(batch)
    # Checks that read values back run for host batches only (on an accelerator they would
    # stall its queue at every forward; the data path checks its pairs up front).
    on_host = batch.input_ids.device.type == "cpu"
    if on_host:
        _check_token_ids(base, batch)
    sequence_ids = batch.sequence_ids
    num_sequences = batch.num_sequences or int(sequence_ids.max()) + 1
    completion = batch.completion_mask & (sequence_ids >= 0)
    if batch.predictor is not None:  # shared-prompt layout: explicit predicting columns
        scored = completion & (batch.predictor >= 0)
        rows = torch.arange(len(scored), device=scored.device)[:, None].expand_as(scored)[scored]
        columns = batch.predictor[scored]
        targets, owners = batch.input_ids[scored], sequence_ids[scored]
        unpredicted = completion & ~scored
    else:
        # Position t predicts token t+1: scored when t+1 is a completion token of its sequence.
        scored = completion[:, 1:] & (sequence_ids[:, 1:] == sequence_ids[:, :-1])
        rows, columns = scored.nonzero(as_tuple=True)  # the predicting positions, row-major
        targets = batch.input_ids[:, 1:][scored]
        owners = sequence_ids[:, 1:][scored]
        unpredicted = completion.clone()
        unpredicted[:, 1:] &= ~scored
    if on_host and bool(unpredicted.any()):  # a completion with no token before it
        sequence = int(sequence_ids[unpredicted][0])
        raise DpokitError(f"sequence {sequence} of the batch starts with a completion token: "
                          f"nothing predicts it, so log π(y|x) would silently leave it out; "
                          f"give every sequence a prompt of at least one token (e.g. BOS)")
    transform = logit_transform(base.config)
    if fused and transform is None:
        log.warning("%s scales its logits in a way the chunked head does not reproduce; using "
                    "the model's full forward", type(base).__name__)
        fused = False
    if fused and _decoder(base) is None:
        log.warning("%s has no decoder module apart from its LM head; using the model's full "
                    "forward", type(base).__name__)
        fused = False
    if fused and not _head_is_child(base):
        log.warning("%s computes its logits through more than its output embedding (a "
                    "prediction head, as BERT's and RoBERTa's); using the model's full forward",
                    type(base).__name__)
        fused = False

    if fused:
        # (N, H): only the positions that predict a completion token
        hidden = _hidden_states(model, batch, rows, columns, unpadded=unpadded)
        lm_head = base.get_output_embeddings()
        vocab = getattr(lm_head, "out_features", None)
        logits_dtype = torch.promote_types(hidden.dtype, torch.float32)  # _chunk_logps'
        itemsize = logits_dtype.itemsize
        recompute = (torch.is_grad_enabled() and hidden.requires_grad
                     and (vocab is None or len(targets) * vocab * itemsize > KEEP_LOGITS_BYTES))
        pieces = []
        for start in range(0, len(targets), chunk_size):
            args = (hidden[start:start + chunk_size], targets[start:start + chunk_size])
            if recompute:
                pieces.append(checkpoint(_chunk_logps, *args, lm_head, transform, wpo,
                                         token_stats, use_reentrant=False))
            else:
                pieces.append(_chunk_logps(*args, lm_head, transform, wpo, token_stats))
        if pieces:
            token_logps = torch.cat([p[0] for p in pieces])
            wpo_terms = torch.cat([p[1] for p in pieces])
            stats = torch.cat([p[2] for p in pieces])
        else:  # no completion token at all: every sum is the empty one, 0
            token_logps = wpo_terms = hidden.new_zeros(0, dtype=logits_dtype)
            stats = hidden.new_zeros(0, 3, dtype=logits_dtype)
    else:
        logits = model(input_ids=batch.input_ids,
                       attention_mask=_mask(batch, next(base.parameters()).dtype, base.config),
                       position_ids=batch.position_ids, use_cache=False).logits
        logits = logits[rows, columns]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = logits.log_softmax(dim=-1)
        token_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        with torch.no_grad():
            wpo_terms = token_logps.detach() - torch.logsumexp(2 * log_probs.detach(), dim=-1)
        stats = (_token_stats(logits, torch.logsumexp(logits.detach(), dim=-1), targets)
                 if token_stats else token_logps.new_zeros(len(token_logps), 3))

    dtype = token_logps.dtype
    counts = torch.zeros(num_sequences, dtype=torch.long, device=targets.device)
    counts.index_add_(0, owners, torch.ones_like(owners))
    weights = torch.ones_like(token_logps)
    if ld_alpha is not None:
        if batch.num_pairs * 2 != num_sequences or batch.pair_index is not None:
            raise DpokitError("ld_alpha needs a batch of preference pairs, each with sequences "
                              "of its own (LD-DPO weighs a completion by its partner's length)")
        # 1-based position of each token within its completion; tokens of a sequence are
        # contiguous and in order in both layouts.
        index = torch.arange(len(owners), device=owners.device)
        first = torch.full((num_sequences,), len(owners), device=owners.device, dtype=torch.long)
        first = first.scatter_reduce(0, owners, index, reduce="amin")
        position = index - first[owners] + 1
        shared = torch.minimum(counts[:batch.num_pairs], counts[batch.num_pairs:]).repeat(2)
        weights = torch.where(position <= shared[owners],
                              torch.ones((), dtype=dtype, device=owners.device),
                              torch.full((), ld_alpha, dtype=dtype, device=owners.device))
    sums = torch.zeros(num_sequences, dtype=dtype, device=targets.device)
    sums = sums.index_add(0, owners, token_logps * weights)
    plain = None if ld_alpha is None else torch.zeros_like(sums).index_add(0, owners, token_logps)
    wpo_means = None
    if wpo:
        wpo_sums = torch.zeros(num_sequences, dtype=dtype, device=targets.device)
        wpo_sums.index_add_(0, owners, wpo_terms.to(dtype))
        wpo_means = wpo_sums / counts.clamp(min=1)
    if not token_stats:
        return _per_pair(CompletionLogps(sums, counts, wpo_means, plain=plain), batch.pair_index)
    stat_sums = torch.zeros(num_sequences, 3, dtype=dtype, device=targets.device)
    stat_sums.index_add_(0, owners, stats.to(dtype))
    return _per_pair(CompletionLogps(sums, counts, wpo_means, *stat_sums.unbind(dim=-1),
                                     plain=plain), batch.pair_index)


def _per_pair(out: CompletionLogps, pair_index: Tensor | None) -> CompletionLogps:
    """Per-sequence sums as the 2B sequences of B pairs (chosen b, rejected B + b) when pairs of
    a group shared sequences (``pair_index``, ``(2, B)``): a shared completion's value is read by
    every pair that holds it, and its gradient is the sum of theirs."""
    if pair_index is None:
        return out
    index = pair_index.reshape(-1)
    return CompletionLogps(*(None if value is None else value[index] for value in (
        out.logps, out.tokens, out.wpo, out.mean_logits, out.entropy, out.top1, out.plain)))


def sequence_logps(model: nn.Module, batch: PairBatch, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   ld_alpha: float | None = None, wpo: bool = False,
                   fused: bool = True, unpadded: bool = True) -> PairLogps:
    """Summed log π(y|x) of the chosen and the rejected completion of every pair of ``batch``.

    One forward pass over the 2B sequences; see :func:`completion_logps` for the arguments.

    Returns:
        :class:`PairLogps` with ``(B,)`` tensors (float32, or float64 for a float64 model).
    """
    if not batch.num_pairs or (batch.pair_index is None
                               and batch.num_sequences != 2 * batch.num_pairs):
        raise DpokitError("sequence_logps needs a batch of preference pairs (2B sequences)")
    out = completion_logps(model, batch, chunk_size=chunk_size, wpo=wpo, fused=fused,
                           ld_alpha=ld_alpha, unpadded=unpadded)
    b = batch.num_pairs
    return PairLogps(
        chosen_logps=out.logps[:b], rejected_logps=out.logps[b:],
        chosen_tokens=out.tokens[:b], rejected_tokens=out.tokens[b:],
        chosen_wpo=None if out.wpo is None else out.wpo[:b],
        rejected_wpo=None if out.wpo is None else out.wpo[b:],
    )
