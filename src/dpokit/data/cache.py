"""Tokenised data cached on disk — preference pairs and SFT sequences: a second run over the same
data, with the same tokenizer and tokenisation settings, reads them back instead of reading,
validating and tokenising the rows again (issue 14).

The key (:func:`items_key`) is a digest of everything the pairs depend on: the data's *content*
(every file's SHA-256, so an edit in place is a new key whatever its size or time stamp; a large
file's is remembered by its identity on the file system, :mod:`dpokit.digests`), the split,
the tokenizer's files (every file of its directory but weights: ``tokenizer.json``, its
config and chat template, vocabularies, a remote-code tokenizer's module), the
tokenisation settings (``max_row_chars`` included: a lower limit must refuse again), the column
names and whatever else chooses the tokens (SFT's loss span), the kind of item, the path as given
(the items name it in their messages), the source of dpokit's data modules and the versions of
transformers, tokenizers and jinja2, dpokit's version and this file's format. The tokenizer's class,
chat template, special tokens, size, BOS/EOS flags and its backend's serialised pipeline are read
from the loaded tokenizer too (a change made in memory: ``add_eos_token = True``), and a
template that renders today's date (``strftime_now``) keys on the date. A tokenizer that is not
a local directory gets no key, and its pairs are not cached (:func:`scratch_items`). An entry
is a directory of flat arrays (:mod:`dpokit.data.store`: ``.npy`` files, no pickles, and
``meta.json``), written chunk by chunk into a temporary sibling of its own (named by host, pid
and a random token: no other build, on any node, writes into it) and renamed into place when
complete, then read memory-mapped (a hit builds no Python object per item); an unreadable or
inconsistent entry is removed with a warning and rebuilt, never read, and the temporary
directory of a build whose process died is removed by a later build. The data's digest is taken
again after a build: data rewritten while it was read is refused in one line and nothing is
cached. Under ``torchrun`` a node's local rank 0 builds a missing entry while the node's
other ranks wait for it (:class:`NodePeers`). What a build says about the data (rows dropped,
identical completions, shortened prompts, counts) is stored in the entry and said again by
every run that reads it. Data whose digest cannot be taken (an unreadable file in its
directory) is prepared without the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dpokit.data.store import ItemStore, open_store

log = logging.getLogger("dpokit.data")

FORMAT = 2
"""2: a memory-mapped store directory (:mod:`dpokit.data.store`), SHA-256 keys."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                    ".onnx", ".lock")
"""Files of a tokenizer's directory the key leaves out: weights (a model directory's; they do
not choose tokens and would cost a read of gigabytes) and locks. Everything else is in it —
``tokenizer.json`` and its config, vocabularies (``*.tiktoken``, ``*.model``, ``vocab.*``,
``merges.txt``), chat templates, and a remote-code tokenizer's ``tokenization_*.py``."""
_CHUNK = 1 << 20


def _file_digest(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)


def content_digest(path: Path, memo_dir: Path | None = None) -> str:
    """A digest of a file's bytes, or of every file under a directory (names and each file's
    SHA-256; hidden files and ``.lock`` files left out). ``memo_dir``: each large file's SHA-256
    is remembered there by its identity on the file system (:func:`dpokit.digests.file_sha256`:
    a file written in place in any way is read again), so a second start over gigabytes of data
    does not read them all to key the cache."""
    from dpokit.digests import file_sha256

    digest = hashlib.sha256(b"files-v2\0")  # SHA-256: ~1.4 GB/s here (SHA extensions)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)
        and p.suffix != ".lock")
    for file in files:
        name = file.relative_to(path) if file != path else file.name
        digest.update(f"{name}\0{file_sha256(file, memo_dir)}\0".encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A digest of the files that define ``tokenizer`` in its directory, or None when it was not
    loaded from a local directory (then nothing is cached)."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name or not Path(name).is_dir():
        return None
    directory = Path(name)
    files = sorted(p for p in directory.iterdir() if p.is_file()
                   and not p.name.startswith(".") and not p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=20)
    for file in files:
        digest.update(f"{file.name}\0".encode())
        _file_digest(file, digest)
    # what may have changed in memory after loading (or differs between two loads of the same
    # files: use_fast): the class, template, special tokens, size and the backend's pipeline
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(_loaded_state(tokenizer), sort_keys=True, default=str).encode())
    if isinstance(template, str) and "strftime_now" in template:  # it renders today's date
        import datetime

        digest.update(datetime.date.today().isoformat().encode())
    return digest.hexdigest()


