"""Preference examples → token pairs, with TRL DPOTrainer 1.x's tokenisation convention.

For each example the prompt alone, prompt + chosen and prompt + rejected are tokenised as the
model will see them — through the tokenizer's own chat template for conversational data (the
generation prompt on the prompt side), plain ``tokenizer(text)`` otherwise, with EOS appended to
each plain-text completion. The prompt tokens are the longest common prefix of the three, so they
are identical for chosen and rejected, and each completion starts where the tokenisations
diverge. (When a merge across the prompt/completion boundary or the template shortens the prompt,
this is logged once with an example.) Then truncation: the prompt to ``max_prompt_length`` (from
the left by default, keeping its end), the completions to ``max_length`` minus the prompt (from the
right by default; ``truncation_mode: keep_end`` cuts the prompt's start instead,
:func:`truncate_to_length`); a pair left with an empty completion is dropped and counted.

Rows over ``max_row_chars`` characters are refused before this (:func:`dpokit.data.formats.
check_row_chars`): tokenising a 50 MB row takes minutes and gigabytes, only to be truncated.
A long tokenisation shows a progress bar on a terminal (:func:`progress_bar`).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tqdm.auto import tqdm

from dpokit.data.formats import Messages, PreferenceExample
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.data")


@dataclass(frozen=True)
class TokenizeSettings:
    """How examples become tokens; every field but ``max_row_chars`` (which only refuses rows)
    changes the tokens."""

    max_length: int | None = 1024
    """Longest prompt + completion, in tokens (None: no limit)."""
    max_prompt_length: int | None = None
    """Longest prompt, in tokens (None: only ``max_length`` applies)."""
    prompt_truncation: Literal["left", "right"] = "left"
    """``left`` drops the start of a long prompt (keeps the end next to the completion)."""
    completion_truncation: Literal["right", "left"] = "right"
    """``right`` drops the end of a long completion."""
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    """What ``max_length`` keeps of a long sequence (TRL's key): ``keep_start`` the prompt and
    the completions' starts (their ends cut, ``completion_truncation``); ``keep_end`` the
    completions and the prompt's end (the prompt's start cut first, then a completion longer
    than ``max_length`` loses its start)."""
    text_mode: Literal["auto", "chat", "plain"] = "auto"
    """``auto``: chat template for conversational rows, plain text otherwise; ``chat`` requires
    conversational rows; ``plain`` renders conversations as ``role: content`` lines (for base
    models)."""
    max_row_chars: int | None = 1_000_000
    """Longest row in characters (prompt + completions, summed), refused before tokenising
    (None: no limit). 1M characters is ~250k tokens, past any context a pair is trained at."""

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length", "max_row_chars"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DpokitError(f"{name} must be ≥ 1 or None, got {value}")
        if self.prompt_truncation not in ("left", "right"):
            raise DpokitError(f"prompt_truncation must be 'left' or 'right', "
                              f"got {self.prompt_truncation!r}")
        if self.completion_truncation not in ("left", "right"):
            raise DpokitError(f"completion_truncation must be 'left' or 'right', "
                              f"got {self.completion_truncation!r}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise DpokitError(f"truncation_mode must be 'keep_start' or 'keep_end', "
                              f"got {self.truncation_mode!r}")
        if self.text_mode not in ("auto", "chat", "plain"):
            raise DpokitError(f"text_mode must be 'auto', 'chat' or 'plain', "
                              f"got {self.text_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair: the shared prompt and the two completions."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float | None = None
    margin: float | None = None
    source: str = ""
    row: int = 0
    label_prob: float | None = None
    group: int = -1
    """Pairs drawn from one prompt's k scored completions share a group id (≥ 0; the row's
    index): they are batched together and each distinct completion is computed once
    (:mod:`dpokit.data.groups`). −1: a pair of its own."""


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def render_plain(messages: Messages) -> str:
    """Plain-text rendering of a conversation for base models: one ``role: content`` per line."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def _ids(encoded: Any) -> list[int]:
    """``input_ids`` of whatever a tokenizer call returned (list, dict or BatchEncoding)."""
    if isinstance(encoded, list):
        return list(encoded)
    return list(encoded["input_ids"])


def _texts(example: PreferenceExample, eos: str) -> tuple[str, str, str]:
    """Prompt, prompt+chosen, prompt+rejected as text, EOS ending each completion."""
    if example.conversational:
        prompt = render_plain(example.prompt)
        chosen, rejected = render_plain(example.chosen), render_plain(example.rejected)
    else:
        prompt, chosen, rejected = example.prompt, example.chosen, example.rejected
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    return prompt, prompt + chosen, prompt + rejected


