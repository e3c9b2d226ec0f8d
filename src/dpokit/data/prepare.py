"""Rows → an item store, chunk by chunk: never every row, or every item, in memory at once.

    store = prepare_items(path, split, tokenizer, recipe, directory=tmp)   # or directory=None

The rows of :func:`dpokit.data.io.iter_rows` come in chunks of :data:`CHUNK_ROWS` (fewer when
they hold :data:`CHUNK_CHARS` characters); a loader's
:class:`Recipe` validates, tokenises and truncates one chunk with the same functions the whole
data went through before (``parse_example``, ``tokenize_examples``, ``tokenize_sft``), and each
chunk's arrays are appended to the store's files (:class:`~dpokit.data.store.StoreWriter`).
``num_proc`` > 1 runs the chunks in that many worker processes (``spawn``ed — a script that uses
them runs its work under ``if __name__ == "__main__":`` — each with a pickled copy of the
tokenizer and one tokenizer thread), their results taken in chunk order: the same store, item
for item. On 2 cores it does not pay for plain text, whose batches the tokenizer's Rust backend
already spreads over every core; it does for chat-template data, rendered one row at a time.

The answer is the one the whole data read at once would give. Errors keep their precedence: a
reader's error (undecodable text, bad JSON) wins over any other, then the checks in the order the
loader ran them over all rows (a row over ``max_row_chars``, a renamed column absent from every
row, a column some rows fill and others lack, a bad row, mixed formats, a tokenisation error, no
row left) and, within one check, the first row. An error found in one chunk is held while the
later chunks are still read for the checks that come before it (none of them is tokenised); the
checks that need every row (columns present, filled) run on counts gathered across the chunks.
The messages of one chunk's tokenisation (rows dropped by truncation, prompts shortened at the
boundary) are added up and logged once, as for the whole data.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dpokit.data.io import RawRow, iter_row_chunks
from dpokit.data.store import ItemStore, StoreWriter, chunk_arrays
from dpokit.data.tokenize import progress_bar
from dpokit.errors import DpokitError

log = logging.getLogger("dpokit.data")

CHUNK_ROWS = 8192
"""Rows per chunk (the tokenizer's batches within a chunk are its own)."""
CHUNK_CHARS = 8_000_000
"""Characters of text per chunk at most (fewer rows when they are long): tokenising a chunk
holds ~25 bytes per character in Python objects until its arrays are written (8192 rows of
~150 tokens, ~6 M characters: ~150 MB)."""
NO_ERROR = 1 << 30


@dataclass
class ChunkResult:
    """What one chunk of rows became: its items' arrays, or the error that stopped it (and the
    stage of the check that raised it), the log records its work emitted, and the recipe's
    numbers for the checks across chunks."""

    rows: int
    arrays: dict[str, Any] | None = None
    count: int = 0
    error: DpokitError | None = None
    stage: int = NO_ERROR
    records: list[tuple[int, str, tuple]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def failed(self, stage: int, error: DpokitError) -> ChunkResult:
        self.stage, self.error = stage, error
        return self

    def holding(self, items: list[Any], cls: type) -> ChunkResult:
        """This result with ``items`` (of ``cls``) as its arrays, when there are any."""
        if items:
            self.arrays, self.count = chunk_arrays(items, cls), len(items)
        return self


class Summary(ABC):
    """A recipe's view of every chunk so far (main process): the checks across chunks.

    It counts the rows and gathers every chunk's sources and column names (``scan``, the
    chunk's ``{"sources": [...], "columns": [...]}``): one stand-in row per source is what the
    column checks read at the end (:meth:`stand_ins`).
    """

    doomed: int = NO_ERROR
    """The stage of an error already certain (a column filled in one row, null in another):
    later chunks skip the work from that stage on."""

    def __init__(self, recipe: Recipe, path: str | Path):
        self.recipe, self.path = recipe, str(path)
        self.rows = 0
        self.sources: dict[str, None] = {}
        self.columns: dict[str, None] = {}

    def count(self, result: ChunkResult, scan: dict[str, Any]) -> None:
        """Add one chunk's rows, sources and column names."""
        self.rows += result.rows
        self.sources.update(dict.fromkeys(scan["sources"]))
        self.columns.update(dict.fromkeys(scan["columns"]))

    def stand_ins(self) -> list[RawRow]:
        """One row per source (the file's path when no row was read), the first holding every
        column: what the column checks and the error messages read of the rows."""
        sources = list(self.sources) or [self.path]
        fields = dict.fromkeys(self.columns)
        return [RawRow(s, 0, fields if i == 0 else {}) for i, s in enumerate(sources)]

    @abstractmethod
    def add(self, result: ChunkResult) -> list[tuple[int, DpokitError]]:
        """Take one chunk's numbers (in chunk order, :meth:`count` first); errors only the
        chunks together show (mixed formats), as ``(stage, error)``."""

    @abstractmethod
    def check(self) -> None:
        """The checks over every row (raise the first error), at the end."""

    @abstractmethod
    def finish(self, count: int) -> None:
        """Log what the chunks logged, added up; raise when no item is left (``count`` 0)."""


class Recipe(ABC):
    """How a loader turns one chunk of rows into items (picklable: workers run it)."""

    item_cls: ClassVar[type]
    global_stage: ClassVar[int]
    """The stage of :meth:`Summary.check`'s errors among the chunks' own."""

    def streams(self, first: RawRow) -> bool:
        """Whether data whose first row is ``first`` can be prepared chunk by chunk (else its
        rows are given to :meth:`process` all at once)."""
        return True

    @abstractmethod
    def process(self, rows: list[RawRow], tokenizer: Any, stop: int,
                records: list[tuple[int, str, tuple]], first: RawRow) -> ChunkResult:
        """The chunk's items (only the stages before ``stop``; ``records``: what was logged;
        ``first``: the data's first row)."""

    @abstractmethod
    def summary(self, path: str | Path) -> Summary:
        """A fresh :class:`Summary` for the rows of ``path``."""


# ------------------------------------------------------------------------------- log records


class _Capture(logging.Filter):
    def __init__(self, records: list[tuple[int, str, tuple]]):
        super().__init__()
        self.records = records

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        self.records.append((record.levelno, str(record.msg), args))
        return False


@contextlib.contextmanager
def captured(records: list[tuple[int, str, tuple]]) -> Iterator[None]:
    """What ``dpokit.data`` logs inside is appended to ``records`` instead of being shown."""
    capture = _Capture(records)
    log.addFilter(capture)
    try:
        yield
    finally:
        log.removeFilter(capture)


def take(records: list[tuple[int, str, tuple]], prefix: str) -> list[tuple[int, str, tuple]]:
    """Remove and return the records whose message starts with ``prefix``."""
    taken = [r for r in records if r[1].startswith(prefix)]
    records[:] = [r for r in records if not r[1].startswith(prefix)]
    return taken


def emit(records: Iterable[tuple[int, str, tuple]]) -> None:
    """Log ``records`` here, as they were logged where the chunk ran."""
    for level, message, args in records:
        log.log(level, message, *args)


# ------------------------------------------------------------------------------------ chunks


def _run(recipe: Recipe, rows: list[RawRow], tokenizer: Any, stop: int,
         first: RawRow) -> ChunkResult:
    records: list[tuple[int, str, tuple]] = []
    with captured(records):
        result = recipe.process(rows, tokenizer, stop, records, first)
    result.records = records
    return result


_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer: bytes) -> None:
    import os
    import signal

    # Ctrl-C reaches the terminal's whole process group: the parent stops the pool (each
    # worker printed a KeyboardInterrupt traceback of its own)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one thread per worker (the processes are the parallelism), unless the user chose
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.setLevel(logging.DEBUG)  # every record is captured and sent back; the parent filters
    _WORKER["tokenizer"] = pickle.loads(tokenizer)


def _work(recipe: Recipe, rows: list[RawRow], stop: int, first: RawRow) -> ChunkResult:
    return _run(recipe, rows, _WORKER["tokenizer"], stop, first)


def _results(recipe: Recipe, chunks: Iterator[list[RawRow]], tokenizer: Any,
             num_proc: int | None, stop: Callable[[], int]) -> Iterator[ChunkResult]:
    """Each chunk's result, in order: here, or in ``num_proc`` worker processes once there is a
    second chunk (a small file never starts them)."""
    head = next(chunks, None)
    if head is None:
        return
    first = head[0]
    if not recipe.streams(first):  # every row at once
        yield _run(recipe, [row for chunk in _prepend([head], chunks) for row in chunk],
                   tokenizer, stop(), first)
        return
    ahead = [head]
    if num_proc and num_proc > 1:
        ahead += [chunk for chunk in (next(chunks, None),) if chunk]
    shipped = None
    if len(ahead) > 1:
        try:
            shipped = pickle.dumps(tokenizer)
        except Exception as error:  # a tokenizer that does not pickle: tokenise here
            log.warning("dataset_num_proc=%d: the tokenizer cannot be sent to worker processes "
                        "(%s); tokenising in this process", num_proc, error)
    if shipped is None:
        for rows in _prepend(ahead, chunks):
            yield _run(recipe, rows, tokenizer, stop(), first)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(shipped,))
    from concurrent.futures.process import BrokenProcessPool

    pending: deque = deque()
    try:
        for rows in _prepend(ahead, chunks):
            pending.append(pool.submit(_work, recipe, rows, stop(), first))
            if len(pending) > 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as error:
        raise DpokitError(f"dataset_num_proc={num_proc}: a tokenising process died ({error}); "
                          f"they are started with 'spawn', which imports the main script "
                          f"again: a script must run its work under "
                          f"`if __name__ == \"__main__\":` (or set dataset_num_proc to "
                          f"null)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prepend(first: list[list[RawRow]], rest: Iterator[list[RawRow]]) -> Iterator[list[RawRow]]:
    yield from first
    yield from rest


# --------------------------------------------------------------------------------- the driver


def load_items(path: str | Path, split: str | None, tokenizer: Any, recipe: Recipe, *,
               settings: Any, key_columns: Any, cache_dir: Path | None,
               progress: bool | None = None, num_proc: int | None = None,
               chunk_rows: int | None = None) -> ItemStore:
    """:func:`prepare_items` through the tokenised-data cache in ``cache_dir`` (keyed by the
    data, the tokenizer, ``settings`` and ``key_columns``), or into unnamed temporary files
    without one — memory-mapped either way (:mod:`dpokit.data.cache`)."""
    from dpokit.data.cache import cached_items, scratch_items

    def build(directory: Path | None, meta: dict[str, Any]) -> ItemStore:
        return prepare_items(path, split, tokenizer, recipe, directory=directory,
                             progress=progress, num_proc=num_proc, chunk_rows=chunk_rows,
                             meta=meta)

    if cache_dir is not None:
        return cached_items(cache_dir, path, split, tokenizer, settings, key_columns,
                            recipe.item_cls, build)
    return scratch_items(build)


def prepare_items(path: str | Path, split: str | None, tokenizer: Any, recipe: Recipe, *,
                  directory: Path | None, progress: bool | None = None,
                  num_proc: int | None = None, chunk_rows: int | None = None,
                  meta: dict[str, Any] | None = None) -> ItemStore:
    """The items of the rows of ``path`` (module docstring), written into ``directory`` (None:
    kept in memory) with ``meta`` in its ``meta.json``."""
    writer = StoreWriter(recipe.item_cls, directory)
    summary = recipe.summary(path)
    held: tuple[int, DpokitError] | None = None
    rows = 0

    def stop() -> int:
        return min(held[0] if held else NO_ERROR, summary.doomed)

    bar = progress_bar(None, total=None, progress=progress, desc="tokenising")
    try:
        chunks = iter_row_chunks(path, split=split, rows=chunk_rows or CHUNK_ROWS,
                                 chars=CHUNK_CHARS)
        for result in _results(recipe, chunks, tokenizer, num_proc, stop):
            rows += result.rows
            errors = summary.add(result)
            if result.error is not None:
                errors.append((result.stage, result.error))
            for stage, error in errors:
                if held is None or stage < held[0]:
                    held = (stage, error)
            if held is None and summary.doomed == NO_ERROR:
                emit(result.records)
                if result.arrays is not None:
                    writer.append(result.arrays)
            bar.update(result.rows)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if rows == 0:
        writer.abort()
        raise DpokitError(f"{path}: no rows")
    if held is not None and held[0] < recipe.global_stage:
        writer.abort()
        raise held[1]
    try:
        summary.check()
        if held is not None:
            raise held[1]
        summary.finish(writer.count)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(**(meta or {}))
