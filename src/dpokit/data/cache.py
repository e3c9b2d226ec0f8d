"""Tokenised preference pairs cached on disk: a second run over the same data, with the same
tokenizer and tokenisation settings, reads its pairs back instead of reading, validating and
tokenising the rows again (issue 14).

The key (:func:`pairs_key`) is a digest of everything the pairs depend on: the data's *content*
(every file's bytes, so an edit in place is a new key whatever its size or time stamp), the
split, the tokenizer's files (``tokenizer.json``, its config and chat template, vocabularies), the
tokenisation settings (``max_row_chars`` included: a lower limit must refuse again), the column
names, dpokit's version and this file's format. A tokenizer that is not a local directory gets
no key, and its pairs are not cached. An entry is one ``.npz`` file of flat token arrays and
offsets (no pickles), written to a temporary file and renamed; an unreadable or inconsistent
entry is removed with a warning and rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dpokit.data.tokenize import TokenizedPair

log = logging.getLogger("dpokit.data")

FORMAT = 1
_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
_NUMBERS = ("weight", "margin", "label_prob")
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges",
                    "chat_template", "spiece", "sentencepiece")
_CHUNK = 1 << 20


def _file_digest(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)


def content_digest(path: Path) -> str:
    """A digest of a file's bytes, or of every file under a directory (names and bytes; hidden
    files and ``.lock`` files left out)."""
    digest = hashlib.blake2b(digest_size=20)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)
        and p.suffix != ".lock")
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0".encode())
        _file_digest(file, digest)
        digest.update(b"\0")
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A digest of the files that define ``tokenizer`` in its directory, or None when it was not
    loaded from a local directory (then nothing is cached)."""
    directory = Path(str(getattr(tokenizer, "name_or_path", "")))
    if not str(directory) or not directory.is_dir():
        return None
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.name.startswith(_TOKENIZER_FILES))
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=20)
    for file in files:
        digest.update(f"{file.name}\0".encode())
        _file_digest(file, digest)
    return digest.hexdigest()


def pairs_key(data: Path, split: str | None, tokenizer: Any, settings: Any,
              columns: Any) -> str | None:
    """The cache key of the pairs of ``data`` (module docstring), or None when the tokenizer has
    no files to key on."""
    from dpokit import __version__

    tokenizer_id = tokenizer_digest(tokenizer)
    if tokenizer_id is None:
        return None
    parts = {"format": FORMAT, "dpokit": __version__, "data": content_digest(data),
             "split": split, "tokenizer": tokenizer_id, "settings": settings.to_dict(),
             "columns": asdict(columns)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def save_pairs(file: Path, key: str, pairs: Sequence[TokenizedPair]) -> None:
    """Write ``pairs`` to ``file`` atomically."""
    from dpokit.atomic import atomic_path

    arrays: dict[str, np.ndarray] = {"key": np.array(key)}
    for name in _FIELDS:
        ids = [getattr(p, name) for p in pairs]
        arrays[f"{name}_offsets"] = np.cumsum([0, *map(len, ids)], dtype=np.int64)
        arrays[name] = np.fromiter((t for seq in ids for t in seq), dtype=np.int64,
                                   count=int(arrays[f"{name}_offsets"][-1]))
    for name in _NUMBERS:
        values = [getattr(p, name) for p in pairs]
        arrays[f"{name}_set"] = np.array([v is not None for v in values], dtype=bool)
        arrays[name] = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
    sources = sorted({p.source for p in pairs})
    index = {source: i for i, source in enumerate(sources)}
    arrays["sources"] = np.array(sources or [""])
    arrays["source"] = np.array([index[p.source] for p in pairs], dtype=np.int64)
    arrays["row"] = np.array([p.row for p in pairs], dtype=np.int64)
    with atomic_path(file) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)


def load_pairs(file: Path, key: str) -> list[TokenizedPair] | None:
    """The pairs cached in ``file``, or None when there is no entry — or an unreadable or
    inconsistent one, which is then removed (a warning names it) so that it is rebuilt."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                raise ValueError(f"it holds the pairs of key {stored['key']}")
            n = len(stored["row"])
            ids = {}
            for name in _FIELDS:
                offsets, tokens = stored[f"{name}_offsets"], stored[name].tolist()
                if len(offsets) != n + 1 or offsets[-1] != len(tokens):
                    raise ValueError(f"{name}: offsets do not match the tokens")
                bounds = offsets.tolist()
                ids[name] = [tokens[a:b] for a, b in itertools.pairwise(bounds)]
            numbers = {name: [v if s else None for v, s in zip(
                stored[name].tolist(), stored[f"{name}_set"].tolist(), strict=True)]
                for name in _NUMBERS}
            sources = stored["sources"].tolist()
            source, row = stored["source"].tolist(), stored["row"].tolist()
        return [TokenizedPair(ids["prompt_ids"][i], ids["chosen_ids"][i], ids["rejected_ids"][i],
                              numbers["weight"][i], numbers["margin"][i], sources[source[i]],
                              row[i], numbers["label_prob"][i]) for i in range(n)]
    except Exception as error:  # a truncated or foreign file: numpy and zipfile raise their own
        log.warning("tokenised-data cache entry %s is unusable (%s: %s); removed, tokenising "
                    "again", file, type(error).__name__, error)
        file.unlink(missing_ok=True)
        return None


def cached_pairs(cache_dir: Path, data: Path, split: str | None, tokenizer: Any,
                 settings: Any, columns: Any,
                 build: Callable[[], list[TokenizedPair]]) -> list[TokenizedPair]:
    """The pairs of ``data`` from ``cache_dir`` when an entry of their key is there, else
    ``build()`` and store them (a failed store only warns: the run has its pairs)."""
    key = pairs_key(data, split, tokenizer, settings, columns)
    if key is None:
        return build()
    file = cache_dir / f"pairs-{key}.npz"
    pairs = load_pairs(file, key)
    if pairs is not None:
        log.info("%s: %d tokenised pairs read from %s (same data, tokenizer and settings as an "
                 "earlier run)", data, len(pairs), file)
        return pairs
    pairs = build()
    try:
        save_pairs(file, key, pairs)
    except Exception as error:  # a full disk must not stop a run that has its data
        log.warning("could not cache the tokenised pairs in %s: %s", file, error)
    return pairs