def encode_chat(tokenizer: Any, conversations: Sequence[tuple[Messages, bool]], *,
                where: str, template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each ``(messages, add_generation_prompt)`` through the chat template."""
    try:
        return [_ids(tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True,
            **(template_kwargs or {}))) for messages, generation_prompt in conversations]
    except Exception as error:  # templates raise TemplateError, ValueError, … on odd turns
        raise DpokitError(f"{where}: the chat template rejected this conversation "
                          f"({type(error).__name__}: {error})") from None


def _chat_ids(tokenizer: Any, example: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = encode_chat(
        tokenizer, [(example.prompt, True), (example.prompt + example.chosen, False),
                    (example.prompt + example.rejected, False)],
        where=example.where, template_kwargs=example.template_kwargs)
    return prompt, chosen, rejected


def progress_bar(items: Iterable, *, total: int, progress: bool | None, desc: str) -> Iterable:
    """``items`` with a tqdm bar on stderr. ``progress=None`` (the default of the loaders): on a
    terminal, on rank 0 of torchrun, and only once the work has taken 2 s."""
    if progress is None:
        disable = None if os.environ.get("RANK", "0") == "0" else True  # None: tqdm's TTY test
    else:
        disable = not progress
    return tqdm(items, total=total, disable=disable, desc=desc, unit="row", leave=False,
                delay=0.0 if progress else 2.0)


_CHUNK = 1024

_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per tokenizer object, :func:`batch_ids`' verdict for each text column (prompt, chosen,
rejected): checked on the first batch the tokenizer encodes, not again for every chunk of a
large file."""


def _verdicts(tokenizer: Any) -> list[dict[str, bool]]:
    try:
        return _VERDICTS.setdefault(tokenizer, [{}, {}, {}])
    except TypeError:  # not weakly referenceable: checked per call
        return [{}, {}, {}]
"""Rows per batched tokenizer call on plain text (the progress bar's step)."""


def batch_ids(tokenizer: Any, texts: list[str], direct: dict[str, bool]) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``, through the Rust backend's ``encode_batch`` directly
    once the two agreed on a first batch (``direct`` holds the verdict across calls):
    transformers' conversion of each encoding is ~20% of tokenising. A tokenizer without a
    backend, or one whose ids differed, keeps the plain call — and so does a backend left
    padding or truncating by an earlier call of the user's (``tokenizer(..., truncation=True,
    max_length=4)``: transformers resets that state at its next call, ``encode_batch`` would
    truncate every text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is None or direct.get("ok") is False
            or getattr(backend, "truncation", None) is not None
            or getattr(backend, "padding", None) is not None):
        return tokenizer(texts)["input_ids"]
    ids = [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=True)]
    if "ok" not in direct:
        plain = tokenizer(texts)["input_ids"]
        direct["ok"] = ids == plain
        if not direct["ok"]:
            log.info("the tokenizer's backend gives other ids than the tokenizer; using the "
                     "tokenizer itself")
            return plain
    return ids


def _truncate(ids: list[int], limit: int, side: str) -> list[int]:
    if len(ids) <= limit:
        return ids
    return ids[len(ids) - limit:] if side == "left" else ids[:limit]


def truncate_to_length(prompt_ids: list[int], completions: list[list[int]],
                       settings: TokenizeSettings) -> tuple[list[int], list[list[int]]]:
    """The prompt and completions of one example cut to ``max_length`` (prompt + each
    completion), as ``settings.truncation_mode`` says.

    ``keep_start``: the prompt is kept, each completion keeps its first ``L − p`` tokens (TRL's
    default, per sequence). ``keep_end``: when ``p + max(c)`` > L the prompt keeps its last
    ``L − max(c)`` tokens. One prompt is shared by the pair, so both sequences lose the same
    prompt tokens (TRL cuts each sequence on its own: its shorter completion may keep up to
    ``|c − r|`` more prompt tokens). A completion of L tokens or more leaves no prompt: one
    sequence (SFT) keeps its last L tokens as TRL does, the first of them the context; a pair's
    completions come back empty, so the pair is dropped (counted) rather than trained on a
    context that never occurred."""
    limit = settings.max_length
    if limit is None:
        return prompt_ids, completions
    if settings.truncation_mode == "keep_end":
        longest = max(len(c) for c in completions)
        if longest >= limit:
            if len(completions) == 1:
                whole = (prompt_ids + completions[0])[-limit:]
                return whole[:1], [whole[1:]]
            return prompt_ids, [[] for _ in completions]
        if len(prompt_ids) + longest > limit:
            prompt_ids = prompt_ids[len(prompt_ids) - (limit - longest):]
        return prompt_ids, completions
    budget = max(limit - len(prompt_ids), 0)
    return prompt_ids, [_truncate(c, budget, settings.completion_truncation)
                        for c in completions]


