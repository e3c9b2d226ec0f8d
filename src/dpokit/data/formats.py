"""Validate rows and bring the preference formats users have to one shape.

Accepted per row (column names mappable with :class:`ColumnMap`):

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen``/``rejected``
  one assistant message (a dict) or a list of messages;
- implicit prompt: only ``chosen``/``rejected``, two full conversations (or texts) sharing a
  prefix, which is split off as the prompt;

an implicit prompt must end with a turn the completions answer (sharing only a ``system`` or
``developer`` message, the completions would start with the user's turn: refused);

plus optional numeric ``weight`` (finite, ≥ 0; scales the pair's loss), ``margin`` (the offset m
of the losses that read one, e.g. ``odpo``; ignored, with a warning, by the others) and
``label_prob`` (p = P(chosen ≻ rejected) ∈ [0, 1], the soft label of ``sigmoid_soft``) columns.

Checked over the whole dataset, so nothing is misread without a word: a column renamed from its
default must exist (a misspelt ``prompt_column`` is an error, not implicit-prompt rows); an
optional column some rows fill must not be null (or missing, or an empty CSV cell) in others;
a row longer than ``max_row_chars`` is refused before it reaches the tokenizer; what is read
other than as written (a text prompt beside whole conversations, a message prompt the
conversations repeat, an implicit text prompt left empty: :data:`NOTES`) is one warning with a
count. Data of k scored completions gets the same column check (:func:`check_renamed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dpokit.data.io import RawRow
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.data")

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "ipython", "function"})

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ColumnMap:
    """Names of the columns in the user's data (map e.g. ``chosen`` to ``response_a``)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    weight: str = "weight"
    margin: str = "margin"
    label_prob: str = "label_prob"
    completions: str = "completions"
    """k scored completions of one prompt in one row (:mod:`dpokit.data.groups`)."""
    scores: str = "scores"
    completion: str = "completion"
    """One scored completion per row, rows of one prompt forming its group."""
    score: str = "score"
    pairs_from_scores: str = "best_vs_worst"
    """Which pairs k scored completions give (:data:`dpokit.data.groups.PAIR_SELECTIONS`)."""

    @property
    def by_key(self) -> dict[str, str]:
        """Config key (``prompt_column``, …) → column name."""
        return {f"{f.name}_column": getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "pairs_from_scores"}

    @property
    def required(self) -> dict[str, str]:
        """Config key → name of each column the data must have: chosen and rejected, and every
        other column renamed from its default. A default name may be absent — no ``prompt`` is
        the implicit-prompt format, no ``weight`` weighs every pair 1 — but a name the user
        changed is one they mean (``prompt_column: promt`` must not read as "no prompts")."""
        # the names the user chose first: a misspelt score_column is what an error names, not
        # the 'chosen' column that data of one row per completion has no need of
        return {**self.renamed, "chosen_column": self.chosen, "rejected_column": self.rejected}

    @property
    def renamed(self) -> dict[str, str]:
        """Config key → name of each column renamed from its default (whatever the data's
        shape, a name the user chose must be a column of the data)."""
        defaults = ColumnMap().by_key
        return {key: name for key, name in self.by_key.items() if name != defaults[key]}

    @property
    def optional(self) -> dict[str, str]:
        """Config key → name of the columns a row may leave out (prompt and the numeric ones)."""
        return {key: name for key, name in self.by_key.items()
                if key in ("prompt_column", *_NUMERIC)}


@dataclass(frozen=True)
class PreferenceExample:
    """One validated preference: a prompt and two completions (text, or chat messages)."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    weight: float | None = None
    margin: float | None = None
    source: str = ""
    row: int = 0
    template_kwargs: dict[str, Any] | None = None
    """Extra ``apply_chat_template`` arguments (``tools``, ``chat_template_kwargs``)."""
    label_prob: float | None = None
    """P(chosen ≻ rejected): a soft preference label (annotator agreement, or σ of a score gap)."""
    group: int = -1
    """The pairs of one prompt's k scored completions share a group (:mod:`dpokit.data.groups`);
    −1: a pair row of its own."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"


