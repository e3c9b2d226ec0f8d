"""Supervised fine-tuning data: rows → (prompt, completion) token sequences.

Accepted rows: ``prompt`` + ``completion`` strings (EOS appended to the completion, as for
preference data); ``prompt`` messages + ``completion`` message(s); a whole ``messages``
conversation whose last (assistant) message is the completion; or a ``text`` string (language
modelling, EOS appended: every token after the first is trained on). The prompt tokens are the
common prefix of the prompt alone and prompt + completion (the rule of
:mod:`dpokit.data.tokenize`); SFT's loss is the NLL of the completion tokens only.

Which tokens are the completion follows TRL's SFTConfig keys: ``completion_only_loss`` True
(dpokit's default) — the completion, for a conversation its last message; False — every token
after the first (the prompt is trained on too); None — TRL's rule: the completion of
prompt-completion rows, every token of ``messages`` and ``text`` rows. ``assistant_only_loss``
(conversational rows only: a plain-text row is refused, naming it, as TRL refuses the data)
trains a conversation's assistant message only (whatever ``completion_only_loss`` says, as TRL's
assistant mask), which must be its last and only one (several assistant turns are refused,
naming the row: dpokit masks one span per row). With a chat template that marks the assistant's
tokens (``{% generation %}``) the trained span is exactly the template's assistant mask, as TRL's
(for prompt-completion rows, its part in the completion, unless ``completion_only_loss`` is
False); the template's tokens after it (e.g. a newline after the end-of-turn token) are not
trained, but counted in ``num_tokens`` as TRL's attention mask counts them
(:attr:`SFTSequence.tail`). A row's ``tools`` and ``chat_template_kwargs`` go to the chat
template, as TRL passes them.

:func:`load_sft_sequences` prepares the rows chunk by chunk into an item store
(:mod:`dpokit.data.prepare`, :mod:`dpokit.data.store`), with the checks and counts of the whole
data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from dpokit.data.formats import (
    _template_kwargs,
    as_messages,
    check_columns,
    check_row_chars,
    is_messages,
)
from dpokit.data.io import RawRow
from dpokit.data.prepare import ChunkResult, Recipe, Summary, load_items, take
from dpokit.data.tokenize import (
    TokenizeSettings,
    _ids,
    _truncate,
    common_prefix_length,
    encode_chat,
    progress_bar,
    render_plain,
    truncate_to_length,
)
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.data")


@dataclass(frozen=True)
class SFTSequence:
    """Token ids of one SFT example."""

    prompt_ids: list[int]
    completion_ids: list[int]
    source: str = ""
    row: int = 0
    tail: int = 0
    """Tokens of the rendered conversation after the completion that the truncation keeps
    (``assistant_only_loss``: the chat template's tokens after its assistant mask, e.g. the
    newline after the end-of-turn token): left out of the sequence, which they cannot change,
    but input tokens of TRL's ``attention_mask``, so ``num_tokens`` counts them."""


@dataclass(frozen=True)
class _Example:
    prompt: Any
    completion: Any
    where: str
    kind: str = "completion"
    """``completion`` (prompt-completion rows), ``conversation`` (``messages``) or ``text``."""
    template_kwargs: dict[str, Any] | None = None
    """The row's ``tools`` and ``chat_template_kwargs`` for the chat template."""