def tokenize_examples(examples: Sequence[PreferenceExample], tokenizer: Any,
                      settings: TokenizeSettings = TokenizeSettings(), *,
                      progress: bool | None = None) -> list[TokenizedPair]:
    """Tokenise, split at the shared prompt, truncate; drop (and count) pairs left empty.
    ``progress``: a bar on stderr (None: on a terminal, for a tokenisation longer than 2 s)."""
    if not examples:
        return []
    conversational = examples[0].conversational
    use_chat = conversational and settings.text_mode != "plain"
    if settings.text_mode == "chat" and not conversational:
        raise DpokitError(f"{examples[0].where}: text_mode='chat' needs conversational rows "
                          f"(lists of messages); this data is plain text")
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise DpokitError("conversational data needs a tokenizer with a chat template, and this "
                          "tokenizer has none; set text_mode='plain' to render 'role: content' "
                          "lines instead")
    eos = tokenizer.eos_token
    if not use_chat and not eos:
        raise DpokitError("the tokenizer has no eos_token; plain-text completions end with EOS")

    log.info("tokenising %d rows (%s)", len(examples), "chat template" if use_chat else "text")
    if use_chat:
        triples = [_chat_ids(tokenizer, e) for e in progress_bar(
            examples, total=len(examples), progress=progress, desc="tokenising")]
    else:
        triples = []
        bar = progress_bar(None, total=len(examples), progress=progress, desc="tokenising")
        verdicts = _verdicts(tokenizer)  # checked on each column's first batch
        for start in range(0, len(examples), _CHUNK):
            texts = [_texts(e, eos) for e in examples[start:start + _CHUNK]]
            columns = [batch_ids(tokenizer, [t[i] for t in texts], verdicts[i])
                       for i in range(3)]
            triples.extend(zip(*columns, strict=True))
            bar.update(len(texts))
        bar.close()

    pairs: list[TokenizedPair] = []
    merged = dropped = 0
    for example, (prompt, prompt_chosen, prompt_rejected) in zip(examples, triples, strict=True):
        shared = min(common_prefix_length(prompt, prompt_chosen),
                     common_prefix_length(prompt, prompt_rejected))
        if shared < len(prompt):
            if merged == 0:
                log.warning(
                    "%s: the tokenized prompt is not a prefix of prompt+completion (tokens merge "
                    "across the boundary, or the template renders the prompt differently); the "
                    "completion starts where they diverge, leaving out %r of the prompt",
                    example.where, tokenizer.decode(prompt[shared:]))
            merged += 1
        prompt_ids = list(prompt[:shared])
        chosen_ids, rejected_ids = list(prompt_chosen[shared:]), list(prompt_rejected[shared:])
        if settings.max_prompt_length is not None:
            prompt_ids = _truncate(prompt_ids, settings.max_prompt_length,
                                   settings.prompt_truncation)
        prompt_ids, (chosen_ids, rejected_ids) = truncate_to_length(
            prompt_ids, [chosen_ids, rejected_ids], settings)
        if not chosen_ids or not rejected_ids:
            dropped += 1
            continue
        if not prompt_ids:
            raise DpokitError(f"{example.where}: the prompt is no token after tokenisation (an "
                              f"empty prompt and a tokenizer that adds no BOS, or a prompt "
                              f"merged into the completion's first token): nothing would "
                              f"predict the completion's first token, so log π(y|x) would "
                              f"leave it out; give the row a prompt")
        pairs.append(TokenizedPair(prompt_ids, chosen_ids, rejected_ids, example.weight,
                                   example.margin, example.source, example.row,
                                   example.label_prob, example.group))
    if merged > 1:
        log.warning("%d of %d rows had their prompt shortened at the boundary", merged,
                    len(examples))
    if dropped:
        log.warning("dropped %d of %d rows whose completion is empty after truncation to "
                    "max_length=%s, max_prompt_length=%s%s", dropped, len(examples),
                    settings.max_length, settings.max_prompt_length,
                    " (with keep_end: a completion of max_length tokens or more)"
                    if settings.truncation_mode == "keep_end" else "")
    if not pairs:
        raise DpokitError(f"no rows left after truncation (all {len(examples)} had an empty "
                          f"completion); raise max_length or lower max_prompt_length")
    return pairs
