"""The item store on disk, from a review (src/dpokit/data/store.py): items read back exactly —
every field kind, ids past 65,535 and up to 2³¹ − 1, empty fields, one item, no item, a long row
— and an entry altered on disk after it was written is refused (the cache rebuilds it), never
read as other items. The oracle is always independent of the store: the items as Python lists
(the list path ``load_rows`` → ``parse_examples`` → ``tokenize_examples``, or items built by
hand), compared item by item and type by type.

Tests that failed before their fix: ``test_an_empty_store_in_memory_has_no_items`` (a
ValueError from ``np.concatenate``), ``test_a_value_altered_in_a_file_is_refused``,
``test_a_file_extended_or_a_meta_edited_is_refused``,
``test_the_cache_rebuilds_an_entry_altered_in_place`` and
``test_a_large_file_is_checked_at_its_ends_and_between`` (each read the altered items
silently), ``test_a_writer_never_writes_over_a_mapped_store`` (it truncated the files a live
store maps: SIGBUS on the next read), ``test_a_chains_digest_builds_no_item_of_its_store``
(it built every item of the chain as Python objects)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dpokit.data.store as store_module
from dpokit.data import ColumnMap, TokenizedPair, TokenizeSettings, load_preference_pairs
from dpokit.data.formats import parse_examples
from dpokit.data.io import load_rows
from dpokit.data.sft import SFTSequence
from dpokit.data.store import (
    ItemStore,
    StoreWriter,
    chunk_arrays,
    content_digest,
    lengths,
    open_store,
)
from dpokit.data.tokenize import tokenize_examples
from tests.helpers import k_completion_rows, write_jsonl

BIG = 2**31 - 1  # the largest id int32 holds


def store_of(items, directory, cls=None, chunk=2):
    """``items`` through a :class:`StoreWriter` in chunks of ``chunk`` (``directory`` None: in
    memory), returned as written (:meth:`finish`)."""
    cls = cls or type(items[0])
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter(cls, directory)
    for start in range(0, len(items), chunk):
        writer.append(chunk_arrays(items[start:start + chunk], cls))
    return writer.finish()


def assert_exact(got, expected):
    """Item by item equal, and each value of the same Python type (an int a Python int, a
    float a float, None where None)."""
    got = list(got)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a == b
        for name, value in vars(b).items():
            mine = getattr(a, name)
            assert type(mine) is type(value) or (isinstance(value, int | float)
                                                 and type(mine) is float), (name, mine, value)
            if isinstance(value, list):
                assert all(type(t) is int for t in mine)


PAIRS = [
    TokenizedPair([1, 2, 3], [65_535, 65_536, 70_000], [BIG], 0.5, None, "a.jsonl", 1, 0.25, 3),
    TokenizedPair([], [5], [], None, -1.5, "b.jsonl", 2, None, -1),  # empty id fields
    TokenizedPair([0], [BIG, 0, BIG], [7, 8], 1e-300, 1e300, "a.jsonl", 3, 1.0, 3),
    TokenizedPair([9] * 5, [4], [6], 2.0, 0.0, "ü/ñ \"q\".jsonl", 2**40, 0.0, 2**40),
]


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_every_field_kind_reads_back_exactly(tmp_path, where, chunk):
    """Ids past uint16 and at int32's top, empty id lists, None and extreme floats, a source
    table with non-ASCII names, ints past int32 — the same whatever the chunks."""
    store = store_of(PAIRS, tmp_path / "s" if where == "disk" else None, chunk=chunk)
    assert_exact(store, PAIRS)
    if where == "disk":
        assert_exact(open_store(tmp_path / "s", TokenizedPair), PAIRS)
    assert_exact(store[1:3], PAIRS[1:3])
    assert_exact(store[::-1], PAIRS[::-1])
    np.testing.assert_array_equal(lengths(store, "rejected_ids"), [1, 0, 2, 1])
    assert store.digest() == content_digest(PAIRS)


def test_one_item_and_a_long_row_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    long = TokenizedPair(rng.integers(0, BIG, 300_000).tolist(), [1], [2, 3], source="l",
                         row=1)
    assert_exact(store_of([long], tmp_path / "one"), [long])
    assert_exact(open_store(tmp_path / "one", TokenizedPair), [long])
    sft = [SFTSequence([1, 2], [BIG], "s.jsonl", 1), SFTSequence([], [3], "s.jsonl", 2)]
    assert_exact(store_of(sft, tmp_path / "sft"), sft)


def test_an_id_past_int32_is_refused_not_wrapped():
    with pytest.raises(ValueError, match="chosen_ids: a token id outside int32"):
        chunk_arrays([TokenizedPair([1], [BIG + 1], [2])], TokenizedPair)


def test_an_empty_store_in_memory_has_no_items(tmp_path):
    """No chunk appended (every row dropped, or none read): before the fix the in-memory
    writer's finish raised ``need at least one array to concatenate``."""
    for directory in (None, tmp_path / "empty"):
        if directory is not None:
            directory.mkdir()
        store = StoreWriter(TokenizedPair, directory).finish()
        assert len(store) == 0 and list(store) == [] and store == []
        assert store.digest() == content_digest([])
        assert lengths(store, "chosen_ids").tolist() == [] and store.column("weight").size == 0


