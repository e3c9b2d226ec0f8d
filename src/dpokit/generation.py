"""Completions of prompts from a causal LM: ``model.generate`` with a KV cache, seeded.

    completions = generate_completions(model, tokenizer, prompts, num_generations=2,
                                       max_new_tokens=64, temperature=1.0, seed=0)

Prompts are left-padded into batches (``generate`` continues every row from its last column).
With ``num_generations`` > 1 each prompt is computed once: its KV cache is filled by one forward
over the unique prompts and repeated for its generations before ``generate`` decodes (greedy
output equal to the plain path, tested). Each completion is cut after its first end token
(``eos`` True) or keeps all ``max_new_tokens`` tokens (``eos`` False); the end tokens are the
tokenizer's EOS and the model's ``generation_config.eos_token_id`` (a chat model's end of turn
and end of text, e.g. Qwen2.5-Instruct's ``<|im_end|>`` and ``<|endoftext|>``), as TRL stops
(:func:`end_token_ids`; ``stop_token_ids`` overrides them). ``temperature`` 0 is greedy
decoding; otherwise sampling with ``top_k`` (0: off) and ``top_p`` (1: off). The random stream
is seeded from ``seed`` alone and the caller's global RNG is left as it was, so the same call
gives the same completions, and training that generates between steps resumes exactly. It is
one stream over the batches: another ``batch_size`` or other prompts beside a prompt give it
other (equally distributed) draws. Next-token logits that are not finite (NaN, +inf: a diverged
or overflowing model) stop generation with a one-line error naming the prompt: greedy decoding
took NaN's argmax silently, sampling failed with a traceback.

No log-probabilities are recorded: what is sampled comes from the temperature/top-k/top-p
adjusted law, while DPO's loss (and ``kl_to_ref``) need the raw π_θ(y|x), which the objective
re-scores with gradients (:mod:`dpokit.logps`); the two agree only at temperature 1 without
top-k/top-p.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpokit.data.prompts import Prompt
from dpokit.errors import DpokitError


@dataclass(frozen=True)
class Completion:
    """One generated completion of one prompt."""

    ids: list[int]
    """Token ids after the prompt, up to and including the first EOS."""
    text: str
    """``ids`` decoded without special tokens."""
    eos: bool
    """Whether it ended with EOS within ``max_new_tokens`` (else it was cut there)."""


def check_sampling(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                   num_generations: int = 1) -> None:
    """One-line errors for impossible generation settings, naming the key."""
    if max_new_tokens < 1:
        raise DpokitError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise DpokitError(f"temperature must be a finite number ≥ 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise DpokitError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise DpokitError(f"top_k must be ≥ 0 (0: off), got {top_k}")
    if num_generations < 1:
        raise DpokitError(f"num_generations must be ≥ 1, got {num_generations}")


def end_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS first, then the model's (or a PEFT
    model's base's) ``generation_config.eos_token_id`` — one id or a list — as TRL 1.16's
    online trainer stops."""
    ids = [tokenizer.eos_token_id]
    base = getattr(model, "get_base_model", lambda: model)()
    config = getattr(base, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for token in ([extra] if isinstance(extra, int) else list(extra or [])):
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    return ids


@torch.no_grad()
def generate_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *,
                         num_generations: int = 1, max_new_tokens: int = 64,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         seed: int = 0, batch_size: int = 64,
                         stop_token_ids: Sequence[int] | None = None) -> list[list[Completion]]:
    """``num_generations`` completions of each prompt (outer list: prompts, in order), each
    ended by the first of ``stop_token_ids`` (None: :func:`end_token_ids`)."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, num_generations=num_generations)
    if batch_size < 1:
        raise DpokitError(f"batch_size must be ≥ 1, got {batch_size}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise DpokitError("generation needs a tokenizer with an eos_token")
    if pad is None:  # any id pads: the attention mask is explicit and completions end at a stop
        pad = eos
    empty = next((i for i, p in enumerate(prompts) if not p.prompt_ids), None)
    if empty is not None:  # alone an IndexError; beside others, a completion of nothing
        raise DpokitError(f"{_where(prompts[empty], empty)}: the prompt has no tokens; "
                          f"generation continues a prompt")
    stops = list(stop_token_ids) if stop_token_ids is not None else end_token_ids(model,
                                                                                 tokenizer)
    stop_set = set(stops)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    k = num_generations
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
                if temperature > 0 else {"do_sample": False})
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                _plain_generation_config(model):
            torch.manual_seed(seed)
            for chunk, copies in _calls(prompts, k, batch_size):
                first = len(out) // k  # the index of the call's first prompt
                rows = [i for i in range(first, first + len(chunk)) for _ in range(copies)]
                width = max(len(r) for r in chunk)
                ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk],
                                    device=device)
                extra = {}
                if copies > 1 and width > 1:
                    name, cache = _prompt_cache(model, ids[:, :-1], mask[:, :-1], copies)
                    extra[name] = cache
                generated = model.generate(ids.repeat_interleave(copies, 0),
                                           attention_mask=mask.repeat_interleave(copies, 0),
                                           max_new_tokens=max_new_tokens,
                                           eos_token_id=stops, pad_token_id=pad, **sampling,
                                           logits_processor=_finite_logits(
                                               prompts, rows, width, dtype),
                                           **extra)
                for row in generated[:, width:].tolist():
                    end = next((i for i, token in enumerate(row) if token in stop_set), None)
                    ended = end is not None
                    row = row[:end + 1] if ended else row
                    out.append(Completion(row, tokenizer.decode(row, skip_special_tokens=True),
                                          ended))
    finally:
        model.train(was_training)
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


@contextlib.contextmanager
def _plain_generation_config(model: nn.Module) -> Iterator[None]:
    """While inside, ``model`` (and a PEFT model's base) generates with transformers' defaults
    and the call's settings only: ``generate`` fills every setting a call leaves unset from the
    model's ``generation_config`` — a checkpoint's ``generation_config.json`` may hold a
    repetition penalty, banned words, a minimum length… — which would sample from another
    distribution than π_θ (on-policy pairs; kl_to_ref's unbiasedness)."""
    from transformers import GenerationConfig

    holders = [m for m in {id(m): m for m in (model, getattr(model, "get_base_model",
                                                               lambda: model)())}.values()
               if hasattr(m, "generation_config")]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(holders, saved, strict=True):
            m.generation_config = config


def _where(prompt: Prompt, index: int) -> str:
    """``file, row N`` of a prompt read from a file, else its index in the call."""
    return prompt.where if prompt.source else f"prompt {index}"


def _finite_logits(prompts: Sequence[Prompt], rows: Sequence[int], width: int,
                   dtype: torch.dtype) -> Any:
    """A logits processor (generate runs it first, on the raw logits) that raises a one-line
    error naming the prompt when a row's next-token logits hold a NaN or +inf, or are all −inf
    (their max is not finite): ``rows[b]`` is the prompt of batch row ``b``, ``width`` the
    prompt columns, ``dtype`` the model's (for the message)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            bad = ~torch.isfinite(scores.amax(dim=-1))  # (B,); amax propagates NaN
            if bool(bad.any()):
                index = rows[int(bad.nonzero()[0, 0])]
                raise DpokitError(
                    f"{_where(prompts[index], index)}: the model's next-token logits are not "
                    f"finite (NaN or inf) at generated token {input_ids.shape[1] - width + 1}; "
                    f"the model has diverged or overflows its dtype ({dtype})")
            return scores

    return LogitsProcessorList([FiniteLogits()])


def _calls(prompts: Sequence[Prompt], k: int,
           batch_size: int) -> list[tuple[list[list[int]], int]]:
    """``(prompt ids, copies)`` per ``generate`` call, in output order: whole prompts with their
    ``k`` generations, at most ``batch_size`` sequences a call (a prompt's generations split
    over several calls when ``k`` is larger)."""
    if k <= batch_size:
        per_call = batch_size // k
        return [([p.prompt_ids for p in prompts[i:i + per_call]], k)
                for i in range(0, len(prompts), per_call)]
    return [([p.prompt_ids], min(batch_size, k - done)) for p in prompts
            for done in range(0, k, batch_size)]


def _prompt_cache(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  copies: int) -> tuple[str, Any]:
    """The KV cache of all but the last prompt token, one forward per unique prompt, each row
    repeated ``copies`` times (``generate`` then runs only the last token and the new ones), and
    the keyword this transformers version takes it by."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate numbers them
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
          **{name: cache})
    cache.batch_repeat_interleave(copies)
    return name, cache


def completion_records(prompts: Sequence[Prompt],
                       completions: Sequence[Sequence[Completion]]) -> list[dict[str, Any]]:
    """One JSON-ready record per completion: ``source``, ``row``, ``prompt``, ``completion``,
    ``eos``, ``tokens`` (what ``samples.jsonl`` holds)."""
    return [{"source": p.source, "row": p.row, "prompt": p.prompt, "completion": c.text,
             "eos": c.eos, "tokens": len(c.ids)}
            for p, group in zip(prompts, completions, strict=True) for c in group]

