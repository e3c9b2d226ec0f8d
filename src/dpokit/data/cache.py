"""Tokenised data cached on disk — preference pairs and SFT sequences: a second run over the same
data, with the same tokenizer and tokenisation settings, reads them back instead of reading,
validating and tokenising the rows again (issue 14).

The key (:func:`items_key`) is a digest of everything the pairs depend on: the data's *content*
(every file's bytes, so an edit in place is a new key whatever its size or time stamp), the split,
the tokenizer's files (``tokenizer.json``, its config and chat template, vocabularies), the
tokenisation settings (``max_row_chars`` included: a lower limit must refuse again), the column
names and whatever else chooses the tokens (SFT's loss span), the kind of item, the path as given
(the items name it in their messages), the source of dpokit's data modules and the versions of
transformers, tokenizers and jinja2, dpokit's version and this file's format. The tokenizer's chat
template, special tokens and size are read from the loaded tokenizer too (a change made in memory),
and a template that renders today's date (``strftime_now``) keys on the date. A tokenizer that is
not a local directory gets no key, and its pairs are not cached. An entry is one ``.npz`` file of
flat token arrays and offsets (no pickles), written to a temporary file and renamed; an unreadable
or inconsistent entry is removed with a warning and rebuilt, never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("dpokit.data")

FORMAT = 1
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
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name or not Path(name).is_dir():
        return None
    directory = Path(name)
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.name.startswith(_TOKENIZER_FILES))
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=20)
    for file in files:
        digest.update(f"{file.name}\0".encode())
        _file_digest(file, digest)
    # what may have changed in memory after loading: the template, the special tokens, the size
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps([template, getattr(tokenizer, "special_tokens_map", {}),
                              len(tokenizer)], sort_keys=True, default=str).encode())
    if isinstance(template, str) and "strftime_now" in template:  # it renders today's date
        import datetime

        digest.update(datetime.date.today().isoformat().encode())
    return digest.hexdigest()


def code_digest() -> str:
    """What else turns rows into tokens: dpokit's data modules (their source: an edited
    checkout is a new key) and the versions of the libraries that render and tokenise."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.blake2b(digest_size=20)
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(f"{file.name}\0".encode())
        _file_digest(file, digest)
    for package in ("transformers", "tokenizers", "jinja2"):
        try:
            digest.update(f"{package}={version(package)}\0".encode())
        except PackageNotFoundError:
            digest.update(f"{package}=none\0".encode())
    return digest.hexdigest()


def items_key(data: Path, split: str | None, tokenizer: Any, settings: Any,
              columns: Any, kind: str = "TokenizedPair") -> str | None:
    """The cache key of the items of ``data`` (module docstring), or None when the tokenizer has
    no files to key on."""
    from dpokit import __version__

    tokenizer_id = tokenizer_digest(tokenizer)
    if tokenizer_id is None:
        return None
    parts = {"format": FORMAT, "dpokit": __version__, "code": code_digest(),
             "path": str(data), "data": content_digest(data),
             "split": split, "tokenizer": tokenizer_id, "settings": settings.to_dict(),
             "columns": asdict(columns) if dataclasses.is_dataclass(columns) else columns,
             "kind": kind}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _kinds(cls: type) -> dict[str, str]:
    """Each field of an item dataclass: ``ids`` (a list of token ids), ``number`` (a float or
    None), ``text`` (a str) or ``int``."""
    kinds = {}
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        kinds[f.name] = ("ids" if kind.startswith("list") else "number" if "float" in kind
                         else "text" if kind == "str" else "int")
    return kinds


