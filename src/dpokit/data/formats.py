"""Validate rows and bring the preference formats users have to one shape.

Accepted per row (column names mappable with :class:`ColumnMap`):

- standard: ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen``/``rejected``
  one assistant message (a dict) or a list of messages;
- implicit prompt: only ``chosen``/``rejected``, two full conversations (or texts) sharing a
  prefix, which is split off as the prompt;

plus optional numeric ``weight`` (scales the pair's loss), ``margin`` (the offset m of the
losses that read one, e.g. ``odpo``; ignored, with a warning, by the others) and ``label_prob``
(p = P(chosen ≻ rejected) ∈ [0, 1], the soft label of ``sigmoid_soft``) columns.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
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

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"


def _fail(row: RawRow, field: str, problem: str) -> DpokitError:
    return DpokitError(f"{row.where}, field {field!r}: {problem}")


def _check_text(row: RawRow, field: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(row, field, "undecodable text (invalid Unicode)") from None
    return text


def _messages(row: RawRow, field: str, value: Any, *, single_ok: bool) -> Messages:
    """A list of ``{role, content}`` dicts with known roles and string contents."""
    if single_ok and isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(row, field, "expected a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _fail(row, field, f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _fail(row, field, f"message {i} has unknown role {role!r} "
                                    f"(expected one of {', '.join(sorted(ROLES))})")
        if not isinstance(content, str):
            raise _fail(row, field, f"message {i} content must be a string, "
                                    f"got {type(content).__name__}")
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        messages.append({"role": role, "content": _check_text(row, field, content), **extra})
    return messages


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)) or (
        isinstance(value, dict) and "role" in value)


def _number(row: RawRow, field: str) -> float | None:
    value = row.fields.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _fail(row, field, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(row, field, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _fail(row, field, f"expected a finite number, got {value!r}")
    return number


def _split_implicit(row: RawRow, columns: ColumnMap, chosen: Any, rejected: Any):
    """Split the longest shared prefix of two conversations (or texts) off as the prompt."""
    if isinstance(chosen, list):
        shared = 0
        while (shared < min(len(chosen), len(rejected))
               and chosen[shared] == rejected[shared]):
            shared += 1
        if shared == 0:
            raise _fail(row, columns.prompt, "missing, and chosen/rejected share no leading "
                                             "messages to take it from")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared > 0 and chosen[shared - 1] == " ":  # one space starts the completion (as TRL)
            shared -= 1
    if shared >= min(len(chosen), len(rejected)):
        relation = "identical" if chosen == rejected else "one is a prefix of the other"
        raise _fail(row, columns.chosen, f"no prompt column, and chosen/rejected are {relation}: "
                                         f"splitting off their shared prefix as the prompt "
                                         f"leaves an empty completion")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_example(row: RawRow, columns: ColumnMap = ColumnMap()) -> PreferenceExample:
    """Validate one row and return it as a :class:`PreferenceExample` (raises ``DpokitError``)."""
    fields = row.fields
    for name in (columns.chosen, columns.rejected):
        if name not in fields or fields[name] is None:
            raise _fail(row, name, f"missing (columns present: {', '.join(sorted(fields))})")
    chosen, rejected = fields[columns.chosen], fields[columns.rejected]
    prompt = fields.get(columns.prompt)
    conversational = _is_messages(chosen) or _is_messages(rejected)

    if conversational:
        chosen = _messages(row, columns.chosen, chosen, single_ok=True)
        rejected = _messages(row, columns.rejected, rejected, single_ok=True)
        if prompt is None or (isinstance(prompt, str) and not _is_messages(prompt)):
            if prompt is not None:
                log.warning("%s: a text prompt beside conversational chosen/rejected is ignored; "
                            "the prompt is their shared leading messages", row.where)
            prompt, chosen, rejected = _split_implicit(row, columns, chosen, rejected)
        else:
            prompt = _messages(row, columns.prompt, prompt, single_ok=False)
    else:
        for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if not isinstance(value, str):
                raise _fail(row, name, f"expected a string or a list of messages, "
                                       f"got {type(value).__name__}")
            _check_text(row, name, value)
        if prompt is None:
            prompt, chosen, rejected = _split_implicit(row, columns, chosen, rejected)
        elif not isinstance(prompt, str):
            raise _fail(row, columns.prompt, f"expected a string (the completions are text), "
                                             f"got {type(prompt).__name__}")
        _check_text(row, columns.prompt, prompt)

    for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not value or (isinstance(value, str) and not value.strip()) or (
                isinstance(value, list) and not any(m["content"].strip() for m in value)):
            raise _fail(row, name, "empty completion")
    label_prob = _number(row, columns.label_prob)
    if label_prob is not None and not 0.0 <= label_prob <= 1.0:
        raise _fail(row, columns.label_prob, f"expected a probability in [0, 1], got {label_prob}")
    return PreferenceExample(prompt, chosen, rejected, weight=_number(row, columns.weight),
                             margin=_number(row, columns.margin), source=row.source, row=row.row,
                             template_kwargs=_template_kwargs(row) if conversational else None,
                             label_prob=label_prob)


def _template_kwargs(row: RawRow) -> dict[str, Any] | None:
    """``tools`` (a list or its JSON text) and ``chat_template_kwargs`` of a row, as TRL reads
    them, for the chat template."""
    kwargs: dict[str, Any] = {}
    tools = row.fields.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise _fail(row, "tools", "not valid JSON") from None
    if tools is not None:
        kwargs["tools"] = tools
    extra = row.fields.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise _fail(row, "chat_template_kwargs", "expected an object")
        kwargs.update(extra)
    return kwargs or None


def parse_examples(rows: Sequence[RawRow],
                   columns: ColumnMap = ColumnMap()) -> list[PreferenceExample]:
    """Validate every row; warn once with the count of rows whose chosen equals rejected."""
    examples = [parse_example(row, columns) for row in rows]
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