def fail(row: RawRow, field: str, problem: str) -> DpokitError:
    return DpokitError(f"{row.where}, field {field!r}: {problem}")


def check_text(row: RawRow, field: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise fail(row, field, "undecodable text (invalid Unicode)") from None
    return text


def as_messages(row: RawRow, field: str, value: Any, *, single_ok: bool) -> Messages:
    """A list of ``{role, content}`` dicts with known roles and string contents."""
    if single_ok and isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise fail(row, field, "expected a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise fail(row, field, f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLES:  # a list or dict is unhashable
            raise fail(row, field, f"message {i} has unknown role {role!r} "
                                    f"(expected one of {', '.join(sorted(ROLES))})")
        if not isinstance(content, str):
            raise fail(row, field, f"message {i} content must be a string, "
                                    f"got {type(content).__name__}")
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        messages.append({"role": role, "content": check_text(row, field, content), **extra})
    return messages


def is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)) or (
        isinstance(value, dict) and "role" in value)


_NUMERIC = ("weight_column", "margin_column", "label_prob_column")
_UNANSWERED_ROLES = frozenset({"system", "developer"})
"""Roles a prompt cannot end with: instructions, not a turn the completions reply to."""


def _is_null(value: Any, numeric: bool) -> bool:
    """No value: null (missing), or, for a number, an empty CSV cell."""
    return value is None or (numeric and isinstance(value, str) and not value.strip())


