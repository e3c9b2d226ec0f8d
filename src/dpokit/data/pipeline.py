"""One call from a user's data path to token pairs: read, validate, tokenise, truncate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dpokit.data.formats import ColumnMap, parse_examples
from dpokit.data.io import load_rows
from dpokit.data.tokenize import TokenizedPair, TokenizeSettings, tokenize_examples

log = logging.getLogger("dpokit.data")


def load_preference_pairs(path: str | Path, tokenizer: Any, *,
                          settings: TokenizeSettings = TokenizeSettings(),
                          columns: ColumnMap = ColumnMap(), split: str | None = None,
                          progress: bool | None = None,
                          cache_dir: Path | None = None) -> list[TokenizedPair]:
    """Rows of ``path`` (any format of :mod:`dpokit.data.io`) as tokenized preference pairs;
    rows over ``settings.max_row_chars`` are refused before tokenising. ``progress``: see
    :func:`dpokit.data.tokenize.tokenize_examples`. ``cache_dir``: read the pairs from (or
    store them in) the tokenised-data cache there (:mod:`dpokit.data.cache`)."""
    if cache_dir is not None:
        from dpokit.data.cache import cached_items

        return cached_items(cache_dir, path, split, tokenizer, settings, columns, TokenizedPair,
                            lambda: load_preference_pairs(path, tokenizer, settings=settings,
                                                          columns=columns, split=split,
                                                          progress=progress))
    rows = load_rows(path, split=split)
    examples = parse_examples(rows, columns, max_row_chars=settings.max_row_chars)
    pairs = tokenize_examples(examples, tokenizer, settings, progress=progress)
    log.info("%s: %d rows, %d pairs after tokenisation", path, len(rows), len(pairs))
    return pairs
