"""One call from a user's data path to token pairs: read, validate, tokenise, truncate — chunk by
chunk (:mod:`dpokit.data.prepare`), into an item store (:mod:`dpokit.data.store`).

The checks :func:`~dpokit.data.formats.parse_examples` runs over every row (a renamed column
absent, an optional column null in some rows and filled in others, mixed formats, identical
completions) run here on numbers gathered chunk by chunk, so their verdicts and messages are the
ones the whole data read at once gets; each row goes through
:func:`~dpokit.data.formats.parse_example` and each chunk through
:func:`~dpokit.data.tokenize.tokenize_examples`. Data of k scored completions per prompt
(:mod:`dpokit.data.groups`), whose groups may span the whole file, is parsed whole by
``parse_examples`` and tokenised into the same store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dpokit.data.formats import (
    _NUMERIC,
    ColumnMap,
    PreferenceExample,
    _data_name,
    _is_null,
    check_columns,
    check_filled,
    check_row_chars,
    parse_examples,
    parse_rows,
    warn_notes,
)
from dpokit.data.groups import data_shape
from dpokit.data.io import RawRow
from dpokit.data.prepare import ChunkResult, Recipe, Summary, load_items, take
from dpokit.data.tokenize import TokenizedPair, TokenizeSettings, tokenize_examples
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.data")

# The order of the checks over the whole data (parse_examples, then tokenize_examples).
SHAPE, ROW_CHARS, COLUMNS, FILLED, PARSE, MIXED, TOKENIZE = 1, 2, 3, 4, 5, 6, 7

_DROPPED = "dropped %d of %d rows whose completion is empty"
_MERGED = "%d of %d rows had their prompt shortened"
_MERGE_EXAMPLE = "%s: the tokenized prompt is not a prefix of prompt+completion"
_TOKENISING = "tokenising %d rows"
_NO_ROWS_LEFT = "no rows left after truncation"


def load_preference_pairs(path: str | Path, tokenizer: Any, *,
                          settings: TokenizeSettings = TokenizeSettings(),
                          columns: ColumnMap = ColumnMap(), split: str | None = None,
                          progress: bool | None = None,
                          cache_dir: Path | None = None,
                          dataset_num_proc: int | None = None,
                          chunk_rows: int | None = None) -> Sequence[TokenizedPair]:
    """Rows of ``path`` (any format of :mod:`dpokit.data.io`) as tokenized preference pairs, an
    :class:`~dpokit.data.store.ItemStore` (a read-only sequence); rows over
    ``settings.max_row_chars`` are refused before tokenising. ``progress``: a bar on stderr
    (None: on a terminal, past 2 s). ``cache_dir``: the pairs are read from (or written to)
    the tokenised-data cache there (:mod:`dpokit.data.cache`), memory-mapped; without it they
    are memory-mapped from unnamed temporary files (:func:`~dpokit.data.cache.scratch_items`).
    ``dataset_num_proc``: tokenise in that many worker processes (the same pairs).
    ``chunk_rows``: rows per chunk (:data:`dpokit.data.prepare.CHUNK_ROWS`)."""
    return load_items(path, split, tokenizer, PairRecipe(columns, settings), settings=settings,
                      key_columns=columns, cache_dir=cache_dir, progress=progress,
                      num_proc=dataset_num_proc, chunk_rows=chunk_rows)


def _scan(rows: list[RawRow], columns: ColumnMap) -> dict[str, Any]:
    """What the checks over all rows need of one chunk: its sources and columns, and per
    optional column its first filled row, first empty row and count of empty ones."""
    filled = {}
    for key, name in columns.optional.items():
        numeric = key in _NUMERIC
        empty = [_is_null(r.fields.get(name), numeric) for r in rows]
        first_filled = next((r for r, e in zip(rows, empty, strict=True) if not e), None)
        first_empty = next((r for r, e in zip(rows, empty, strict=True) if e), None)
        filled[key] = (first_filled, first_empty, sum(empty))
    return {"sources": list(dict.fromkeys(r.source for r in rows)),
            "columns": list(dict.fromkeys(n for r in rows for n in r.fields)),
            "filled": filled,
            "no_prompt": all(r.fields.get(columns.prompt) is None for r in rows)}


@dataclass(frozen=True)
class PairRecipe(Recipe):
    """A chunk of preference rows → :class:`TokenizedPair` arrays."""

    columns: ColumnMap
    settings: TokenizeSettings
    item_cls: ClassVar[type] = TokenizedPair
    global_stage: ClassVar[int] = COLUMNS

    def streams(self, first: RawRow) -> bool:
        """Rows of pairs are prepared chunk by chunk; k scored completions per prompt
        (:mod:`dpokit.data.groups`) are grouped over the whole data, so read whole."""
        return data_shape([first], self.columns) == "pairs"

    def process(self, rows: list[RawRow], tokenizer: Any, stop: int,
                records: list[tuple[int, str, tuple]], first: RawRow) -> ChunkResult:
        c, result = self.columns, ChunkResult(len(rows), stats={"scan": _scan(rows, self.columns)})
        if not self.streams(first):  # every row at once: parse_examples' own checks
            try:
                examples = parse_examples(rows, c, max_row_chars=self.settings.max_row_chars)
            except DpokitError as error:
                return result.failed(SHAPE, error)
            result.stats.update(whole=True, kind=examples[0].conversational, mixed=None,
                                first_where=examples[0].where, examples=len(examples),
                                identical=(0, []))
            return self._tokenize(examples, tokenizer, records, result)
        try:
            data_shape([first, *rows], c)  # every row of the shape of the data's first
        except DpokitError as error:
            return result.failed(SHAPE, error)
        try:
            check_row_chars(rows, [c.prompt, c.chosen, c.rejected, "tools"],
                            self.settings.max_row_chars)
        except DpokitError as error:
            return result.failed(ROW_CHARS, error)
        if stop <= PARSE:
            return result
        notes: dict[str, list] = {}  # said once over all chunks (PairSummary.finish)
        try:
            examples = parse_rows(rows, c, notes)
        except DpokitError as error:
            return result.failed(PARSE, error)
        result.stats.update(notes=notes)
        if not examples:  # every row of this chunk dropped (counted in notes)
            return result if stop <= TOKENIZE else result.holding([], TokenizedPair)
        kind = examples[0].conversational
        mixed = next((e.where for e in examples if e.conversational != kind), None)
        identical = [e.where for e in examples if e.chosen == e.rejected]
        result.stats.update(kind=kind, mixed=mixed, first_where=examples[0].where,
                            examples=len(examples), identical=(len(identical), identical[:1]))
        if stop <= TOKENIZE or mixed is not None:
            return result
        return self._tokenize(examples, tokenizer, records, result)

    def _tokenize(self, examples: list[PreferenceExample], tokenizer: Any,
                  records: list[tuple[int, str, tuple]], result: ChunkResult) -> ChunkResult:
        try:
            pairs = tokenize_examples(examples, tokenizer, self.settings, progress=False)
        except DpokitError as error:
            if not str(error).startswith(_NO_ROWS_LEFT):
                return result.failed(TOKENIZE, error)
            pairs = []  # every row of this chunk dropped: counted, judged over all chunks
        take(records, _TOKENISING)
        dropped = take(records, _DROPPED)
        merged = take(records, _MERGED)
        example = take(records, _MERGE_EXAMPLE)
        result.stats.update(
            dropped=(dropped[0][2][0], dropped[0]) if dropped else (0, None),
            merged=merged[0][2][0] if merged else len(example), merge_example=example[:1])
        return result.holding(pairs, TokenizedPair)

    def summary(self, path: str | Path) -> Summary:
        return PairSummary(self, str(path))


class PairSummary(Summary):
    """The checks of :func:`parse_examples` and the counts of :func:`tokenize_examples` over
    every chunk."""

    def __init__(self, recipe: PairRecipe, path: str):
        super().__init__(recipe, path)
        self.examples = self.dropped = self.merged = 0
        self.filled: dict[str, list] = {key: [None, None, 0]
                                        for key in recipe.columns.optional}
        self.no_prompt = True
        self.kind: bool | None = None
        self.identical: list = [0, []]
        self.notes: dict[str, list] = {}
        self.dropped_record: tuple | None = None
        self.merge_example: list = []
        self.whole = False

    def add(self, result: ChunkResult) -> list[tuple[int, DpokitError]]:
        stats, errors = result.stats, []
        scan = stats["scan"]
        self.count(result, scan)
        self.whole = self.whole or stats.get("whole", False)
        self.no_prompt = self.no_prompt and scan["no_prompt"]
        for key, (filled, empty, count) in scan["filled"].items():
            seen = self.filled[key]
            seen[0], seen[1] = seen[0] or filled, seen[1] or empty
            seen[2] += count
            if seen[0] is not None and seen[1] is not None:
                self.doomed = FILLED  # check_filled will refuse it: stop tokenising
        if "kind" in stats:
            if self.kind is None:
                self.kind = stats["kind"]
            where = stats["mixed"] if stats["kind"] == self.kind else stats["first_where"]
            if where is not None:
                errors.append((MIXED, DpokitError(
                    f"{where}: mixes conversational and plain-text rows in one dataset (row 1 "
                    f"is {'chat' if self.kind else 'text'})")))
            self.examples += stats["examples"]
            self.identical[0] += stats["identical"][0]
            self.identical[1] = self.identical[1] or stats["identical"][1]
        for key, (count, where) in stats.get("notes", {}).items():
            self.notes.setdefault(key, [0, where])[0] += count
        if "dropped" in stats:
            self.dropped += stats["dropped"][0]
            self.dropped_record = self.dropped_record or stats["dropped"][1]
            self.merged += stats["merged"]
            self.merge_example = self.merge_example or stats["merge_example"]
        return errors

    def check(self) -> None:
        if self.whole:
            return  # parse_examples checked the rows
        columns = self.recipe.columns
        check_columns(self.stand_ins(), columns.required)
        for key, (filled, empty, count) in self.filled.items():
            if filled is not None and empty is not None:  # rows standing for all of them
                check_filled([filled, empty, *[empty] * (count - 1),
                              *[filled] * (self.rows - count - 1)], {key: columns.optional[key]})
        if self.no_prompt:
            log.info("%s: no %r column (prompt_column): implicit-prompt rows, the prompt is the "
                     "leading text or messages chosen and rejected share",
                     _data_name(self.stand_ins()), columns.prompt)

    def finish(self, count: int) -> None:
        settings = self.recipe.settings
        warn_notes(self.notes, self.rows, self.recipe.columns, list(self.columns))
        if not self.examples and self.notes.get("unsplittable"):
            raise DpokitError(f"{self.path}: no rows left: all {self.rows} are implicit-prompt "
                              f"rows with identical (or prefix) chosen/rejected")
        if self.identical[0]:
            log.warning("%d of %d rows have identical chosen and rejected completions (no "
                        "preference signal; first: %s)", self.identical[0], self.examples,
                        self.identical[1][0])
        chat = self.kind and settings.text_mode != "plain"
        log.info("tokenising %d rows (%s)", self.examples, "chat template" if chat else "text")
        for level, message, args in self.merge_example:
            log.log(level, message, *args)
        if self.merged > 1:
            log.warning("%d of %d rows had their prompt shortened at the boundary", self.merged,
                        self.examples)
        if self.dropped:
            level, message, args = self.dropped_record
            log.log(level, message, self.dropped, self.examples, *args[2:])
        if not count:
            raise DpokitError(f"no rows left after truncation (all {self.examples} had an empty "
                              f"completion); raise max_length or lower max_prompt_length")
        log.info("%s: %d rows, %d pairs after tokenisation", self.path, self.rows, count)