# --- an entry altered on disk -------------------------------------------------------------

def rewrite(path, edit):
    """``path``'s bytes through ``edit``, as a new file (a store may map the old one)."""
    data = bytearray(path.read_bytes())
    data = edit(data)
    path.unlink()
    path.write_bytes(bytes(data))


def flip_last_byte(data):
    data[-1] ^= 1
    return data


@pytest.mark.parametrize("array", ["chosen_ids", "chosen_ids_offsets", "weight", "weight_set",
                                   "source", "row", "group"])
def test_a_value_altered_in_a_file_is_refused(tmp_path, array):
    """The last byte of one file flipped, its size intact: the last item's last token, its
    weight or whether it has one, its row, its group — or an offset or a source code past any
    valid one (the old checks caught those two). Before the fix the others were read as
    another item."""
    directory = tmp_path / "s"
    store_of(PAIRS, directory)
    rewrite(directory / f"{array}.npy", flip_last_byte)
    with pytest.raises(ValueError, match=rf"{array}\.npy: altered since it was written"):
        open_store(directory, TokenizedPair)


@pytest.mark.parametrize("damage", ["extended", "truncated", "table", "count", "digest"])
def test_a_file_extended_or_a_meta_edited_is_refused(tmp_path, damage):
    directory = tmp_path / "s"
    store_of(PAIRS, directory)
    meta_path = directory / "meta.json"
    if damage == "extended":  # numpy maps only the header's length: read as if intact
        rewrite(directory / "prompt_ids.npy", lambda d: d + b"\0" * 8)
        expected = r"prompt_ids\.npy: \d+ bytes, \d+ when written"
    elif damage == "truncated":
        rewrite(directory / "rejected_ids.npy", lambda d: d[:-4])
        expected = r"rejected_ids\.npy: \d+ bytes"
    else:
        meta = json.loads(meta_path.read_text())
        if damage == "table":  # every item's source renamed
            meta["tables"]["source"] = ["x.jsonl", "y.jsonl", "z.jsonl"]
        elif damage == "count":
            meta["count"] -= 1
        else:  # a resumed run would compare against another data digest
            meta["digests"]["chosen_ids"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
        expected = "meta.json: altered since it was written"
    with pytest.raises(ValueError, match=expected):
        open_store(directory, TokenizedPair)


def test_a_large_file_is_checked_at_its_ends_and_between(tmp_path, monkeypatch):
    """Past ``_WHOLE_FILE`` bytes a file is checksummed by samples: its first and last bytes and
    blocks between. A flip of the first token, the last token, or one in a sampled block is
    refused."""
    monkeypatch.setattr(store_module, "_WHOLE_FILE", 1 << 12)
    monkeypatch.setattr(store_module, "_SAMPLE_BYTES", 256)
    rng = np.random.default_rng(1)
    items = [TokenizedPair([1], rng.integers(0, 1000, 5_000).tolist(), [2], row=i)
             for i in range(8)]  # chosen_ids.npy: 160 kB, 32 samples of 256 B
    directory = tmp_path / "s"
    store_of(items, directory)
    path = directory / "chosen_ids.npy"
    size = path.stat().st_size
    middle = (size - 256) * 16 // 31 + 100  # inside the 17th sampled block
    original = path.read_bytes()
    for position in (128, size - 1, middle):  # (128: the first token past the header)
        def flip(data, position=position):
            data[position] ^= 0x10
            return data
        rewrite(path, flip)
        with pytest.raises(ValueError, match=r"chosen_ids\.npy: altered"):
            open_store(directory, TokenizedPair)
        path.unlink()
        path.write_bytes(original)
        assert_exact(open_store(directory, TokenizedPair), items)


@pytest.fixture
def prefs(workdir):
    return workdir / "prefs.jsonl"


def list_path(path, tokenizer, settings=None, columns=None):
    settings, columns = settings or TokenizeSettings(), columns or ColumnMap()
    examples = parse_examples(load_rows(path), columns, max_row_chars=settings.max_row_chars)
    return tokenize_examples(examples, tokenizer, settings)


def test_the_cache_rebuilds_an_entry_altered_in_place(tmp_path, workdir, prefs, counted, caplog):
    """A cache entry whose token file was altered (same size) is removed with a warning and
    tokenised again: the second run's pairs are the list path's, not the altered ones."""
    import logging

    from dpokit.models import load_tokenizer

    tokenizer = load_tokenizer(workdir / "llama")
    expected = list_path(prefs, tokenizer)
    cache = tmp_path / "cache"
    first = load_preference_pairs(prefs, tokenizer, cache_dir=cache, chunk_rows=16)
    assert_exact(first, expected)
    entry = first.path
    assert len(counted) == 3

    def edit(data):
        data[-4:] = np.array([expected[-1].chosen_ids[-1] + 1], "<i4").tobytes()
        return data
    rewrite(entry / "chosen_ids.npy", edit)
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        again = load_preference_pairs(prefs, tokenizer, cache_dir=cache, chunk_rows=16)
    assert "unusable" in caplog.text and "chosen_ids.npy: altered" in caplog.text
    assert_exact(again, expected)
    assert len(counted) == 6  # tokenised again
    assert_exact(first, expected)  # the first store still maps the files it opened
    third = load_preference_pairs(prefs, tokenizer, cache_dir=cache, chunk_rows=16)
    assert_exact(third, expected) and len(counted) == 6  # the rebuilt entry is read


def test_a_writer_never_writes_over_a_mapped_store(tmp_path):
    """A writer pointed at a directory that holds a store refuses at its first file: writing
    ``wb`` truncated the files a live store maps (a read past the new end is SIGBUS)."""
    directory = tmp_path / "s"
    live = store_of(PAIRS, directory)
    with pytest.raises(FileExistsError):
        StoreWriter(TokenizedPair, directory)
    assert_exact(live, PAIRS)
    assert_exact(open_store(directory, TokenizedPair), PAIRS)


def test_a_store_outlives_its_deleted_files(tmp_path):
    """POSIX: the mapped files stay readable once unlinked (the scratch store and a cache entry
    removed by another process rely on it)."""
    import shutil

    directory = tmp_path / "s"
    store = store_of(PAIRS, directory)
    shutil.rmtree(directory)
    assert_exact(store, PAIRS)
    assert store.digest() == content_digest(PAIRS)


def test_a_chains_digest_builds_no_item_of_its_store(tmp_path, monkeypatch):
    """``store + pairs`` digested a block at a time, the store's part as arrays: the digest of
    the same items as one list, without building one item of the store (before the fix
    ``content_digest(list(chain))`` held every item of the data as Python objects)."""
    store = store_of(PAIRS, tmp_path / "s")
    extra = [TokenizedPair([4], [5, 6], [7], 3.0, None, "c.jsonl", 9, None, -1)]
    cases = [(store + extra, PAIRS + extra), (extra + store[1:], extra + PAIRS[1:]),
             (store[::2] + extra + store, PAIRS[::2] + extra + PAIRS)]
    expected = [(content_digest(items), content_digest(items, exclude=("source", "row")),
                 content_digest(items, fields=("chosen_ids",))) for _, items in cases]

    def no_item(self, i):
        raise AssertionError("an item was built")

    monkeypatch.setattr(ItemStore, "_item", no_item)
    monkeypatch.setattr(store_module, "_BLOCK", 2)  # several blocks per part
    for (chain, _), digests in zip(cases, expected, strict=True):
        assert (chain.digest(), content_digest(chain, exclude=("source", "row")),
                content_digest(chain, fields=("chosen_ids",))) == digests


# --- the pipeline into a store: the list path's items -------------------------------------

def test_k_completion_groups_through_the_cache_are_the_list_paths(tmp_path, workdir):
    """Rows of k scored completions (parsed whole) go into the same store: pairs, groups and
    weights item by item the list path's, from the build and from the cache hit."""
    from dpokit.models import load_tokenizer

    tokenizer = load_tokenizer(workdir / "llama")
    path = tmp_path / "k.jsonl"
    write_jsonl(path, k_completion_rows(9))
    columns = ColumnMap(pairs_from_scores="all")
    expected = list_path(path, tokenizer, columns=columns)
    assert len({p.group for p in expected}) == 9 and len(expected) > 9
    for _ in range(2):  # built, then read
        got = load_preference_pairs(path, tokenizer, columns=columns, cache_dir=tmp_path / "c",
                                    chunk_rows=2)
        assert_exact(got, expected)
        assert got.digest() == content_digest(expected)


_BUILDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import dpokit.data.pipeline as pipeline
    from dpokit.data import load_preference_pairs
    from dpokit.models import load_tokenizer

    tokenizer_dir, data, cache, ready, go, out = sys.argv[1:]
    tokenizer = load_tokenizer(tokenizer_dir)
    original = pipeline.tokenize_examples

    def slow(*args, **kwargs):  # both builds overlap
        time.sleep(0.3)
        return original(*args, **kwargs)

    pipeline.tokenize_examples = slow
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.02)
    pairs = load_preference_pairs(data, tokenizer, cache_dir=Path(cache), chunk_rows=8)
    Path(out).write_text(json.dumps([vars(p) for p in pairs]))
""")


def test_two_processes_building_one_entry_both_get_the_list_paths_pairs(tmp_path, workdir,
                                                                       prefs):
    """Two processes miss the same entry at once and both build it: each gets the list path's
    pairs, one complete entry is left and no temporary directory."""
    from dpokit.models import load_tokenizer

    expected = [vars(p) for p in list_path(prefs, load_tokenizer(workdir / "llama"))]
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(workdir / "llama"),
                               str(prefs), str(cache), str(tmp_path / f"ready{k}"), str(go),
                               str(tmp_path / f"out{k}.json")], env=env) for k in range(2)]
    try:
        import time

        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{k}").exists() for k in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        go.touch()
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for k in range(2):
        assert json.loads((tmp_path / f"out{k}.json").read_text()) == expected
    names = sorted(p.name for p in cache.iterdir() if p.name != "digests")
    assert len(names) == 1 and not names[0].startswith("."), names
    assert [vars(p) for p in open_store(cache / names[0], TokenizedPair)] == expected
