"""k scored completions per prompt → the preference pairs the user chooses.

Data sets such as UltraFeedback hold, per prompt, k completions with a score each. Two shapes:

- one row per prompt: ``prompt``, ``completions`` (a list of texts or conversations — or of
  objects carrying one under ``completion``/``response``/``text``/``content`` and its score
  under ``score``/``rating``/``overall_score``) and ``scores`` (a list of numbers, one per
  completion, unless the objects carry them);
- one row per completion: ``prompt``, ``completion``, ``score``; rows whose prompts are equal
  form one prompt's group (in order of their first row).

``pairs_from_scores`` says which pairs are trained on (chosen = higher score; equal scores make
no pair): ``best_vs_worst`` (one pair per prompt: the first best against the last worst),
``best_vs_each`` (the first best against every lower-scored completion) or ``all`` (every pair
of different scores, k(k−1)/2 without ties). A prompt whose completions all score the same gives
no pair and is dropped (counted in one warning).

Each pair becomes a :class:`~dpokit.data.formats.PreferenceExample` validated as a pair row is,
with ``group`` = its prompt's ordinal among the data's prompts (unique across the shards of a
directory, whose row numbers each start at 1) and the row's ``tools`` and
``chat_template_kwargs`` for the chat template, as a pair row keeps them. The pairs of one
prompt are batched together and each distinct completion's log-probs are computed once, the
prompt once for all of them (:func:`dpokit.data.collate.collate_shared`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from dpokit.data.formats import (
    ColumnMap,
    PreferenceExample,
    _is_null,
    as_messages,
    check_columns,
    check_filled,
    check_text,
    fail,
    get_number,
    is_messages,
    parse_example,
    text_chars,
)
from dpokit.data.io import RawRow
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.data")

PAIR_SELECTIONS = ("best_vs_worst", "best_vs_each", "all")
"""The values of ``pairs_from_scores``."""
TEXT_KEYS = ("completion", "response", "text", "content")
"""Keys under which an object in a ``completions`` list may hold its completion."""
SCORE_KEYS = ("score", "rating", "overall_score")
"""Keys under which such an object may hold the completion's score."""


