"""Read users' preference files into rows that remember where they came from.

Supported: JSON Lines (``.jsonl``/``.ndjson``), JSON (a list of objects, or an object holding one
under a split name such as ``"train"``; a ``.json`` of one object per line is JSON Lines, as
``datasets`` reads it), CSV, Parquet, Arrow files (``.arrow``: the IPC stream ``datasets``
writes, or the IPC file format), a Hugging Face dataset saved with ``save_to_disk`` (a
``Dataset`` or a ``DatasetDict``, whose ``split`` is chosen), and a directory of such shards (read
in name order; with ``split``, only shards whose name or folder starts with it — a Hub shard
name ``train_prefs-00000-of-00001…`` is split ``train_prefs``, not ``train``'s). Every row keeps
its file and 1-based row number (the line number for JSON Lines) so errors can point at it. Rows
are read as they are needed (:func:`iter_rows`, :func:`iter_row_chunks`): JSON Lines and CSV line
by line, Parquet and Arrow by record batch; only a JSON document is read whole. JSON Lines, JSON
and CSV may be gzip-compressed (``train.jsonl.gz``, as Anthropic's HH-RLHF ships): read
decompressing as they are read.

Nothing is read by guess: data holding several splits (a ``DatasetDict``, a JSON object of split
lists, shards named ``train-*``/``test-*`` or in ``train/``/``test/`` folders) needs ``split``;
a duplicated column name (CSV header, JSON key, Parquet/Arrow field) is an error, not "the last
one wins". What was read is logged (``dpokit.data``, info).
"""

from __future__ import annotations

import ast
import codecs
import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError
from dpokit.hub import resolve

log = logging.getLogger("dpokit.data")

SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
"""Names that mark a shard as one split's (``train-00000.parquet``, ``test/0.jsonl``)."""
_SPLIT_PREFIX = re.compile(rf"^({'|'.join(SPLIT_NAMES)})(?=[-_.]|$)")
_SHARDED_SPLIT = re.compile(r"^(\w+(?:\.\w+)*?)-\d{5}-of-\d{5}")
"""The Hub's shard names, ``{split}-00000-of-00001…``: the whole ``{split}`` is the split's name
(``train_prefs``, ``test_sft``), as ``datasets`` reads them, not only its ``train`` prefix."""


@dataclass(frozen=True)
class RawRow:
    """One record of a user's file, before validation."""

    source: str
    """The file (or dataset directory) it came from."""
    row: int
    """1-based row number in ``source`` (for JSON Lines, the line number)."""
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        """``file, row N`` — the prefix of every error about this row."""
        return f"{self.source}, row {self.row}"


def _decode_error(path: Path, data: bytes, error: UnicodeDecodeError) -> DpokitError:
    line = data[: error.start].count(b"\n") + 1
    return DpokitError(f"{path}, line {line}: undecodable text (not UTF-8: byte "
                       f"{data[error.start]:#04x} at offset {error.start})")


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses an object naming a key twice (``json`` keeps the last)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


def _duplicate_error(where: str, key: str) -> DpokitError:
    return DpokitError(f"{where}: key {key!r} appears twice in one object (JSON would keep the "
                       f"last silently); rename or remove one")


