"""Tokenised items as flat arrays: a read-only sequence of dataclasses, built one on demand.

    writer = StoreWriter(TokenizedPair, directory)       # or None: the arrays stay in memory
    writer.append(chunk_arrays(pairs, TokenizedPair))    # one chunk after another
    store = writer.finish()                              # an ItemStore
    store = open_store(directory, TokenizedPair)         # later: the files memory-mapped
    store[7], store[:100], len(store), store + eval_pairs
    store.lengths("chosen_ids"), store.column("weight"), store.present("margin")

Each field of the item dataclass is stored by its kind (:func:`field_kinds`): a token-id list as
one flat ``int32`` array plus ``int64`` offsets (item i is ``tokens[offsets[i]:offsets[i+1]]``),
an optional float as ``float64`` values plus a ``bool`` mask of the ones set, a string as an
index into a table of the distinct strings (first-seen order), an int as ``int64``. On disk an
entry is a directory of ``.npy`` files (opened with ``np.load(mmap_mode="r")``: only the pages an
item touches are read) and ``meta.json``, written last, with the item count and a digest of every
field (:func:`content_digest` reads these instead of the tokens). No file is ever written over
(an existing one is refused): a store mapped by a running process is never truncated under it.

Opening an entry verifies it cheaply (:func:`open_store`): ``meta.json`` carries a SHA-256 of
its own content, and for each ``.npy`` file its size and a SHA-256 of its bytes — of the whole
file up to :data:`_WHOLE_FILE` bytes, else of :data:`_SAMPLES` evenly spaced blocks from its
first to its last byte (a truncated, extended or replaced file, or one edited at its ends, is
found in O(1); an edit of one value deep inside a file over 4 MiB may not be: a full check
would cost a read of the whole data at every start).

The digest of a field is the SHA-256 of its values in a canonical form (token ids and lengths as
little-endian int64, floats as their float64 bytes with the None mask, strings as the codes of
their first-seen order and the JSON list of the distinct ones, ints as int64): the same items
give the same digest whether they are a list, a store or a slice of one, and whatever the chunks
they were written in; any change of a value, a length or a boundary changes it.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 2
"""Version of the on-disk layout (``meta.json``'s ``format``). 2: ``meta.json`` holds the
sizes and checksums of the files and of itself (module docstring)."""
_TOKEN_DTYPE = np.dtype("<i4")
_INT_DTYPE = np.dtype("<i8")
_FLOAT_DTYPE = np.dtype("<f8")
_BLOCK = 1 << 16
"""Items per block when a digest or a column is computed item by item (lists, views)."""
_WHOLE_FILE = 1 << 22
"""Files up to this many bytes are checksummed whole when a store is opened."""
_SAMPLES, _SAMPLE_BYTES = 32, 1 << 16
"""Larger files: this many blocks of this many bytes, evenly spaced, first and last included."""

_KINDS = {"list[int]": "ids", "float | None": "number", "float": "number",
          "Optional[float]": "number", "str": "text", "int": "int"}


def field_kinds(cls: type) -> dict[str, str]:
    """Each field of an item dataclass: ``ids`` (a list of token ids), ``number`` (a float or
    None), ``text`` (a str) or ``int``; a field of any other type is a TypeError (a new field
    needs a kind here before items holding it can be stored)."""
    kinds = {}
    for f in dataclasses.fields(cls):
        name = (f.type if isinstance(f.type, str) else f.type.__name__
                if type(f.type) is type else str(f.type))  # a string under `annotations`
        kind = _KINDS.get(name)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: type {f.type} has no stored kind")
        kinds[f.name] = kind
    return kinds


def storable(cls: type) -> bool:
    """Whether :func:`field_kinds` knows every field of ``cls``."""
    try:
        field_kinds(cls)
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------------------ chunk arrays


def chunk_arrays(items: Sequence[Any], cls: type) -> dict[str, Any]:
    """The columns of ``items`` (instances of ``cls``): ``{name: ids, name_lengths: ...}`` as
    numpy arrays; a text field as ``(table, indices)`` of its distinct strings in first-seen
    order."""
    arrays: dict[str, Any] = {}
    n = len(items)
    for name, kind in field_kinds(cls).items():
        values = [getattr(item, name) for item in items]
        if kind == "ids":
            lengths = np.fromiter(map(len, values), dtype=_INT_DTYPE, count=n)
            tokens = np.fromiter(itertools.chain.from_iterable(values), dtype=_INT_DTYPE,
                                 count=int(lengths.sum()))
            if tokens.size and (tokens.min() < np.iinfo(_TOKEN_DTYPE).min
                                or tokens.max() > np.iinfo(_TOKEN_DTYPE).max):
                raise ValueError(f"{name}: a token id outside int32")
            arrays[name] = tokens.astype(_TOKEN_DTYPE)
            arrays[f"{name}_lengths"] = lengths
        elif kind == "number":
            arrays[f"{name}_set"] = np.fromiter((v is not None for v in values), dtype=bool,
                                                count=n)
            arrays[name] = np.fromiter((0.0 if v is None else v for v in values),
                                       dtype=_FLOAT_DTYPE, count=n)
        elif kind == "text":
            index: dict[str, int] = {}
            codes = np.fromiter((index.setdefault(v, len(index)) for v in values),
                                dtype=_INT_DTYPE, count=n)
            arrays[name] = (list(index), codes)
        else:
            arrays[name] = np.fromiter(values, dtype=_INT_DTYPE, count=n)
    return arrays


def _first_seen(table: Sequence[str], codes: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """``codes`` (into ``table``) as codes into ``index``, the strings of a whole stream in the
    order they first occur (new ones are added to it)."""
    codes = np.asarray(codes, dtype=_INT_DTYPE)
    if not len(codes):
        return codes
    used, first = np.unique(codes, return_index=True)
    remap = np.full(len(table), -1, dtype=_INT_DTYPE)
    for code in used[np.argsort(first)].tolist():
        remap[code] = index.setdefault(table[code], len(index))
    return remap[codes]


class _FieldDigest:
    """The running SHA-256 of one field's canonical bytes (module docstring)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.parts = [hashlib.sha256(), hashlib.sha256()]
        self.table: dict[str, int] = {}

    def update(self, name: str, arrays: dict[str, Any]) -> None:
        first, second = self.parts
        if self.kind == "ids":
            first.update(arrays[f"{name}_lengths"].astype(_INT_DTYPE).tobytes())
            second.update(arrays[name].astype(_INT_DTYPE).tobytes())
        elif self.kind == "number":
            first.update(arrays[f"{name}_set"].astype(np.uint8).tobytes())
            second.update(arrays[name].astype(_FLOAT_DTYPE).tobytes())
        elif self.kind == "text":
            table, codes = arrays[name]
            first.update(_first_seen(table, codes, self.table).tobytes())
        else:
            first.update(arrays[name].astype(_INT_DTYPE).tobytes())

    def hexdigest(self) -> str:
        final = hashlib.sha256(self.kind.encode())
        for part in self.parts:
            final.update(part.digest())
        if self.kind == "text":
            final.update(json.dumps(list(self.table)).encode())
        return final.hexdigest()


def _combine(digests: dict[str, str], names: Sequence[str]) -> str:
    combined = hashlib.sha256()
    for name in sorted(names):
        combined.update(f"{name}\0{digests[name]}\0".encode())
    return combined.hexdigest()


def content_digest(items: Sequence[Any], cls: type | None = None, *,
                   fields: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> str:
    """A digest of the values of ``fields`` (default: every field but ``exclude``) of every item,
    in order — the same for a list, an :class:`ItemStore`, a slice of one or a chain of them
    (module docstring). O(1) for a whole store: its digests were computed when it was written."""
    if isinstance(items, _Items):
        return items.digest(fields=fields, exclude=exclude)
    if cls is None:
        cls = type(items[0]) if len(items) else None
    if cls is None:
        return hashlib.sha256(b"empty").hexdigest()
    kinds = field_kinds(cls)
    names = [n for n in (fields or kinds) if n not in exclude]
    running = {name: _FieldDigest(kinds[name]) for name in names}
    for start in range(0, len(items), _BLOCK):
        block = chunk_arrays(items[start:start + _BLOCK], cls)
        for name in names:
            running[name].update(name, block)
    return _combine({n: d.hexdigest() for n, d in running.items()}, names)


# ----------------------------------------------------------------------------------- writing


def _arrays(kinds: dict[str, str]) -> dict[str, np.dtype]:
    """The arrays (and their dtypes) that hold fields of these kinds."""
    arrays = {}
    for name, kind in kinds.items():
        arrays.update({"ids": {name: _TOKEN_DTYPE, f"{name}_offsets": _INT_DTYPE},
                       "number": {name: _FLOAT_DTYPE, f"{name}_set": np.dtype(bool)},
                       "text": {name: _INT_DTYPE}, "int": {name: _INT_DTYPE}}[kind])
    return arrays


class _NpyAppender:
    """A 1-d ``.npy`` file written chunk by chunk: the header is rewritten with the final
    length at :meth:`close` (numpy reserves room for it to grow)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, dtype, 0
        self.handle = path.open("xb")  # never over a file (one mapped elsewhere: SIGBUS)
        self._header(0)
        self.start = self.handle.tell()

    def _header(self, count: int) -> None:
        np.lib.format.write_array_header_1_0(
            self.handle, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                          "fortran_order": False, "shape": (count,)})

    def write(self, values: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def close(self) -> None:
        self.handle.seek(0)
        self._header(self.count)
        if self.handle.tell() != self.start:
            raise RuntimeError(f"{self.path}: the .npy header changed size")
        self.handle.close()

    def abort(self) -> None:
        self.handle.close()


class StoreWriter:
    """Appends chunks of :func:`chunk_arrays` to the files of a store in ``directory`` (None:
    arrays kept in memory); :meth:`finish` returns the :class:`ItemStore`."""

    def __init__(self, cls: type, directory: Path | None):
        self.cls, self.kinds, self.directory = cls, field_kinds(cls), directory
        self.count = 0
        self.digests = {name: _FieldDigest(kind) for name, kind in self.kinds.items()}
        self.tables: dict[str, dict[str, int]] = {n: {} for n, k in self.kinds.items()
                                                  if k == "text"}
        self.totals = {n: 0 for n, k in self.kinds.items() if k == "ids"}
        self.columns: dict[str, Any] = {}
        for array, dtype in _arrays(self.kinds).items():
            self.columns[array] = (_NpyAppender(directory / f"{array}.npy", dtype)
                                   if directory is not None else [])
        for name in self.totals:
            self._write(f"{name}_offsets", np.zeros(1, dtype=_INT_DTYPE))

    def _write(self, array: str, values: np.ndarray) -> None:
        column = self.columns[array]
        if isinstance(column, list):
            column.append(np.asarray(values))
        else:
            column.write(values)

    def append(self, arrays: dict[str, Any]) -> None:
        """Add one chunk's items (after the earlier chunks')."""
        count = None
        for name, kind in self.kinds.items():
            self.digests[name].update(name, arrays)
            if kind == "ids":
                lengths = arrays[f"{name}_lengths"]
                self._write(name, arrays[name])
                self._write(f"{name}_offsets", self.totals[name] + np.cumsum(lengths))
                self.totals[name] += int(lengths.sum())
                size = len(lengths)
            elif kind == "number":
                self._write(name, arrays[name])
                self._write(f"{name}_set", arrays[f"{name}_set"])
                size = len(arrays[name])
            elif kind == "text":
                table, codes = arrays[name]
                self._write(name, _first_seen(table, codes, self.tables[name]))
                size = len(codes)
            else:
                self._write(name, arrays[name])
                size = len(arrays[name])
            if count is not None and size != count:
                raise ValueError(f"{name}: {size} values for {count} items")
            count = size
        self.count += count or 0

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": self.cls.__name__, "count": self.count,
                "fields": self.kinds, "tables": {n: list(t) for n, t in self.tables.items()},
                "digests": {n: d.hexdigest() for n, d in self.digests.items()}}

    def finish(self, **extra: Any) -> ItemStore:
        """Close the files (``meta.json`` last, with ``extra`` keys) and return the store."""
        meta = {**self.meta(), **extra}
        if self.directory is None:
            arrays = {}
            dtypes = _arrays(self.kinds)
            for name, parts in self.columns.items():  # one column's copy at a time
                arrays[name] = (np.concatenate(parts).astype(dtypes[name], copy=False) if parts
                                else np.zeros(0, dtype=dtypes[name]))  # no item appended
                parts.clear()
            return ItemStore(self.cls, arrays, meta)
        for column in self.columns.values():
            column.close()
        meta["files"] = {array: _file_check(self.directory / f"{array}.npy")
                         for array in self.columns}
        meta["checksum"] = _meta_checksum(meta)
        with (self.directory / "meta.json").open("x", encoding="utf-8") as handle:
            handle.write(json.dumps(meta))
        return open_store(self.directory, self.cls)

    def abort(self) -> None:
        """Close the files of a build that failed (the caller removes the directory)."""
        for column in self.columns.values():
            if not isinstance(column, list):
                column.abort()


def _file_check(path: Path) -> dict[str, Any]:
    """The size of the file ``path`` and a SHA-256 of its bytes: all of them up to
    :data:`_WHOLE_FILE`, else :data:`_SAMPLES` blocks from its first byte to its last."""
    from dpokit.digests import update_sampled

    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\0".encode())
    update_sampled(digest, path, size, whole_up_to=_WHOLE_FILE, block=_SAMPLE_BYTES,
                   blocks=_SAMPLES)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _meta_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` but its own ``checksum`` (canonical JSON)."""
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def open_store(directory: Path, cls: type, *, key: str | None = None) -> ItemStore:
    """The store written in ``directory``, its arrays memory-mapped; an entry that is not
    complete, not of ``cls`` (or of another ``key``), altered since it was written (its files'
    sizes and checksums, module docstring) or inconsistent raises (ValueError, OSError, …,
    naming the file: the caller removes it)."""
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("meta.json: not an object")
    if meta.get("format") != FORMAT or meta.get("kind") != cls.__name__:
        raise ValueError(f"format {meta.get('format')} of {meta.get('kind')}, expected "
                         f"{FORMAT} of {cls.__name__}")
    if meta.get("checksum") != _meta_checksum(meta):
        raise ValueError("meta.json: altered since it was written (its checksum differs)")
    if key is not None and meta.get("key") != key:
        raise ValueError(f"it holds the items of key {meta.get('key')}")
    kinds = field_kinds(cls)
    if meta.get("fields") != kinds:
        raise ValueError(f"fields {meta.get('fields')}, expected {kinds}")
    n = meta["count"]
    arrays = {}
    for array, dtype in _arrays(kinds).items():
        expected, path = meta["files"][array], directory / f"{array}.npy"
        found = _file_check(path)
        if found["bytes"] != expected["bytes"]:
            raise ValueError(f"{path.name}: {found['bytes']} bytes, {expected['bytes']} when "
                             f"written (truncated or extended)")
        if found["sha256"] != expected["sha256"]:
            raise ValueError(f"{path.name}: altered since it was written (its checksum differs)")
        arrays[array] = np.load(directory / f"{array}.npy", mmap_mode="r",
                                allow_pickle=False).view(np.ndarray)
        if arrays[array].dtype != dtype or arrays[array].ndim != 1:
            raise ValueError(f"{array}: {arrays[array].dtype} of shape {arrays[array].shape}")
    for name, kind in kinds.items():
        if kind == "ids":
            tokens, offsets = arrays[name], arrays[f"{name}_offsets"]
            if (len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(tokens)
                    or bool((offsets[1:] < offsets[:-1]).any())):
                raise ValueError(f"{name}: offsets do not match the tokens")
        elif kind == "number" and not len(arrays[name]) == len(arrays[f"{name}_set"]) == n:
            raise ValueError(f"{name}: not {n} values")
        elif len(arrays[name]) != n:
            raise ValueError(f"{name}: {len(arrays[name])} values for {n} items")
        if kind == "text" and n and not 0 <= int(arrays[name].min()) <= int(
                arrays[name].max()) < len(meta["tables"][name]):
            raise ValueError(f"{name}: an index outside its table")
    return ItemStore(cls, arrays, meta, path=directory)


# ----------------------------------------------------------------------------------- reading


class _Items(Sequence):
    """What stores and chains share: equal to any sequence of equal items (unhashable, as a
    list), and ``+`` with any sequence chains without copying."""

    def _chained(self) -> list[Sequence[Any]]:
        """The parts ``+`` puts in a chain."""
        return [self]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Any) -> Sequence[Any]:
        if not isinstance(other, Sequence):
            return NotImplemented
        return ItemChain([*self._chained(), other]).simplified()

    def __radd__(self, other: Any) -> Sequence[Any]:
        if not isinstance(other, Sequence):
            return NotImplemented
        return ItemChain([other, *self._chained()]).simplified()