def _loaded_state(tokenizer: Any) -> list[Any]:
    """What of a loaded tokenizer chooses tokens beyond its files: its class, chat template,
    special tokens (named and extra), size, BOS/EOS flags and, for a Rust-backed tokenizer, a
    digest of the backend's serialised pipeline (normaliser, pre-tokeniser, model, added tokens,
    post-processor, decoder; not the padding and truncation an earlier call left set) —
    ``tokenizer.add_eos_token = True`` or a normaliser set after loading rewrites the
    post-processor or the pieces without touching a file."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None and (backend.truncation is not None
                                    or backend.padding is not None):
            # left set by the last call that padded or truncated (transformers resets them at
            # its next call): not what the data's tokens are made with — keyed without them
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        pipeline = (hashlib.sha256(backend.to_str().encode()).hexdigest()
                    if backend is not None else None)
    except Exception:  # a backend that does not serialise: the rest still keys it
        pipeline = None
    added = getattr(tokenizer, "get_added_vocab", None)
    try:
        added = added() if callable(added) and pipeline is None else None
    except Exception:
        added = None
    return [f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
            getattr(tokenizer, "chat_template", None),
            getattr(tokenizer, "special_tokens_map", {}),
            getattr(tokenizer, "extra_special_tokens", None), len(tokenizer),
            *(getattr(tokenizer, name, None)
              for name in ("add_bos_token", "add_eos_token", "split_special_tokens")),
            pipeline, added]


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
              columns: Any, kind: str = "TokenizedPair", *, data_digest: str) -> str | None:
    """The cache key of the items of ``data`` (module docstring), or None when the tokenizer has
    no files to key on. ``data_digest``: :func:`content_digest` of ``data`` (the caller takes
    it again after a build, to compare)."""
    from dpokit import __version__

    tokenizer_id = tokenizer_digest(tokenizer)
    if tokenizer_id is None:
        return None
    parts = {"format": FORMAT, "dpokit": __version__, "code": code_digest(),
             "path": str(data), "data": data_digest,
             "split": split, "tokenizer": tokenizer_id, "settings": settings.to_dict(),
             "columns": asdict(columns) if dataclasses.is_dataclass(columns) else columns,
             "kind": kind}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _host() -> str:
    """This host's name as a build's temporary directory carries it (no dots, no dashes)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _build_dir(entry: Path) -> Path:
    """A temporary directory name for one build of ``entry``, unique to the build:
    ``.<entry>.<host>-<random>.<pid>.tmp``. The pid alone is not: two nodes of a job (their
    containers most of all) run their local rank 0 under the same pid, and with a shared cache
    one build would remove and write into the other's directory while it is being filled."""
    return entry.with_name(f".{entry.name}.{_host()}-{uuid.uuid4().hex[:12]}.{os.getpid()}.tmp")


_STALE_SECONDS = 600
"""A build's temporary directory untouched this long, its process gone, is a dead build's."""


def _stale_builds(cache_dir: Path, cls: type) -> None:
    """Remove the temporary directories of builds (of any key) whose process is gone — killed
    mid-build: nothing renamed them into place, nothing will. A directory written to in the
    last :data:`_STALE_SECONDS` is left alone (a build on another host of a shared disk)."""
    import time

    from dpokit.atomic import discard

    here = _host()
    for tmp in cache_dir.glob(f".{cls.__name__.lower()}-*.tmp"):
        parts = tmp.name.split(".")  # ["", entry, (host-token,) pid, "tmp"]
        host = parts[2].rsplit("-", 1)[0] if len(parts) == 5 else here
        try:
            if host == here:  # another host's pid means nothing here: its age alone says
                os.kill(int(parts[-2]), 0)
                continue  # alive (or not a pid of ours to judge)
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        try:
            newest = max([tmp.stat().st_mtime, *(f.stat().st_mtime for f in tmp.iterdir())])
        except OSError:
            continue
        if time.time() - newest > _STALE_SECONDS:
            discard(tmp)