def get_number(row: RawRow, field: str) -> float | None:
    value = row.fields.get(field)
    if _is_null(value, numeric=True):
        return None
    # float() alone reads "1_0" as 10 and a full-width "１" as 1: no CSV reader's numbers
    if isinstance(value, bool) or (isinstance(value, str) and (
            "_" in value or not value.isascii())):
        raise fail(row, field, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer past float's range (JSON allows any)
        raise fail(row, field, "expected a finite number, got an integer too large for a "
                               "float") from None
    except (TypeError, ValueError):
        raise fail(row, field, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise fail(row, field, f"expected a finite number, got {value!r}")
    return number


def _split_implicit(row: RawRow, columns: ColumnMap, chosen: Any, rejected: Any):
    """Split the longest shared prefix of two conversations (or texts) off as the prompt."""
    if isinstance(chosen, list):
        shared = 0
        while (shared < min(len(chosen), len(rejected))
               and chosen[shared] == rejected[shared]):
            shared += 1
        if shared == 0:
            raise fail(row, columns.prompt, "missing, and chosen/rejected share no leading "
                                             "messages to take it from")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared > 0 and chosen[shared - 1] == " ":  # one space starts the completion (as TRL)
            shared -= 1
    if shared >= min(len(chosen), len(rejected)):
        relation = "identical" if chosen == rejected else "one is a prefix of the other"
        error = fail(row, columns.chosen, f"no prompt column, and chosen/rejected are {relation}: "
                                           f"splitting off their shared prefix as the prompt "
                                           f"leaves an empty completion")
        raise Unsplittable(str(error))
    return chosen[:shared], chosen[shared:], rejected[shared:]


class Unsplittable(DpokitError):
    """An implicit-prompt row whose chosen and rejected are identical or one a prefix of the
    other: no completion is left to split off. Data read whole drops such rows and counts them
    (:func:`parse_rows`); one row parsed alone raises it."""


def parse_rows(rows: Sequence[RawRow], columns: ColumnMap,
               notes: dict[str, list]) -> list[PreferenceExample]:
    """:func:`parse_example` of each row, the :class:`Unsplittable` ones dropped and counted in
    ``notes`` (Anthropic HH-RLHF holds pairs whose two conversations are the same: they carry
    no preference, and TRL would train on their last character as both completions)."""
    examples = []
    for row in rows:
        try:
            examples.append(parse_example(row, columns, notes=notes))
        except Unsplittable:
            note(notes, "unsplittable", row)
    return examples


NOTES = {
    "text_prompt": "a text prompt beside conversational chosen/rejected is not read; the prompt "
                   "is the messages they share",
    "repeated_prompt": "chosen/rejected are whole conversations beginning with the prompt's "
                       "messages; those are split off (else the model is trained to say the "
                       "prompt again as its own turn)",
    "empty_prompt": "no prompt column, and chosen and rejected share no leading text: the pair "
                    "is trained on an empty prompt",
    "unsplittable": "dropped: no prompt column, and chosen/rejected are identical or one is a "
                    "prefix of the other (no completion is left once their shared start is "
                    "split off as the prompt)",
}
"""What :func:`parse_example` notes of a row it reads, said once for the data with a count."""


def note(notes: dict[str, list] | None, key: str, row: RawRow) -> None:
    """Count ``key`` for ``row`` in ``notes`` (``key → [count, first row's where]``), or,
    without ``notes`` (a row parsed alone), log it for this row."""
    if notes is None:
        log.warning("%s: %s", row.where, NOTES[key])
        return
    notes.setdefault(key, [0, row.where])[0] += 1


def warn_notes(notes: dict[str, list], total: int, columns: ColumnMap,
               present: Sequence[str]) -> None:
    """Log each note of ``notes`` once, with its count of ``total`` rows; an empty implicit
    prompt also names the columns of ``present`` no option reads (a prompt left unmapped)."""
    for key, (count, where) in notes.items():
        hint = ""
        if key == "empty_prompt":
            read = {*columns.by_key.values(), "tools", "chat_template_kwargs"}
            unread = [name for name in present if name not in read]
            if unread:
                hint = f"; columns not read: {', '.join(unread)} (prompt_column names the prompt)"
        log.warning("%d of %d rows: %s (first: %s)%s", count, total, NOTES[key], where, hint)


def _repeats(prompt: Messages, completion: Messages) -> bool:
    return len(completion) > len(prompt) and completion[:len(prompt)] == prompt


def parse_example(row: RawRow, columns: ColumnMap = ColumnMap(), *,
                  notes: dict[str, list] | None = None) -> PreferenceExample:
    """Validate one row and return it as a :class:`PreferenceExample` (raises ``DpokitError``).
    What is worth saying of a row that is read (:data:`NOTES`) is counted in ``notes``, for the
    caller to say once for all rows (:func:`warn_notes`); without it, logged for this row."""
    fields = row.fields
    for name in (columns.chosen, columns.rejected):
        if name not in fields or fields[name] is None:
            raise fail(row, name, f"missing (columns present: {', '.join(sorted(fields))})")
    chosen, rejected = fields[columns.chosen], fields[columns.rejected]
    prompt = fields.get(columns.prompt)
    conversational = is_messages(chosen) or is_messages(rejected)

    if conversational:
        chosen = as_messages(row, columns.chosen, chosen, single_ok=True)
        rejected = as_messages(row, columns.rejected, rejected, single_ok=True)
        if prompt is None or (isinstance(prompt, str) and not is_messages(prompt)):
            if prompt is not None:
                if not chosen or not rejected or chosen[0] != rejected[0]:
                    raise fail(row, columns.prompt, "a text prompt beside conversational "
                                                    "chosen/rejected that share no leading "
                                                    "messages: give the prompt as a list of "
                                                    "messages, or the completions as text")
                note(notes, "text_prompt", row)
            prompt, chosen, rejected = _split_implicit(row, columns, chosen, rejected)
            last = prompt[-1]["role"]
            if last in _UNANSWERED_ROLES:  # the completions would start with a user's turn
                raise fail(row, columns.prompt, f"missing, and chosen/rejected share only "
                                                f"messages up to a {last!r} one: the "
                                                f"completions would hold the next user turn, "
                                                f"trained on as the model's own words; give "
                                                f"the prompt, or share the user's message")
        else:
            # (a prompt given explicitly may end with a system message: TRL's DPOTrainer
            # renders it with the generation prompt, and so does dpokit)
            prompt = as_messages(row, columns.prompt, prompt, single_ok=False)
            if _repeats(prompt, chosen) and _repeats(prompt, rejected):
                # whole conversations beside their prompt (UltraFeedback-style exports): the
                # model would be trained to say the user's turn again
                chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
                note(notes, "repeated_prompt", row)
    else:
        for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if not isinstance(value, str):
                raise fail(row, name, f"expected a string or a list of messages, "
                                       f"got {type(value).__name__}")
            check_text(row, name, value)
        if prompt is None:
            prompt, chosen, rejected = _split_implicit(row, columns, chosen, rejected)
            if not prompt:
                note(notes, "empty_prompt", row)
        elif not isinstance(prompt, str):
            raise fail(row, columns.prompt, f"expected a string (the completions are text), "
                                             f"got {type(prompt).__name__}")
        check_text(row, columns.prompt, prompt)

    for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not value or (isinstance(value, str) and not value.strip()) or (
                isinstance(value, list) and not any(m["content"].strip() for m in value)):
            raise fail(row, name, "empty completion")
    label_prob = get_number(row, columns.label_prob)
    if label_prob is not None and not 0.0 <= label_prob <= 1.0:
        raise fail(row, columns.label_prob, f"expected a probability in [0, 1], got {label_prob}")
    weight = get_number(row, columns.weight)
    if weight is not None and weight < 0:
        raise fail(row, columns.weight, f"expected a weight ≥ 0, got {weight}")
    return PreferenceExample(prompt, chosen, rejected, weight=weight,
                             margin=get_number(row, columns.margin), source=row.source, row=row.row,
                             template_kwargs=_template_kwargs(row) if conversational else None,
                             label_prob=label_prob)


def _template_kwargs(row: RawRow) -> dict[str, Any] | None:
    """``tools`` (a list or its JSON text) and ``chat_template_kwargs`` of a row, as TRL reads
    them, for the chat template; no tools (``[]``) is none, as TRL passes it (``tools or
    None``: a Llama template renders its tool preamble for ``tools=[]``)."""
    kwargs: dict[str, Any] = {}
    tools = row.fields.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise fail(row, "tools", "not valid JSON") from None
        except (ValueError, RecursionError):  # a 5,000-digit integer, nesting too deep
            raise fail(row, "tools", "JSON that cannot be read (too deep, or an integer "
                                     "too long)") from None
    if tools is not None and not isinstance(tools, list):
        raise fail(row, "tools", f"expected a list of tool schemas, got {type(tools).__name__}")
    if tools:
        kwargs["tools"] = tools
    extra = row.fields.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise fail(row, "chat_template_kwargs", "expected an object")
        kwargs.update(extra)
    return kwargs or None


def _data_name(rows: Sequence[RawRow]) -> str:
    """The file the rows came from, or the folder holding their shards."""
    sources = list(dict.fromkeys(r.source for r in rows))
    if len(sources) == 1:
        return sources[0]
    return f"{os.path.commonpath(sources) or '.'} ({len(sources)} files)"


def check_columns(rows: Sequence[RawRow], required: Mapping[str, str]) -> None:
    """Every ``config key → column`` of ``required`` is a column of some row, or a
    ``DpokitError`` naming the column, its key and the columns present."""
    present = dict.fromkeys(name for row in rows for name in row.fields)
    for key, name in required.items():
        if name not in present:
            raise DpokitError(f"{_data_name(rows)}: no column {name!r} ({key}); columns: "
                              f"{', '.join(sorted(present)) or '(none)'}")


def check_filled(rows: Sequence[RawRow], optional: Mapping[str, str]) -> None:
    """An optional column that some rows fill is filled in every row: a null (missing, or an
    empty CSV cell for a number) there would silently mean "no prompt" or "weight 1"."""
    for key, name in optional.items():
        numeric = key in _NUMERIC
        filled = next((r for r in rows if not _is_null(r.fields.get(name), numeric)), None)
        if filled is None:
            continue
        empty = next((r for r in rows if _is_null(r.fields.get(name), numeric)), None)
        if empty is not None:
            count = sum(_is_null(r.fields.get(name), numeric) for r in rows)
            raise fail(empty, name, f"null or missing, while other rows fill this column "
                                     f"(e.g. {filled.where}); {count} of {len(rows)} rows lack "
                                     f"it: give every row a value, or none")


def text_chars(value: Any) -> int:
    """Characters of the text in a field (every role and content, for a conversation)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    return 0


def check_row_chars(rows: Sequence[RawRow], names: Sequence[str], limit: int | None) -> None:
    """No row holds more than ``limit`` characters in the columns ``names`` (the text that is
    tokenised), or a ``DpokitError`` naming the row and its longest column; checked before
    tokenising, whose memory and time grow with the text, not with ``max_length``."""
    if limit is None:
        return
    for row in rows:
        lengths = {name: text_chars(row.fields.get(name)) for name in names}
        total = sum(lengths.values())
        if total > limit:
            longest = max(lengths, key=lengths.__getitem__)
            raise fail(row, longest, f"{lengths[longest]:,} characters ({total:,} in the row), "
                                      f"over max_row_chars={limit:,}; shorten the row, or raise "
                                      f"max_row_chars (null: no limit)")


def parse_examples(rows: Sequence[RawRow], columns: ColumnMap = ColumnMap(), *,
                   max_row_chars: int | None = None) -> list[PreferenceExample]:
    """Validate every row (and the columns across rows, see the module docstring); warn once
    with the count of rows whose chosen equals rejected. Rows of k scored completions become
    the pairs ``columns.pairs_from_scores`` chooses (:mod:`dpokit.data.groups`)."""
    from dpokit.data.groups import data_shape, grouped_examples

    shape = data_shape(rows, columns)
    if shape != "pairs":
        check_renamed(rows, columns, shape)
        return _checked(grouped_examples(rows, columns, shape, max_row_chars=max_row_chars))
    check_row_chars(rows, [columns.prompt, columns.chosen, columns.rejected, "tools"],
                    max_row_chars)
    check_columns(rows, columns.required)
    check_filled(rows, columns.optional)
    if rows and all(r.fields.get(columns.prompt) is None for r in rows):
        log.info("%s: no %r column (prompt_column): implicit-prompt rows, the prompt is the "
                 "leading text or messages chosen and rejected share", _data_name(rows),
                 columns.prompt)
    notes: dict[str, list] = {}
    examples = parse_rows(rows, columns, notes)
    warn_notes(notes, len(rows), columns,
               list(dict.fromkeys(name for row in rows for name in row.fields)))
    if rows and not examples:
        raise DpokitError(f"{_data_name(rows)}: no rows left: all {len(rows)} are implicit-"
                          f"prompt rows with identical (or prefix) chosen/rejected")
    return _checked(examples)


def check_renamed(rows: Sequence[RawRow], columns: ColumnMap, shape: str) -> None:
    """Every column renamed from its default is a column of data of k scored completions
    (``shape`` ``list`` or ``rows``), as of pair rows: a ``weight_column`` or ``score_column``
    naming no column must not read as "weight 1" or "the default score" without a word."""
    if shape == "list":
        from dpokit.data.groups import SCORE_KEYS, TEXT_KEYS

        present = {name for row in rows for name in row.fields}
        for key, what, keys in (("score_column", "score", SCORE_KEYS),
                                ("completion_column", "completion", TEXT_KEYS)):
            name = columns.renamed.get(key)
            if name is not None and name not in present:
                raise DpokitError(
                    f"{_data_name(rows)}: no column {name!r} ({key}); {key} is for data of one "
                    f"row per completion — in a {columns.completions!r} list each object's "
                    f"{what} is read from the first of its keys {', '.join(keys)} present")
    check_columns(rows, columns.renamed)


def _checked(examples: list[PreferenceExample]) -> list[PreferenceExample]:
    """``examples``, one kind (chat or text) throughout, warning of identical completions."""
    formats = {e.conversational for e in examples}
    if len(formats) > 1:
        first = next(e for e in examples if e.conversational != examples[0].conversational)
        raise DpokitError(f"{first.where}: mixes conversational and plain-text rows in one "
                          f"dataset (row 1 is {'chat' if examples[0].conversational else 'text'})")
    identical = [e for e in examples if e.chosen == e.rejected]
    if identical:
        log.warning("%d of %d rows have identical chosen and rejected completions (no preference "
                    "signal; first: %s)", len(identical), len(examples), identical[0].where)
    return examples
