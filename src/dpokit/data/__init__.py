"""Preference data: user files → validated examples → token pairs → padded or packed batches.

    rows = load_rows("prefs.jsonl")                         # io.py: JSONL/JSON/CSV/Parquet/HF dir
    examples = parse_examples(rows, ColumnMap())            # formats.py: standard/chat/implicit
    pairs = tokenize_examples(examples, tokenizer, TokenizeSettings(max_length=512))
    batch = collate_padded([pairs[i] for i in idx], pad_token_id=tokenizer.pad_token_id)
    # or collate_packed(...) for the padding-free layout

Every user error (missing field, wrong type, empty completion, unknown role, undecodable text, a
renamed column absent, a column named twice, a null among filled values, several splits and no
``split``, a row over ``max_row_chars``) is a :class:`~dpokit.errors.DpokitError` naming the
file, the row and the field.
"""

from typing import TYPE_CHECKING

from dpokit._lazy import lazy_exports

if TYPE_CHECKING:  # the names, for readers and linters; imported on first use
    from dpokit.data.batching import epoch_batches, micro_batches, rows_used, shard_for_rank
    from dpokit.data.collate import (
        PairBatch,
        collate_packed,
        collate_padded,
        collate_pairs,
        collate_shared,
        pack_sequences,
        pad_sequences,
    )
    from dpokit.data.formats import ColumnMap, PreferenceExample, parse_example, parse_examples
    from dpokit.data.io import RawRow, load_rows
    from dpokit.data.pipeline import load_preference_pairs
    from dpokit.data.tokenize import TokenizedPair, TokenizeSettings, tokenize_examples

_EXPORTS = {
    "epoch_batches": "batching",
    "micro_batches": "batching",
    "rows_used": "batching",
    "shard_for_rank": "batching",
    "PairBatch": "collate",
    "collate_packed": "collate",
    "collate_padded": "collate",
    "collate_pairs": "collate",
    "collate_shared": "collate",
    "pack_sequences": "collate",
    "pad_sequences": "collate",
    "ColumnMap": "formats",
    "PreferenceExample": "formats",
    "parse_example": "formats",
    "parse_examples": "formats",
    "RawRow": "io",
    "load_rows": "io",
    "load_preference_pairs": "pipeline",
    "TokenizedPair": "tokenize",
    "TokenizeSettings": "tokenize",
    "tokenize_examples": "tokenize",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ColumnMap",
    "PairBatch",
    "PreferenceExample",
    "RawRow",
    "TokenizeSettings",
    "TokenizedPair",
    "collate_packed",
    "collate_padded",
    "collate_pairs",
    "collate_shared",
    "epoch_batches",
    "load_preference_pairs",
    "load_rows",
    "micro_batches",
    "pack_sequences",
    "pad_sequences",
    "parse_example",
    "parse_examples",
    "rows_used",
    "shard_for_rank",
    "tokenize_examples",
]