def load_entry(entry: Path, key: str, cls: type) -> ItemStore | None:
    """The items cached in the directory ``entry``, memory-mapped, or None when there is no
    entry — or an unreadable or inconsistent one, which is then removed (a warning names it) so
    that it is rebuilt."""
    from dpokit.atomic import discard

    if not entry.exists():
        return None
    try:
        return open_store(entry, cls, key=key)
    except Exception as error:  # a truncated or foreign file: numpy and json raise their own
        log.warning("tokenised-data cache entry %s is unusable (%s: %s); removed, tokenising "
                    "again", entry, type(error).__name__, error)
        discard(entry)
        return None


def cached_items(cache_dir: Path, path: str | Path, split: str | None, tokenizer: Any,
                 settings: Any, columns: Any, cls: type,
                 build: Callable[[Path | None, dict[str, Any]], Sequence[Any]]
                 ) -> Sequence[Any]:
    """The items (``cls``: :class:`TokenizedPair`, ``SFTSequence``) of the data ``path`` names
    (a file, a directory or a cached hub dataset) from ``cache_dir`` when an entry of their key
    is there, memory-mapped; else ``build(directory, meta)`` writes them into a temporary
    directory that is renamed into place once complete. A failed write only warns (the items
    are then built without the cache, :func:`scratch_items`); data that is not there is
    ``build``'s to refuse. ``columns``: whatever else chose the items (column names, loss-span
    settings), as a dataclass or a dict."""
    from dpokit.hub import locate

    data = locate(path, repo_type="dataset")
    if not data.exists():
        return scratch_items(build)
    try:
        digest = content_digest(data, cache_dir / "digests")
        key = items_key(data, split, tokenizer, settings, columns, cls.__name__,
                        data_digest=digest)
    except OSError as error:  # e.g. an unreadable file the loader may never read: its call
        log.warning("could not key the tokenised-data cache on %s (%s); preparing the data "
                    "without the cache", getattr(error, "filename", None) or data,
                    error.strerror or error)
        return scratch_items(build)
    if key is None:
        return scratch_items(build)
    entry = cache_dir / f"{cls.__name__.lower()}-{key}"
    peers = node_peers(key, json.dumps([str(data), split, cls.__name__]))
    if peers is not None and peers.leader:
        peers.announce()
    items = load_entry(entry, key, cls)
    waiting = items is None and peers is not None and not peers.leader  # local rank 0 builds
    if waiting and peers.wait(data):
        items = load_entry(entry, key, cls)
    try:
        if items is not None:
            _replay(entry)
            log.info("%s: %d tokenised examples read from %s (same data, tokenizer and "
                     "settings as an earlier run)", data, len(items), entry)
            return items
        return _build_entry(data, digest, key, entry, cls, build)
    finally:  # read, built, refused or not cacheable: the node's other ranks go on
        if peers is not None and peers.leader:
            peers.done()