def score_pairs(scores: Sequence[float], selection: str) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` indices of the completions with ``scores``, as ``selection``
    (:data:`PAIR_SELECTIONS`) says; a pair's chosen always scores strictly higher.

    >>> score_pairs([1.0, 3.0, 2.0, 3.0], "best_vs_worst")
    [(1, 0)]
    >>> score_pairs([1.0, 3.0, 2.0, 3.0], "best_vs_each")
    [(1, 0), (1, 2)]
    >>> score_pairs([1.0, 3.0, 2.0], "all")
    [(1, 0), (1, 2), (2, 0)]
    """
    if selection not in PAIR_SELECTIONS:
        raise DpokitError(f"pairs_from_scores must be one of {', '.join(PAIR_SELECTIONS)}, "
                          f"got {selection!r}")
    k = len(scores)
    bad = next((i for i in range(k) if not math.isfinite(scores[i])), None)
    if bad is not None:  # NaN compares false both ways: max/min would pick it as best AND worst
        raise ValueError(f"score_pairs: score {bad} is {scores[bad]!r}, not a finite number")
    if k < 2 or max(scores) == min(scores):
        return []
    best = max(range(k), key=lambda i: (scores[i], -i))  # the first of the best
    if selection == "best_vs_worst":
        worst = min(range(k), key=lambda i: (scores[i], -i))  # the last of the worst
        return [(best, worst)]
    if selection == "best_vs_each":
        return [(best, j) for j in range(k) if scores[j] < scores[best]]
    # chosen by score, highest (then first) first; each one's rejected in the completions' order
    order = sorted(range(k), key=lambda i: (-scores[i], i))
    return [(i, j) for i in order for j in range(k) if scores[i] > scores[j]]


def data_shape(rows: Sequence[RawRow], columns: ColumnMap) -> str:
    """``pairs``, ``list`` (k completions in one row) or ``rows`` (one row per completion) — the
    same for every row, or a ``DpokitError`` naming the first row of another shape."""
    def shape(row: RawRow) -> str:
        fields = row.fields
        if fields.get(columns.completions) is not None:
            return "list"
        if (columns.chosen not in fields and fields.get(columns.completion) is not None
                and columns.score in fields):
            return "rows"
        return "pairs"

    if not rows:
        return "pairs"
    first = shape(rows[0])
    other = next((r for r in rows if shape(r) != first), None)
    if other is not None:
        names = {"pairs": f"{columns.chosen}/{columns.rejected}",
                 "list": f"a {columns.completions!r} list",
                 "rows": f"{columns.completion}/{columns.score}"}
        # the data's first row, by its file too when it is another shard's
        head = (f"row {rows[0].row}" if rows[0].source == other.source else rows[0].where)
        raise DpokitError(f"{other.where}: has {names[shape(other)]} while {head} has "
                          f"{names[first]}; one data set holds one shape")
    return first


def _completion(row: RawRow, field: str, value: Any, conversational: bool) -> Any:
    """One completion of a group: a non-empty text, or a conversation (one assistant message
    or a list of messages), as the prompt's kind demands."""
    if is_messages(value):
        if not conversational:
            raise fail(row, field, "a conversation beside a text prompt; give the prompt as "
                                    "messages too, or the completions as text")
        messages = as_messages(row, field, value, single_ok=True)
        if not any(m["content"].strip() for m in messages):
            raise fail(row, field, "empty completion")
        return messages
    if not isinstance(value, str):
        raise fail(row, field, f"expected a string or a list of messages, got "
                                f"{type(value).__name__}")
    if conversational:
        raise fail(row, field, "a text completion beside a conversational prompt")
    if not value.strip():
        raise fail(row, field, "empty completion")
    return check_text(row, field, value)


def _score(row: RawRow, field: str, value: Any) -> float:
    number = get_number(RawRow(row.source, row.row, {field: value}), field)
    if number is None:
        raise fail(row, field, "missing score")
    return number


def _listed(row: RawRow, columns: ColumnMap, conversational: bool
            ) -> tuple[list[Any], list[float]]:
    """The completions and scores of a one-row-per-prompt row."""
    name = columns.completions
    items = row.fields[name]
    if isinstance(items, str):  # a CSV cell holding JSON
        try:
            items = json.loads(items)
        except json.JSONDecodeError:
            raise fail(row, name, "not a list (nor JSON of one)") from None
    if not isinstance(items, list):  # (fewer than 2: no pair; dropped and counted, as a prompt
        raise fail(row, name, "expected a list of completions")  # of one row per completion)
    completions, scores = [], []
    listed_scores = row.fields.get(columns.scores)
    if isinstance(listed_scores, str):
        try:
            listed_scores = json.loads(listed_scores)
        except json.JSONDecodeError:
            raise fail(row, columns.scores, "not a list of numbers (nor JSON of one)") from None
    for j, item in enumerate(items):
        where = f"{name}[{j}]"
        score = None
        if isinstance(item, dict) and "role" not in item:
            text_key = next((k for k in TEXT_KEYS if k in item), None)
            if text_key is None:
                raise fail(row, where, f"an object without a completion (one of "
                                        f"{', '.join(TEXT_KEYS)})")
            score_key = next((k for k in SCORE_KEYS if k in item), None)
            if score_key is not None:
                score = _score(row, f"{where}.{score_key}", item[score_key])
            item = item[text_key]
        completions.append(_completion(row, where, item, conversational))
        scores.append(score)
    if listed_scores is not None:
        if not isinstance(listed_scores, list) or len(listed_scores) != len(items):
            raise fail(row, columns.scores, f"expected a list of {len(items)} numbers, one per "
                                             f"completion")
        listed = [_score(row, f"{columns.scores}[{j}]", s) for j, s in enumerate(listed_scores)]
        for j, (own, given) in enumerate(zip(scores, listed, strict=True)):
            if own is not None and own != given:  # two scores for one completion
                raise fail(row, f"{name}[{j}]", f"its own score {own:g} differs from "
                                                 f"{columns.scores}[{j}] = {given:g}; give one")
        scores = listed
    elif any(s is None for s in scores):
        j = scores.index(None)
        raise fail(row, f"{name}[{j}]", f"no score: give a {columns.scores!r} list or a "
                                         f"score ({', '.join(SCORE_KEYS)}) in each object")
    return completions, scores


def _prompt(row: RawRow, columns: ColumnMap) -> Any:
    """The group's prompt: a non-empty text or a conversation."""
    prompt = row.fields.get(columns.prompt)
    if prompt is None:
        raise fail(row, columns.prompt, "missing: k completions per prompt need the prompt")
    if is_messages(prompt):
        return as_messages(row, columns.prompt, prompt, single_ok=False)
    if not isinstance(prompt, str):
        raise fail(row, columns.prompt, f"expected a string or a list of messages, got "
                                         f"{type(prompt).__name__}")
    return check_text(row, columns.prompt, prompt)


def grouped_examples(rows: Sequence[RawRow], columns: ColumnMap, shape: str, *,
                     max_row_chars: int | None = None) -> list[PreferenceExample]:
    """The pairs of data of shape ``list`` or ``rows`` (:func:`data_shape`) chosen by
    ``columns.pairs_from_scores``, each validated as a pair row, grouped by prompt (module
    docstring); a prompt without a preference is dropped and counted."""
    selection = columns.pairs_from_scores
    score_pairs([], selection)  # the name is checked before any row
    check_filled(rows, {k: v for k, v in columns.optional.items()
                        if v in (columns.prompt, columns.weight, columns.margin,
                                 columns.label_prob)})
    if shape == "rows":
        per_pair = (columns.weight, columns.margin, columns.label_prob)
        carrying = [r for r in rows
                    if any(not _is_null(r.fields.get(n), numeric=True) for n in per_pair)]
        if carrying:  # (an empty CSV cell is no value, as check_filled reads it)
            extra = [n for n in per_pair if not _is_null(carrying[0].fields.get(n), numeric=True)]
            raise DpokitError(f"{carrying[0].where}: one row per completion cannot carry "
                              f"per-pair columns ({', '.join(extra)}); put the k completions of "
                              f"a prompt in one row ({columns.completions!r}) to weigh its pairs")
    elif columns.scores != ColumnMap.scores:  # a renamed column must exist (as check_columns)
        check_columns(rows, {"scores_column": columns.scores})
    groups: list[tuple[RawRow, Any, list[tuple[Any, float, RawRow]]]] = []
    if shape == "list":
        for row in rows:
            _check_chars(row, ["tools", columns.prompt, columns.completions], max_row_chars)
            prompt = _prompt(row, columns)
            completions, scores = _listed(row, columns, isinstance(prompt, list))
            groups.append((row, prompt, [(c, s, row) for c, s in zip(completions, scores,
                                                                     strict=True)]))
    else:
        index: dict[str, int] = {}
        for row in rows:
            _check_chars(row, ["tools", columns.prompt, columns.completion], max_row_chars)
            prompt = _prompt(row, columns)
            completion = _completion(row, columns.completion, row.fields[columns.completion],
                                     isinstance(prompt, list))
            score = _score(row, columns.score, row.fields[columns.score])
            # the prompt as the chat template renders it: tools and template kwargs too (rows
            # of one prompt text under other tools answer another input: another group)
            key = json.dumps([prompt, row.fields.get("tools"),
                              row.fields.get("chat_template_kwargs")], sort_keys=True,
                             default=repr)
            if key not in index:
                index[key] = len(groups)
                groups.append((row, prompt, []))
            groups[index[key]][2].append((completion, score, row))
    examples: list[PreferenceExample] = []
    dropped = 0
    for ordinal, (first, prompt, scored) in enumerate(groups):
        chosen_pairs = score_pairs([s for _, s, _ in scored], selection)
        if not chosen_pairs:
            dropped += 1
            continue
        for i, j in chosen_pairs:
            (chosen, _, chosen_row), (rejected, _, _) = scored[i], scored[j]
            fields = {columns.prompt: prompt, columns.chosen: chosen, columns.rejected: rejected}
            for name in (columns.weight, columns.margin, columns.label_prob, "tools",
                         "chat_template_kwargs"):
                if first.fields.get(name) is not None:
                    fields[name] = first.fields[name]
            where = chosen_row if shape == "rows" else first
            example = parse_example(RawRow(where.source, where.row, fields), columns)
            examples.append(replace(example, group=ordinal))
    if dropped:
        log.warning("%d of %d prompts have no two completions of different scores (or fewer "
                    "than two completions): no pair, dropped", dropped, len(groups))
    if groups and not examples:
        raise DpokitError(f"{rows[0].source}: no prompt has two completions of different "
                          f"scores, so there is no preference pair to train on")
    log.info("%s: %d prompts with %.1f completions each → %d pairs (%s)", rows[0].source if rows
             else "", len(groups), sum(len(s) for *_, s in groups) / max(len(groups), 1),
             len(examples), selection)
    return examples


def _check_chars(row: RawRow, names: Sequence[str], limit: int | None) -> None:
    if limit is None:
        return
    total = sum(text_chars(row.fields.get(name)) for name in names)
    if total > limit:
        raise fail(row, names[-1], f"{total:,} characters in the row, over max_row_chars="
                                    f"{limit:,}; shorten the row, or raise max_row_chars "
                                    f"(null: no limit)")