def _check_unique_columns(path: Path, names: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in seen:
            raise DpokitError(f"{path}: column {name!r} appears twice in the {what} (columns "
                              f"{seen[name]} and {number}); rename or remove one")
        seen[name] = number


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


GZIP_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
"""The formats read gzip-compressed too (``rows.jsonl.gz``)."""


def _suffix(path: Path) -> str:
    """The data format's suffix of ``path``, lower case: ``.jsonl`` for ``rows.jsonl.gz`` too
    (a ``.gz`` of another format keeps ``.gz``: unsupported)."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in GZIP_SUFFIXES:
        return suffixes[-2]
    return path.suffix.lower()


def _gzipped(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if _gzipped(path) else path.read_bytes()
    except (OSError, EOFError) as error:  # gzip: BadGzipFile, a truncated stream
        raise DpokitError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
                          ) from None


def _open(path: Path) -> io.BufferedIOBase:
    try:
        return gzip.open(path, "rb") if _gzipped(path) else path.open("rb")
    except OSError as error:
        raise DpokitError(f"cannot read {path}: {error.strerror or error}") from None


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` split at ``\\n`` (as ``bytes.split``, the last one unterminated),
    read as they are needed."""
    with _open(path) as handle:
        try:
            for raw_line in handle:
                yield raw_line[:-1] if raw_line.endswith(b"\n") else raw_line
        except (OSError, EOFError) as error:  # gzip: BadGzipFile, a truncated stream
            raise DpokitError(f"cannot read {path}: "
                              f"{getattr(error, 'strerror', None) or error}") from None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    for number, raw_line in enumerate(_lines(path), start=1):
        if number == 1 and raw_line.startswith(codecs.BOM_UTF8):
            raw_line = raw_line[len(codecs.BOM_UTF8):]
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DpokitError(f"{path}, row {number}: undecodable text (not UTF-8)") from error
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise DpokitError(f"{path}, row {number}: not valid JSON ({error.msg} at column "
                              f"{error.colno})") from None
        except _DuplicateKey as error:
            raise _duplicate_error(f"{path}, row {number}", error.key) from None
        except (ValueError, RecursionError) as error:  # a huge integer, a deep nesting
            raise DpokitError(f"{path}, row {number}: JSON that cannot be read "
                              f"({_json_limit(error)})") from None
        if not isinstance(record, dict):
            raise DpokitError(f"{path}, row {number}: expected a JSON object, got "
                              f"{type(record).__name__}")
        yield RawRow(str(path), number, record)


def _read_json(path: Path, split: str | None) -> Iterator[RawRow]:
    data = _read_bytes(path)
    lines = False
    try:
        text = data.decode("utf-8-sig")
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as error:
        raise _decode_error(path, data, error) from None
    except json.JSONDecodeError as error:
        # one object per line: JSON Lines named .json, which datasets reads as such
        lines = error.msg == "Extra data" and text.lstrip().startswith("{")
        if not lines:
            raise DpokitError(f"{path}, line {error.lineno}: not valid JSON "
                              f"({error.msg})") from None
    except _DuplicateKey as error:
        raise _duplicate_error(str(path), error.key) from None
    except (ValueError, RecursionError) as error:  # a huge integer, a deep nesting
        raise DpokitError(f"{path}: JSON that cannot be read ({_json_limit(error)})") from None
    if lines:
        log.info("%s: one JSON object per line; read as JSON Lines", path)
        if split is not None:
            log.warning("%s: JSON Lines rows without splits; split=%r is ignored", path, split)
        yield from _read_jsonl(path)
        return
    if isinstance(document, dict):
        splits = sorted(k for k, v in document.items() if isinstance(v, list))
        if split is None and len(splits) > 1:
            raise DpokitError(f"{path}: an object holding several splits ({', '.join(splits)}); "
                              f"set split to choose one")
        key = split or ("train" if "train" in document else None)
        if split is None and key is not None:
            log.info("%s: reading its only split, %r", path, key)
        if key is None or key not in document:
            raise DpokitError(f"{path}: expected a list of objects, or an object with a "
                              f"{split or 'train'!r} list (keys found: {sorted(document)})")
        document = document[key]
    elif split is not None:
        log.warning("%s: a list of rows without splits; split=%r is ignored", path, split)
    if not isinstance(document, list):
        raise DpokitError(f"{path}: expected a list of objects, got {type(document).__name__}")
    for number, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            raise DpokitError(f"{path}, row {number}: expected a JSON object, got "
                              f"{type(record).__name__}")
        yield RawRow(str(path), number, record)


_REPR_MESSAGE = re.compile(r"""\{\s*'(role|content)'\s*:""")
"""A message as Python prints it (``{'role': …``): pandas' and ``datasets``' ``to_csv``."""


def _maybe_json(value: str, where: str = "", column: str = "") -> Any:
    """CSV cells holding a JSON list of messages (``[{"role": …}]``) are decoded — and so is
    the Python text of one (``[{'role': …}, …]``, as pandas' ``to_csv`` writes it); a list of
    messages in a form neither reads (``datasets``' ``to_csv`` prints them as a numpy array,
    without commas) is an error, not text trained on as the completion. Other cells stay."""
    text = value.strip()
    if text.startswith("[{") and text.endswith("}]"):
        try:
            decoded = json.loads(text)
        except (ValueError, RecursionError):  # not JSON (or unreadable)
            if not _REPR_MESSAGE.match(text, 1):
                return value  # the cell's text
            try:
                decoded = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise DpokitError(
                    f"{where}, field {column!r}: a list of messages written as Python or "
                    f"numpy text, not JSON (as datasets' to_csv prints it); read the data "
                    f"set's Parquet/JSON files, or write the cells as JSON") from None
        if isinstance(decoded, list) and all(isinstance(m, dict) and "role" in m
                                             for m in decoded):
            return decoded
    return value


_EXTRA_CELLS = "\0extra cells"
"""``csv.DictReader``'s key for the cells of a row past its header's (a name no header has)."""
_MISSING_CELL = object()
"""``csv.DictReader``'s value for the columns a short row has no cell for."""
_CSV_FIELD_LIMIT = 2**31 - 1
"""The csv module's per-field limit while reading (its default, 131,072 characters, is below
``max_row_chars``' default: a long well-formed cell is read, the row's size then checked)."""


def _json_limit(error: BaseException) -> str:
    """What a JSON parser's limit error says, in a line: Python's int-conversion limit, or
    nesting too deep to parse."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).splitlines()[0]


def _read_csv(path: Path) -> Iterator[RawRow]:
    handle = _open(path)
    # decoded as it is read; the lines are those of the whole text (newline="")
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
    # strict: a quote left open (or text after a closing one) is an error, not a cell that
    # runs on over the rows after it; no field limit below max_row_chars' (checked per row)
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.DictReader(text, strict=True, restkey=_EXTRA_CELLS, restval=_MISSING_CELL)
    try:
        header = [k.strip() for k in reader.fieldnames or []]
        _check_unique_columns(path, header, "header")
        for number, record in enumerate(reader, start=1):
            if _EXTRA_CELLS in record:  # an unquoted comma moves every later value
                raise DpokitError(
                    f"{path}, row {number} (line {reader.line_num}): "
                    f"{len(header) + len(record[_EXTRA_CELLS])} cells, the header has "
                    f"{len(header)} (a cell holding a comma must be quoted)")
            cells = sum(v is not _MISSING_CELL for v in record.values())
            if cells < len(header):  # a cut-off row, or one written with another delimiter
                raise DpokitError(
                    f"{path}, row {number} (line {reader.line_num}): {cells} cell"
                    f"{'s' * (cells != 1)}, the header has {len(header)} (every row needs a "
                    f"cell for each column, empty or not)")
            where = f"{path}, row {number}"
            fields = {k.strip(): _maybe_json(v, where, k.strip()) if isinstance(v, str) else v
                      for k, v in record.items()}
            yield RawRow(str(path), number, fields)
    except UnicodeDecodeError:  # where in the file: the whole of it, as read at once
        data = _read_bytes(path)
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise _decode_error(path, data, error) from None
        raise
    except csv.Error as error:
        raise DpokitError(f"{path}, line {reader.line_num}: malformed CSV ({error})") from None
    except OSError as error:
        raise DpokitError(f"cannot read {path}: {error.strerror or error}") from None
    finally:
        text.close()


_BATCH_ROWS = 4096
"""Rows per record batch read from Parquet and Arrow files."""


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _check_unique_columns(path, pq.read_schema(path).names, "schema")
        file = pq.ParquetFile(path)
        number = 0
        for batch in file.iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                yield RawRow(str(path), number, record)
    except (OSError, pa.ArrowException) as error:
        raise DpokitError(f"cannot read {path} as Parquet: {_one_line(error)}") from None


def _read_arrow(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                batches = pa.ipc.open_stream(source)
                schema = batches.schema
            except pa.ArrowInvalid:  # the IPC file format (Feather 2), as datasets reads too
                source.seek(0)
                file = pa.ipc.open_file(source)
                schema = file.schema
                batches = (file.get_batch(i) for i in range(file.num_record_batches))
            _check_unique_columns(path, schema.names, "schema")
            number = 0
            for batch in batches:
                for record in batch.to_pylist():
                    number += 1
                    yield RawRow(str(path), number, record)
    except (OSError, pa.ArrowException) as error:
        raise DpokitError(f"cannot read {path} as an Arrow stream or file: "
                          f"{_one_line(error)}") from None


_READERS: dict[str, Callable[[Path, str | None], Iterator[RawRow]]] = {
    ".jsonl": lambda p, _: _read_jsonl(p),
    ".ndjson": lambda p, _: _read_jsonl(p),
    ".json": _read_json,
    ".csv": lambda p, _: _read_csv(p),
    ".parquet": lambda p, _: _read_parquet(p),
    ".arrow": lambda p, _: _read_arrow(p),
}
SUPPORTED_SUFFIXES = tuple(_READERS)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises many types for a damaged directory
        raise DpokitError(f"cannot load the saved dataset {path}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None and len(names) != 1:
            raise DpokitError(f"{path}: a saved DatasetDict with splits {', '.join(names)}; set "
                              f"split to choose one")
        chosen = split or names[0]
        if chosen not in loaded:
            raise DpokitError(f"{path}: no split {chosen!r} (splits: {', '.join(names)}); "
                              f"choose one with split")
        loaded = loaded[chosen]
        source = f"{path}[{chosen}]"
        log.info("%s: reading split %r (%d rows)%s", path, chosen, len(loaded),
                 "" if split else ", its only split")
    else:
        source = str(path)
        if split is not None:
            log.warning("%s: a saved Dataset without splits; split=%r is ignored", path, split)
    # as Python objects whatever format it was saved with: a numpy/torch format would give
    # np.True_ or tensor(1.) for a boolean, which reads as the number 1
    loaded = loaded.with_format(None)
    number = 0
    for batch in loaded.iter(batch_size=_BATCH_ROWS):  # columns of up to _BATCH_ROWS rows
        names = list(batch)
        for values in zip(*(batch[name] for name in names), strict=True):
            number += 1
            yield RawRow(source, number, dict(zip(names, values, strict=True)))


def _shard_split(path: Path, shard: Path) -> str | None:
    """The split a shard belongs to by its folder (``test/…``) or name (``train-00000…``;
    ``train_prefs-00000-of-00001…`` is split ``train_prefs``)."""
    parts = shard.relative_to(path).parts
    folder = next((part for part in parts[:-1] if part in SPLIT_NAMES), None)
    match = _SPLIT_PREFIX.match(shard.name)
    if folder or match is None:
        return folder
    sharded = _SHARDED_SPLIT.match(shard.name)
    return sharded.group(1) if sharded else match.group(1)


def _in_split(path: Path, shard: Path, split: str) -> bool:
    """``shard`` is one of ``split``'s: in a folder of that name, or named by it — but a Hub
    shard name states its whole split (``train_sft-00000-of-00001`` is not ``train``'s)."""
    if any(part == split for part in shard.relative_to(path).parts[:-1]):
        return True
    sharded = _SHARDED_SPLIT.match(shard.name)
    return shard.name.startswith(split) and (sharded is None or sharded.group(1) == split)


def _shards(path: Path, split: str | None) -> tuple[list[Path], str | None]:
    """The data files of the directory ``path`` for ``split``, and the split to read inside
    each (a JSON document's own splits, when no shard is named by one)."""
    inner = None
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _READERS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if split is None:
        splits = sorted({s for p in files if (s := _shard_split(path, p)) is not None})
        if len(splits) > 1:
            raise DpokitError(f"{path}: shards of several splits ({', '.join(splits)}); set "
                              f"split to choose one")
    elif files and all(_shard_split(path, p) is None for p in files) and not any(
            p.name.startswith(split) for p in files):
        # shards named by no split are one split (as load_dataset calls them "train"): read
        # whole, as a single file is — a JSON document's own splits are its reader's
        if any(_suffix(p) != ".json" for p in files):
            log.warning("%s: shards without split names; split=%r is ignored", path, split)
        inner = split
    else:
        present = sorted({s for p in files if (s := _shard_split(path, p)) is not None})
        files = [p for p in files if _in_split(path, p, split)]
        if not files and present:
            raise DpokitError(f"{path}: no data files for split {split!r} (the shards' splits: "
                              f"{', '.join(present)}); set split to one of them")
    if not files:
        wanted = f" for split {split!r}" if split else ""
        raise DpokitError(f"{path}: no data files{wanted} (looked for "
                          f"{', '.join(SUPPORTED_SUFFIXES)} files, or a saved dataset)")
    suffixes = {_suffix(p) for p in files}
    if len(suffixes) > 1:
        raise DpokitError(f"{path}: shards of mixed formats ({', '.join(sorted(suffixes))})")
    names = [str(p.relative_to(path)) for p in files]
    log.info("%s: reading %d shard%s%s (%s%s)", path, len(files), "s" * (len(files) > 1),
             f" of split {split!r}" if split else "", ", ".join(names[:5]),
             f", … {names[-1]}" if len(names) > 5 else "")
    return files, inner


def _data_path(path: str | Path) -> Path:
    """``path``, or the cached snapshot of a dataset repository named ``Org/name`` (a name
    ending in a data file's suffix is a file, never a repository)."""
    if _suffix(Path(path)) in _READERS:
        return Path(path)
    return resolve(path, what="data", logger=log.name, repo_type="dataset",
                   local="file or directory")


def iter_rows(path: str | Path, *, split: str | None = None) -> Iterator[RawRow]:
    """Yield the rows of a file, a saved dataset or a directory of shards (a dataset
    repository's cached snapshot, for ``Org/name``), in order."""
    path = _data_path(path)
    if not path.exists():
        raise DpokitError(f"data not found: {path}")
    if path.is_dir():
        if _is_saved_dataset(path):
            yield from _read_saved_dataset(path, split)
            return
        shards, inner = _shards(path, split)
        for shard in shards:
            yield from _READERS[_suffix(shard)](shard, inner)
        return
    reader = _READERS.get(_suffix(path))
    if reader is None:
        raise DpokitError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; expected "
                          f"{', '.join(SUPPORTED_SUFFIXES)}, a saved dataset or a directory")
    if split is not None and reader is not _read_json:
        log.warning("%s: one file of rows without splits; split=%r is ignored", path, split)
    yield from reader(path, split)


def _size(value: Any) -> int:
    """Characters of the text in a value (strings inside lists and objects too)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple):
        return sum(map(_size, value))
    if isinstance(value, dict):
        return sum(map(_size, value.values()))
    return 0


def iter_row_chunks(path: str | Path, *, split: str | None = None, rows: int = 8192,
                    chars: int | None = None) -> Iterator[list[RawRow]]:
    """The rows of :func:`iter_rows` in lists of ``rows`` — fewer once they hold ``chars``
    characters of text (long rows: a chunk's memory stays bounded), the last one shorter —
    read as they are needed: JSON Lines and CSV line by line, Parquet and Arrow by record
    batch, a saved dataset by batch of its memory-mapped table (a JSON document is read
    whole)."""
    chunk: list[RawRow] = []
    size = 0
    for row in iter_rows(path, split=split):
        chunk.append(row)
        if chars is not None:
            size += _size(row.fields)
        if len(chunk) == rows or (chars is not None and size >= chars):
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def load_rows(path: str | Path, *, split: str | None = None) -> list[RawRow]:
    """All rows of :func:`iter_rows` as a list; an empty source is an error."""
    rows = list(iter_rows(path, split=split))
    if not rows:
        raise DpokitError(f"{path}: no rows")
    return rows