def _build_entry(data: Path, digest: str, key: str, entry: Path, cls: type,
                 build: Callable[[Path | None, dict[str, Any]], Sequence[Any]]
                 ) -> Sequence[Any]:
    """:func:`cached_items`' build of a missing ``entry``."""
    from dpokit.atomic import discard, replace

    cache_dir = entry.parent
    tmp = _build_dir(entry)
    built = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _stale_builds(cache_dir, cls)
        tmp.mkdir()
        with _recorded() as messages:
            built = build(tmp, {"key": key})
        # rewritten while it was read (its identity moved): the items may mix
        if content_digest(data, cache_dir / "digests") != digest:
            from dpokit.errors import DpokitError

            raise DpokitError(f"{data} changed while it was being tokenised (its content "
                              f"differs from when this run read it first); nothing was cached "
                              f"— run again once it is written")
        (tmp / MESSAGES).write_text(json.dumps(messages), encoding="utf-8")
        if (items := _built_meanwhile(entry, key, cls)) is not None:
            discard(tmp)
            return items
        replace(tmp, entry)
        return open_store(entry, cls, key=key)
    except OSError as error:  # a full disk must not stop a run that has its data
        if (items := _built_meanwhile(entry, key, cls)) is not None:
            discard(tmp)
            return items
        if built is not None and tmp.is_dir():  # complete, only not cached (fsync, rename)
            log.warning("could not cache the tokenised data in %s: %s; training on it "
                        "without caching it", entry, error.strerror or error)
            return _unlinked(built, tmp)
        discard(tmp)
        log.warning("could not cache the tokenised data in %s: %s; preparing it without the "
                    "cache", entry, error.strerror or error)
        return scratch_items(build)
    except BaseException:
        discard(tmp)  # an error in the data, or an interruption: no entry, nothing left
        raise


@dataclasses.dataclass(frozen=True)
class NodePeers:
    """The processes of one node of a ``torch.distributed`` job that need the same missing
    entry: the node's local rank 0 (``leader``) builds it while the others wait for it, then read
    it — the data is tokenised once a node, not once a rank (a shared cache directory across
    nodes: once a node, the later entry reading the earlier, :func:`_built_meanwhile`). The
    signals go through the job's key-value store (``torch.distributed``'s default store); the
    entry itself through the cache directory. The leader first says which key it found for the
    data (``source``: a name of the data, split and kind, not of their content), so a rank whose
    key differs — the data changed between the two reads — refuses in one line rather than
    wait for an entry nobody builds, or train on other rows than its peers."""

    store: Any
    name: str
    """Set by the leader once it is done with the entry ``key``."""
    source: str
    """Set by the leader to the key it found for this data."""
    key: str
    leader: bool

    WAIT_LOG_S = 60.0
    """A waiting rank says so this often."""
    START_GRACE_S = 30.0
    """How long a waiting rank gives the leader to reach the same data (the ranks run the same
    code before it); past it, with no word of the leader on this data, it tokenises itself."""

    def announce(self) -> None:
        """The leader: the key it found for the data (before it reads or builds the entry)."""
        self._set(self.source, self.key)

    def done(self) -> None:
        """The leader: the entry is built — or could not be (bad data, a full disk), and then
        every waiting rank goes on to do what the leader did (refuse, or prepare without it)."""
        self._set(self.name, "1")

    def _set(self, name: str, value: str) -> None:
        try:
            self.store.set(name, value)
        except Exception as error:  # the store gone: the job is ending anyway
            log.debug("could not signal %s to the other ranks: %s", name, error)

    def wait(self, data: Path) -> bool:
        """Wait for the leader's :meth:`done`; False (this rank then builds the entry itself)
        when the store fails (the job's rank 0 gone) or the leader has not reached this data
        after :data:`START_GRACE_S`. The leader found another key for it: a one-line error."""
        import time
        from datetime import timedelta

        from dpokit.errors import DpokitError

        start = said = time.monotonic()
        step = min(self.WAIT_LOG_S, self.START_GRACE_S, 5.0)
        while True:
            asked = time.monotonic()
            try:
                self.store.wait([self.name], timedelta(seconds=step))
                return True
            except Exception as error:  # a timeout: still building; anything else: no store
                now = time.monotonic()
                if now - asked < 0.9 * step:
                    log.warning("could not wait for local rank 0 to tokenise %s (%s); "
                                "tokenising here too", data, error)
                    return False
            try:
                theirs = (self.store.get(self.source).decode()
                          if self.store.check([self.source]) else None)
            except Exception:
                theirs = None
            if theirs is not None and theirs != self.key:
                raise DpokitError(f"{data} changed between this rank's read and local rank "
                                  f"0's (their contents differ); run again once it is written")
            if theirs is None and now - start >= self.START_GRACE_S:
                log.warning("local rank 0 has not reached %s after %.0f s; tokenising it here "
                            "too", data, now - start)
                return False
            if now - said >= self.WAIT_LOG_S:
                said = now
                log.info("waiting for local rank 0 to tokenise %s (%.0f s so far)", data,
                         now - start)