def _parse(row: RawRow, prompt_column: str, completion_column: str,
           messages_column: str, text_column: str = "text", *,
           assistant_only: bool = False) -> _Example:
    fields = row.fields
    if messages_column in fields and fields[messages_column] is not None:
        messages = as_messages(row, messages_column, fields[messages_column], single_ok=False)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DpokitError(f"{row.where}, field {messages_column!r}: needs at least one "
                              f"prompt message followed by a final assistant message")
        turns = sum(m["role"] == "assistant" for m in messages)
        if assistant_only and turns > 1:
            raise DpokitError(f"{row.where}, field {messages_column!r}: {turns} assistant "
                              f"messages; assistant_only_loss trains one (the last) per row in "
                              f"dpokit — split the conversation into one row per turn")
        return _Example(messages[:-1], messages[-1:], row.where, "conversation",
                        _template_kwargs(row))
    if (text_column in fields and fields[text_column] is not None
            and prompt_column not in fields and completion_column not in fields):
        text = fields[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DpokitError(f"{row.where}, field {text_column!r}: expected a non-empty string")
        if assistant_only:
            raise DpokitError(_not_conversational(row, text_column))
        return _Example("", text, row.where, "text")
    for name in (prompt_column, completion_column):
        if name not in fields or fields[name] is None:
            raise DpokitError(f"{row.where}, field {name!r}: missing (an SFT row needs "
                              f"{prompt_column}/{completion_column}, {messages_column} or "
                              f"{text_column})")
    prompt, completion = fields[prompt_column], fields[completion_column]
    if is_messages(completion) or is_messages(prompt):
        return _Example(as_messages(row, prompt_column, prompt, single_ok=False),
                        as_messages(row, completion_column, completion, single_ok=True), row.where,
                        template_kwargs=_template_kwargs(row))
    for name, value in ((prompt_column, prompt), (completion_column, completion)):
        if not isinstance(value, str):
            raise DpokitError(f"{row.where}, field {name!r}: expected a string, "
                              f"got {type(value).__name__}")
    if not completion.strip():
        raise DpokitError(f"{row.where}, field {completion_column!r}: empty completion")
    if assistant_only:
        raise DpokitError(_not_conversational(row, f"{prompt_column}/{completion_column}"))
    return _Example(prompt, completion, row.where)


def _not_conversational(row: RawRow, fields: str) -> str:
    """TRL's SFTTrainer refuses ``assistant_only_loss`` on data that is not conversational (a
    ValueError); dpokit names the row rather than train its text whole or its completion."""
    return (f"{row.where}, field {fields!r}: assistant_only_loss needs conversational rows "
            f"(lists of messages); this row is plain text — set assistant_only_loss false")


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
"""What marks a chat template's assistant tokens (transformers' test for an assistant mask)."""


def _marks_assistant_tokens(tokenizer: Any, template_kwargs: dict | None) -> bool:
    template = tokenizer.chat_template
    getter = getattr(tokenizer, "get_chat_template", None)
    if getter is not None:
        try:
            template = getter(tools=(template_kwargs or {}).get("tools"))
        except Exception:  # no usable template: encode_chat says so
            return False
    return isinstance(template, str) and _GENERATION_TAG.search(template) is not None


def _assistant_span(tokenizer: Any, example: _Example, full: list[int], shared: int,
                    completion_only_loss: bool | None) -> tuple[int, int] | None:
    """``[start, end)`` of the tokens TRL's ``assistant_only_loss`` trains in ``full`` (the
    template's assistant mask, in a prompt-completion row cut to the completion unless
    ``completion_only_loss`` is False), or None for a template that marks none."""
    if not _marks_assistant_tokens(tokenizer, example.template_kwargs):
        return None
    try:
        encoded = tokenizer.apply_chat_template(
            example.prompt + example.completion, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, **(example.template_kwargs or {}))
    except Exception as error:
        raise DpokitError(f"{example.where}: assistant_only_loss: the chat template's assistant "
                          f"mask failed ({type(error).__name__}: {error})") from None
    mask = list(encoded["assistant_masks"])
    if _ids(encoded) != full or len(mask) != len(full):
        raise DpokitError(f"{example.where}: assistant_only_loss: the chat template renders "
                          f"this conversation differently when asked for its assistant mask")
    if example.kind == "completion" and completion_only_loss is not False:
        mask = [bit if i >= shared else 0 for i, bit in enumerate(mask)]
    trained = [i for i, bit in enumerate(mask) if bit]
    if not trained:
        raise DpokitError(f"{example.where}: assistant_only_loss: the chat template marks no "
                          f"assistant token of this row's completion ({{% generation %}})")
    start, end = trained[0], trained[-1] + 1
    if len(trained) != end - start:
        raise DpokitError(f"{example.where}: assistant_only_loss: the chat template's assistant "
                          f"tokens form several spans; dpokit trains one per row — split the "
                          f"conversation into one row per assistant turn")
    return start, end


def tokenize_sft(examples: Sequence[_Example], tokenizer: Any, settings: TokenizeSettings, *,
                 progress: bool | None = None, assistant_only: bool = False,
                 completion_only_loss: bool | None = True
                 ) -> list[tuple[list[int], list[int], int]]:
    """(prompt ids, completion ids, tail) per example, before truncation: ``tail`` tokens of
    the rendered conversation follow the completion, untrained (left out of the sequence, which
    they cannot change; counted by ``keep_end`` truncation as TRL's ``[-max_length:]`` does).
    ``assistant_only``: the completion is the chat template's assistant mask where the template
    has one (:func:`_assistant_span`)."""
    log.info("tokenising %d SFT rows", len(examples))
    out = []
    for example in progress_bar(examples, total=len(examples), progress=progress,
                                desc="tokenising"):
        conversational = isinstance(example.completion, list)
        if settings.text_mode == "chat" and not conversational:  # as preference pairs refuse
            raise DpokitError(f"{example.where}: text_mode='chat' needs conversational rows "
                              f"(lists of messages); this row is plain text")
        if conversational and settings.text_mode != "plain":
            if not getattr(tokenizer, "chat_template", None):
                raise DpokitError("conversational data needs a tokenizer with a chat template; "
                                  "set text_mode='plain'")
            prompt, full = encode_chat(
                tokenizer, [(example.prompt, True), (example.prompt + example.completion, False)],
                where=example.where, template_kwargs=example.template_kwargs)
            shared = common_prefix_length(prompt, full)
            span = _assistant_span(tokenizer, example, full, shared, completion_only_loss) if (
                assistant_only) else None
            if span is not None:
                start, end = span
                out.append((list(full[:start]), list(full[start:end]), len(full) - end))
                continue
        else:
            eos = tokenizer.eos_token
            if not eos:  # a completion must end, as a preference pair's does
                raise DpokitError("the tokenizer has no eos_token; plain-text completions end "
                                  "with EOS")
            prompt_text = render_plain(example.prompt) if conversational else example.prompt
            completion = (render_plain(example.completion) if conversational
                          else example.completion)
            completion = completion if completion.endswith(eos) else completion + eos
            prompt, full = (_ids(tokenizer(prompt_text)), _ids(tokenizer(prompt_text + completion)))
        shared = common_prefix_length(prompt, full)
        out.append((list(full[:shared]), list(full[shared:]), 0))
    return out


def sft_sequences(examples: Sequence[_Example], rows: Sequence[RawRow],
                  tokenized: Sequence[tuple[list[int], list[int], int]],
                  settings: TokenizeSettings,
                  *, completion_only_loss: bool | None, assistant_only_loss: bool
                  ) -> tuple[list[SFTSequence], int]:
    """The sequences of tokenised examples: the loss span chosen, truncated; and how many
    were left without completion tokens (dropped)."""
    sequences, dropped = [], 0
    for example, row, (prompt_ids, completion_ids, tail) in zip(examples, rows, tokenized,
                                                                strict=True):
        whole = not assistant_only_loss and (completion_only_loss is False or (
            completion_only_loss is None and example.kind != "completion"))
        if whole:  # every token after the first is trained on (TRL's language modelling)
            prompt_ids, completion_ids = [], prompt_ids + completion_ids
        if not prompt_ids:  # nothing predicts the first token: it becomes the context
            prompt_ids, completion_ids = completion_ids[:1], completion_ids[1:]
        if settings.max_prompt_length is not None:
            prompt_ids = _truncate(prompt_ids, settings.max_prompt_length,
                                   settings.prompt_truncation)
        cut = settings
        if tail and settings.max_length is not None and settings.truncation_mode == "keep_end":
            if settings.max_length <= tail:  # TRL's last max_length tokens are all after it
                dropped += 1
                continue
            cut = replace(settings, max_length=settings.max_length - tail)
        prompt_ids, (completion_ids,) = truncate_to_length(prompt_ids, [completion_ids], cut)
        if not completion_ids:
            dropped += 1
            continue
        if tail and settings.max_length is not None and settings.truncation_mode == "keep_start":
            # TRL's [:max_length] reaches the tail only after the whole sequence
            tail = min(tail, max(settings.max_length - len(prompt_ids) - len(completion_ids), 0))
        sequences.append(SFTSequence(prompt_ids, completion_ids, row.source, row.row, tail))
    return sequences, dropped


_DEFAULT_COLUMNS = {"prompt_column": "prompt", "completion_column": "completion",
                    "messages_column": "messages", "text_column": "text"}
# The order of the checks over the whole data.
COLUMNS, ROW_CHARS, PARSE, TOKENIZE = 2, 3, 5, 7


@dataclass(frozen=True)
class SFTRecipe(Recipe):
    """A chunk of SFT rows → :class:`SFTSequence` arrays (:mod:`dpokit.data.prepare`)."""

    settings: TokenizeSettings
    named: tuple[tuple[str, str], ...]
    """``(config key, column)`` of the prompt, completion, messages and text columns."""
    completion_only_loss: bool | None
    assistant_only_loss: bool
    item_cls: ClassVar[type] = SFTSequence
    global_stage: ClassVar[int] = COLUMNS

    def process(self, rows: list[RawRow], tokenizer: Any, stop: int,
                records: list[tuple[int, str, tuple]], first: RawRow) -> ChunkResult:
        named = dict(self.named)
        result = ChunkResult(len(rows), stats={
            "sources": list(dict.fromkeys(r.source for r in rows)),
            "columns": list(dict.fromkeys(n for r in rows for n in r.fields))})
        try:
            check_row_chars(rows, [*named.values(), "tools"], self.settings.max_row_chars)
        except DpokitError as error:
            return result.failed(ROW_CHARS, error)
        if stop <= PARSE:
            return result
        try:
            examples = [_parse(r, named["prompt_column"], named["completion_column"],
                               named["messages_column"], named["text_column"],
                               assistant_only=self.assistant_only_loss) for r in rows]
        except DpokitError as error:
            return result.failed(PARSE, error)
        if stop <= TOKENIZE:
            return result
        try:
            tokenized = tokenize_sft(examples, tokenizer, self.settings, progress=False,
                                     assistant_only=self.assistant_only_loss,
                                     completion_only_loss=self.completion_only_loss)
        except DpokitError as error:
            return result.failed(TOKENIZE, error)
        take(records, "tokenising %d SFT rows")
        sequences, result.stats["dropped"] = sft_sequences(
            examples, rows, tokenized, self.settings,
            completion_only_loss=self.completion_only_loss,
            assistant_only_loss=self.assistant_only_loss)
        return result.holding(sequences, SFTSequence)

    def summary(self, path: str | Path) -> Summary:
        return SFTSummary(self, str(path))


class SFTSummary(Summary):
    """The renamed columns' check and the dropped rows, over every chunk."""

    def __init__(self, recipe: SFTRecipe, path: str):
        super().__init__(recipe, path)
        self.dropped = 0

    def add(self, result: ChunkResult) -> list:
        self.count(result, result.stats)
        self.dropped += result.stats.get("dropped", 0)
        return []

    def check(self) -> None:
        check_columns(self.stand_ins(), {key: name for key, name in self.recipe.named
                                  if name != _DEFAULT_COLUMNS[key]})

    def finish(self, count: int) -> None:
        log.info("tokenising %d SFT rows", self.rows)
        if self.dropped:
            log.warning("dropped %d of %d SFT rows left without completion (or prompt) tokens "
                        "after truncation", self.dropped, self.rows)
        if not count:
            raise DpokitError(f"{self.path}: no SFT rows left after truncation")


def load_sft_sequences(path: str | Path, tokenizer: Any, *,
                       settings: TokenizeSettings = TokenizeSettings(),
                       prompt_column: str = "prompt", completion_column: str = "completion",
                       messages_column: str = "messages", text_column: str = "text",
                       completion_only_loss: bool | None = True,
                       assistant_only_loss: bool = False,
                       split: str | None = None,
                       progress: bool | None = None,
                       cache_dir: Path | None = None,
                       dataset_num_proc: int | None = None,
                       chunk_rows: int | None = None) -> Sequence[SFTSequence]:
    """Read, validate, tokenise and truncate SFT data, chunk by chunk, into an item store (a
    read-only sequence, :mod:`dpokit.data.store`); rows left empty are dropped and counted.
    A column renamed from its default must exist; rows over ``settings.max_row_chars`` are
    refused before tokenising. ``completion_only_loss``/``assistant_only_loss``: which tokens
    are the completion (module docstring). ``cache_dir``: read the sequences from (or store
    them in) the tokenised-data cache there (:mod:`dpokit.data.cache`), memory-mapped (without
    it: from unnamed temporary files).
    ``dataset_num_proc``, ``chunk_rows``: see :func:`dpokit.data.load_preference_pairs`."""
    chosen = {"prompt_column": prompt_column, "completion_column": completion_column,
              "messages_column": messages_column, "text_column": text_column,
              "completion_only_loss": completion_only_loss,
              "assistant_only_loss": assistant_only_loss}
    recipe = SFTRecipe(settings, tuple((key, chosen[key]) for key in _DEFAULT_COLUMNS),
                       completion_only_loss, assistant_only_loss)

    return load_items(path, split, tokenizer, recipe, settings=settings, key_columns=chosen,
                      cache_dir=cache_dir, progress=progress, num_proc=dataset_num_proc,
                      chunk_rows=chunk_rows)