def save_items(file: Path, key: str, items: Sequence[Any], cls: type) -> None:
    """Write ``items`` (instances of the dataclass ``cls``: token-id lists, optional floats,
    strings, ints) to ``file`` atomically, as flat arrays."""
    from dpokit.atomic import atomic_path

    arrays: dict[str, np.ndarray] = {"key": np.array(key)}
    for name, kind in _kinds(cls).items():
        values = [getattr(item, name) for item in items]
        if kind == "ids":
            arrays[f"{name}_offsets"] = np.cumsum([0, *map(len, values)], dtype=np.int64)
            arrays[name] = np.fromiter((t for seq in values for t in seq), dtype=np.int64,
                                       count=int(arrays[f"{name}_offsets"][-1]))
        elif kind == "number":
            arrays[f"{name}_set"] = np.array([v is not None for v in values], dtype=bool)
            arrays[name] = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
        elif kind == "text":
            table = sorted(set(values))
            index = {text: i for i, text in enumerate(table)}
            arrays[f"{name}_table"] = np.array(table or [""])
            arrays[name] = np.array([index[v] for v in values], dtype=np.int64)
        else:
            arrays[name] = np.array(values, dtype=np.int64)
    with atomic_path(file) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)


def load_items(file: Path, key: str, cls: type) -> list[Any] | None:
    """The items cached in ``file``, or None when there is no entry — or an unreadable or
    inconsistent one, which is then removed (a warning names it) so that it is rebuilt."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                raise ValueError(f"it holds the items of key {stored['key']}")
            columns, n = {}, None
            for name, kind in _kinds(cls).items():
                if kind == "ids":
                    offsets, tokens = stored[f"{name}_offsets"].tolist(), stored[name].tolist()
                    if offsets[-1] != len(tokens) or (n is not None and len(offsets) != n + 1):
                        raise ValueError(f"{name}: offsets do not match the tokens")
                    column = [tokens[a:b] for a, b in itertools.pairwise(offsets)]
                elif kind == "number":
                    column = [v if known else None for v, known in zip(
                        stored[name].tolist(), stored[f"{name}_set"].tolist(), strict=True)]
                elif kind == "text":
                    table = stored[f"{name}_table"].tolist()
                    column = [table[i] for i in stored[name].tolist()]
                else:
                    column = stored[name].tolist()
                if n is not None and len(column) != n:
                    raise ValueError(f"{name}: {len(column)} values for {n} items")
                n, columns[name] = len(column), column
        return [cls(**{name: column[i] for name, column in columns.items()})
                for i in range(n or 0)]
    except Exception as error:  # a truncated or foreign file: numpy and zipfile raise their own
        log.warning("tokenised-data cache entry %s is unusable (%s: %s); removed, tokenising "
                    "again", file, type(error).__name__, error)
        file.unlink(missing_ok=True)
        return None


def cached_items(cache_dir: Path, path: str | Path, split: str | None, tokenizer: Any,
                 settings: Any, columns: Any, cls: type,
                 build: Callable[[], list[Any]]) -> list[Any]:
    """The items (``cls``: :class:`TokenizedPair`, ``SFTSequence``) of the data ``path`` names
    (a file, a directory or a cached hub dataset) from ``cache_dir`` when an entry of their key
    is there, else ``build()`` and store them (a failed store only warns: the run has its data;
    data that is not there is ``build()``'s to refuse). ``columns``: whatever else chose the
    items (column names, loss-span settings), as a dataclass or a dict."""
    from dpokit.hub import locate

    data = locate(path, repo_type="dataset")
    if not data.exists():
        return build()
    key = items_key(data, split, tokenizer, settings, columns, cls.__name__)
    if key is None:
        return build()
    file = cache_dir / f"{cls.__name__.lower()}-{key}.npz"
    items = load_items(file, key, cls)
    if items is not None:
        log.info("%s: %d tokenised examples read from %s (same data, tokenizer and settings as "
                 "an earlier run)", data, len(items), file)
        return items
    items = build()
    try:
        save_items(file, key, items, cls)
    except Exception as error:  # a full disk must not stop a run that has its data
        log.warning("could not cache the tokenised data in %s: %s", file, error)
    return items