def node_peers(key: str, source: str) -> NodePeers | None:
    """The :class:`NodePeers` of the entry ``key`` (of the data, split and kind ``source``
    names) under a ``torch.distributed`` job of more than one process started with
    ``LOCAL_RANK`` set (torchrun); None otherwise (then this process builds what it needs, as
    in one process)."""
    import os
    import sys

    dist = sys.modules.get("torch.distributed")  # (never imported for this)
    local = os.environ.get("LOCAL_RANK")
    if (dist is None or local is None or not dist.is_available() or not dist.is_initialized()
            or dist.get_world_size() < 2):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, local_rank = dist.get_rank(), int(local)
    except Exception:  # a store-less group or a foreign LOCAL_RANK: each rank on its own
        return None
    if not 0 <= local_rank <= rank:
        return None
    # torchrun numbers a node's ranks consecutively: its local rank 0 is rank − local rank
    node = rank - local_rank
    named = hashlib.sha256(source.encode()).hexdigest()[:32]
    return NodePeers(store, f"dpokit/tokenised/{key}/{node}",
                     f"dpokit/tokenised-source/{named}/{node}", key, local_rank == 0)


def _built_meanwhile(entry: Path, key: str, cls: type) -> ItemStore | None:
    """The entry another process (another rank of the same run, most often) completed while
    this one built the same key: read it rather than replace it or tokenise again."""
    if not entry.exists():
        return None
    return load_entry(entry, key, cls)


MESSAGES = "messages.json"
"""An entry's file of what its build said about the data (dropped rows, identical completions,
shortened prompts, counts), said again when a later run reads the entry."""


@contextlib.contextmanager
def _recorded() -> Iterator[list[tuple[int, str]]]:
    """The ``dpokit.data`` log records (level ≥ INFO, as emitted) of the block, as ``(level,
    message)``, for :data:`MESSAGES`."""
    messages: list[tuple[int, str]] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.INFO:
                messages.append((record.levelno, record.getMessage()))

    handler = Recorder()
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


def _replay(entry: Path) -> None:
    """Say again what the build of ``entry`` said about the data (an entry written before
    :data:`MESSAGES` existed has none)."""
    try:
        messages = json.loads((entry / MESSAGES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for level, message in messages:
        log.log(int(level), "%s", message)


def scratch_items(build: Callable[[Path | None, dict[str, Any]], Sequence[Any]]
                  ) -> Sequence[Any]:
    """Items without a cache: ``build(directory, {})`` into a fresh temporary directory that is
    removed as soon as the store has mapped its files (they live on, unnamed, until the store is
    garbage-collected), so memory stays that of one chunk whatever the size of the data; the
    disk space is the store's (~4 bytes a token) for as long. Where the temporary directory
    cannot be written (a full disk), the arrays are built in memory."""
    import tempfile

    from dpokit.atomic import discard

    try:
        directory = Path(tempfile.mkdtemp(prefix="dpokit-items-"))
    except OSError:
        return build(None, {})
    try:
        items = build(directory, {})
    except OSError as error:
        discard(directory)
        log.warning("could not write the tokenised data to %s (%s); preparing it in memory",
                    directory, error.strerror or error)
        return build(None, {})
    except BaseException:
        discard(directory)
        raise
    return _unlinked(items, directory)


def _unlinked(items: Sequence[Any], directory: Path) -> Sequence[Any]:
    """``items``, memory-mapped from the files of ``directory``, with ``directory`` removed:
    at once on POSIX (mapped files stay readable, unnamed, until unmapped), else when
    ``items`` is garbage-collected."""
    import shutil
    import weakref

    from dpokit.atomic import discard

    try:
        shutil.rmtree(directory)  # POSIX: the mapped files stay readable until unmapped
    except OSError:  # (Windows keeps mapped files: removed when the store is gone)
        weakref.finalize(items, discard, directory)
    return items
