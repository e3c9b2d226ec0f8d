"""Prompts alone, for generation: ``dpokit generate`` and (next) on-policy DPO.

Any file :mod:`dpokit.data.io` reads; each row's ``prompt`` column (name mappable) is a string or
a list of ``{role, content}`` messages; every other column is ignored. Conversational prompts go
through the chat template with the generation prompt appended (``text_mode`` ``plain`` renders
them as ``role: content`` lines instead); ``max_prompt_length`` keeps the end of a long prompt
(the start with ``prompt_truncation='right'``, as for a pair's prompt).
Errors name the file, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.data.formats import (
    Messages,
    as_messages,
    check_columns,
    check_row_chars,
    check_text,
    is_messages,
)
from dpokit.data.io import RawRow, load_rows
from dpokit.data.tokenize import (
    TokenizeSettings,
    _ids,
    _truncate,
    encode_chat,
    render_plain,
)
from dpokit.errors import DpokitError


@dataclass(frozen=True)
class Prompt:
    """One prompt: as given, and its token ids (what generation continues)."""

    prompt: str | Messages
    prompt_ids: list[int]
    source: str = ""
    row: int = 0
    columns: dict[str, Any] = field(default_factory=dict)
    """The row's other columns (``answer``, …): reward functions get them as keywords, as
    TRL passes a data set's other columns."""

    @property
    def where(self) -> str:
        """``file, row N`` — the prefix of every error about this prompt's row."""
        return f"{self.source}, row {self.row}"


def _prompt(row: RawRow, column: str) -> str | Messages:
    value = row.fields.get(column)
    if value is None:
        raise DpokitError(f"{row.where}, field {column!r}: missing (generation needs a prompt)")
    if is_messages(value):
        return as_messages(row, column, value, single_ok=False)
    if not isinstance(value, str) or not value.strip():
        raise DpokitError(f"{row.where}, field {column!r}: expected a non-empty string or a "
                          f"list of messages, got {_shown(value)}")
    return check_text(row, column, value)  # a lone surrogate: the tokenizer's TypeError


def _shown(value: Any) -> str:
    """``value`` for an error line: its repr, cut short (a 1 MB cell must not fill the line)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({type(value).__name__})"


def tokenize_prompt(prompt: str | Messages, tokenizer: Any, settings: TokenizeSettings, *,
                    where: str = "prompt") -> list[int]:
    """Token ids of one prompt (chat template with the generation prompt for messages)."""
    if isinstance(prompt, list) and settings.text_mode != "plain":
        if not getattr(tokenizer, "chat_template", None):
            raise DpokitError(f"{where}: conversational prompts need a tokenizer with a chat "
                              f"template; set text_mode='plain' to render 'role: content' lines")
        (ids,) = encode_chat(tokenizer, [(prompt, True)], where=where)
    else:
        if settings.text_mode == "chat":
            raise DpokitError(f"{where}: text_mode='chat' needs conversational prompts")
        text = render_plain(prompt) if isinstance(prompt, list) else prompt
        ids = _ids(tokenizer(text))
    limit = settings.max_prompt_length  # cut as a pair's prompt is (prompt_truncation)
    return ids if limit is None else _truncate(ids, limit, settings.prompt_truncation)


def load_prompts(path: str | Path, tokenizer: Any, *,
                 settings: TokenizeSettings = TokenizeSettings(), prompt_column: str = "prompt",
                 split: str | None = None) -> list[Prompt]:
    """The prompts of ``path``, tokenised (see the module docstring)."""
    rows = load_rows(path, split=split)
    if not rows:
        raise DpokitError(f"{path}: no rows")
    # A renamed column must exist; a missing default one is named row by row below.
    if prompt_column != "prompt":
        check_columns(rows, {"prompt_column": prompt_column})
    check_row_chars(rows, [prompt_column], settings.max_row_chars)
    prompts = []
    for row in rows:
        prompt = _prompt(row, prompt_column)
        ids = tokenize_prompt(prompt, tokenizer, settings, where=row.where)
        prompts.append(Prompt(prompt, ids, row.source, row.row,
                              {k: v for k, v in row.fields.items() if k != prompt_column}))
    return prompts