class ItemStore(_Items):
    """A read-only sequence of ``cls`` items held as flat arrays (module docstring): ``store[i]``
    builds one item, a slice is a view over the same arrays, ``+`` chains (:class:`ItemChain`).
    Equal to any sequence of equal items."""

    def __init__(self, cls: type, arrays: dict[str, np.ndarray], meta: dict[str, Any], *,
                 rows: np.ndarray | None = None, path: Path | None = None):
        self.cls, self.kinds, self.meta, self.path = cls, field_kinds(cls), meta, path
        self.arrays, self.rows = arrays, rows
        self._tables = {name: list(table) for name, table in meta["tables"].items()}
        self._count = meta["count"] if rows is None else len(rows)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else " in memory"
        return f"<ItemStore of {self._count} {self.cls.__name__}{where}>"

    def _item(self, i: int) -> Any:
        a = self.arrays
        values = {}
        for name, kind in self.kinds.items():
            if kind == "ids":
                start, end = a[f"{name}_offsets"][i:i + 2].tolist()
                values[name] = a[name][start:end].tolist()
            elif kind == "number":
                values[name] = float(a[name][i]) if a[f"{name}_set"][i] else None
            elif kind == "text":
                values[name] = self._tables[name][a[name][i]]
            else:
                values[name] = int(a[name][i])
        return self.cls(**values)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            span = range(self._count)[index]
            if span == range(self._count):
                return self
            positions = np.arange(span.start, span.stop, span.step, dtype=np.int64)
            rows = positions if self.rows is None else self.rows[positions]
            return ItemStore(self.cls, self.arrays, self.meta, rows=rows, path=self.path)
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"item {index} of {self._count}")
        return self._item(i if self.rows is None else int(self.rows[i]))

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._count):
            yield self._item(i if self.rows is None else int(self.rows[i]))

    # --- vectorised columns

    def _positions(self) -> np.ndarray | slice:
        return slice(None) if self.rows is None else self.rows

    def lengths(self, name: str) -> np.ndarray:
        """Tokens of the ids field ``name`` of every item (int64)."""
        if self.kinds.get(name) != "ids":
            raise KeyError(f"{name} is not a token-id field of {self.cls.__name__}")
        offsets = self.arrays[f"{name}_offsets"]
        if self.rows is None:
            return np.diff(offsets)
        return offsets[self.rows + 1] - offsets[self.rows]

    def column(self, name: str) -> np.ndarray:
        """The number (float64, NaN where None), int (int64) or text (object) field ``name`` of
        every item."""
        kind = self.kinds[name]
        values = self.arrays[name][self._positions()]
        if kind == "number":
            return np.where(self.present(name), values, np.nan)
        if kind == "text":
            return np.asarray(self._tables[name], dtype=object)[values]
        if kind == "ids":
            raise KeyError(f"{name} is a token-id field: see lengths()")
        return np.asarray(values)

    def present(self, name: str) -> np.ndarray:
        """Whether each item's ``name`` is not None (always, but for optional numbers)."""
        if self.kinds[name] == "number":
            return np.asarray(self.arrays[f"{name}_set"][self._positions()], dtype=bool)
        return np.ones(self._count, dtype=bool)

    def _block_arrays(self, rows: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
        """:func:`chunk_arrays` of the items at base positions ``rows``, read as arrays."""
        a, out = self.arrays, {}
        for name in names:
            kind = self.kinds[name]
            if kind == "ids":
                offsets = a[f"{name}_offsets"]
                starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
                flat = (np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
                        + np.arange(int(lengths.sum())))
                out[name], out[f"{name}_lengths"] = a[name][flat], lengths
            elif kind == "number":
                out[name], out[f"{name}_set"] = a[name][rows], a[f"{name}_set"][rows]
            elif kind == "text":
                out[name] = (self._tables[name], np.asarray(a[name][rows]))
            else:
                out[name] = a[name][rows]
        return out

    def digest(self, *, fields: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> str:
        """:func:`content_digest` of this store (O(1) unless it is a view)."""
        names = [n for n in (fields or self.kinds) if n not in exclude]
        if not len(self):  # no items: the digest of an empty list's
            return hashlib.sha256(b"empty").hexdigest()
        if self.rows is None:
            return _combine(self.meta["digests"], names)
        running = {name: _FieldDigest(self.kinds[name]) for name in names}
        for start in range(0, self._count, _BLOCK):
            block = self._block_arrays(self.rows[start:start + _BLOCK], names)
            for name in names:
                running[name].update(name, block)
        return _combine({n: d.hexdigest() for n, d in running.items()}, names)


class ItemChain(_Items):
    """Sequences one after another (``store + eval_pairs``), without copying; a slice that
    falls inside one part is that part's own slice."""

    def __init__(self, parts: Sequence[Sequence[Any]]):
        self.parts = [p for p in parts if len(p)]
        self.starts = list(itertools.accumulate((len(p) for p in self.parts), initial=0))

    def simplified(self) -> Sequence[Any]:
        """The single part when only one is not empty."""
        if len(self.parts) == 1:
            return self.parts[0]
        return self

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            pieces = []
            for part, offset in zip(self.parts, self.starts, strict=False):
                a, b = max(start - offset, 0), min(stop - offset, len(part))
                if a < b:
                    pieces.append(part[a:b])
            return ItemChain(pieces).simplified() if pieces else []
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        return self.parts[k][i - self.starts[k]]

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part

    def _chained(self) -> list[Sequence[Any]]:
        return list(self.parts)

    def lengths(self, name: str) -> np.ndarray:
        return np.concatenate([lengths(p, name) for p in self.parts] or [np.zeros(0, int)])

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([column(p, name) for p in self.parts] or [np.zeros(0)])

    def present(self, name: str) -> np.ndarray:
        return np.concatenate([present(p, name) for p in self.parts] or [np.zeros(0, bool)])

    def digest(self, *, fields: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> str:
        """:func:`content_digest` of the parts one after another, a block of items at a time
        (a store's as arrays): never every item in memory at once."""
        if not self.parts:
            return hashlib.sha256(b"empty").hexdigest()
        first = self.parts[0]  # (a store's class: no item built)
        cls = first.cls if isinstance(first, ItemStore) else type(first[0])
        kinds = field_kinds(cls)
        names = [n for n in (fields or kinds) if n not in exclude]
        running = {name: _FieldDigest(kinds[name]) for name in names}
        for part in self.parts:
            for start in range(0, len(part), _BLOCK):
                if isinstance(part, ItemStore):
                    positions = np.arange(start, min(start + _BLOCK, len(part)), dtype=np.int64)
                    block = part._block_arrays(
                        positions if part.rows is None else part.rows[positions], names)
                else:
                    block = chunk_arrays(part[start:start + _BLOCK], cls)
                for name in names:
                    running[name].update(name, block)
        return _combine({n: d.hexdigest() for n, d in running.items()}, names)


# ---------------------------------------------------------- the same, for any sequence of items


def lengths(items: Sequence[Any], name: str) -> np.ndarray:
    """Tokens of the ids field ``name`` of every item of a list, store or chain (int64)."""
    if isinstance(items, _Items):
        return items.lengths(name)
    return np.fromiter((len(getattr(item, name)) for item in items), dtype=_INT_DTYPE,
                       count=len(items))


def present(items: Sequence[Any], name: str) -> np.ndarray:
    """Whether each item's ``name`` is not None."""
    if isinstance(items, _Items):
        return items.present(name)
    return np.fromiter((getattr(item, name) is not None for item in items), dtype=bool,
                       count=len(items))


def column(items: Sequence[Any], name: str) -> np.ndarray:
    """The values of a number field (NaN where None) or another scalar field of every item."""
    if isinstance(items, _Items):
        return items.column(name)
    values = [getattr(item, name) for item in items]
    if values and all(isinstance(v, float | None) for v in values):
        return np.array([np.nan if v is None else v for v in values], dtype=_FLOAT_DTYPE)
    return np.array(values)
