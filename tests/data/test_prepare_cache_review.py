"""The tokenised-data cache and the chunked preparation, from a review (data at scale).

Each test compares against an independent oracle: the same data tokenised afresh, without the
cache, in one chunk and one process (``load_preference_pairs(..., cache_dir=None)``), or the
tokens of the tokenizer itself. Tests marked "old code: ..." failed before the fix; the others
pin behaviour that already held."""

import dataclasses
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import threading
import time

import pytest

import dpokit.data.cache as data_cache
import dpokit.data.prepare as prepare
from dpokit.data import ColumnMap, TokenizeSettings, load_preference_pairs
from dpokit.data.sft import load_sft_sequences
from dpokit.errors import DpokitError
from dpokit.models import load_tokenizer
from tests.helpers import write_jsonl

ROWS = [{"prompt": f"question {i} about the cat", "chosen": f" yes {i} good answer",
         "rejected": " no bad"} for i in range(12)]


@pytest.fixture
def saved(tokenizer, tmp_path):
    """The session tokenizer saved in a directory of its own (only such a tokenizer is
    cached), and a data file."""
    directory = tmp_path / "tok"
    tokenizer.save_pretrained(directory)
    return directory, write_jsonl(tmp_path / "d.jsonl", ROWS)


def entries(cache):
    return sorted(p for p in cache.glob("*") if (p / "meta.json").is_file()) \
        if cache.exists() else []


def fresh(data, tokenizer, **kwargs):
    """The oracle: the same load without the cache."""
    return list(load_preference_pairs(data, tokenizer, **kwargs))


# --- the key: what chooses the tokens, and nothing else ------------------------------------------

@pytest.mark.parametrize("change", ["add_eos_token", "normalizer"])
def test_a_tokenizer_changed_in_memory_is_not_read_from_the_old_entry(saved, tmp_path, change):
    """Old code: the key read the tokenizer's files, template, special tokens and size only, so
    ``tokenizer.add_eos_token = True`` (the post-processor drops BOS and appends EOS) or a
    normaliser set after loading read back the pairs of the unchanged tokenizer — other tokens
    than this tokenizer makes, silently."""
    from tokenizers import normalizers

    directory, _ = saved
    data = write_jsonl(tmp_path / "upper.jsonl", [{**r, "prompt": r["prompt"].upper()}
                                                  for r in ROWS])
    cache = tmp_path / "cache"
    before = list(load_preference_pairs(data, load_tokenizer(directory), cache_dir=cache))
    changed = load_tokenizer(directory)
    if change == "add_eos_token":
        changed.add_eos_token = True
    else:
        changed.backend_tokenizer.normalizer = normalizers.Lowercase()
    expected = fresh(data, changed)
    assert expected != before  # the change does change the tokens
    assert list(load_preference_pairs(data, changed, cache_dir=cache)) == expected


def test_a_call_that_padded_or_truncated_leaves_the_key_alone(saved, tmp_path):
    """Passes: transformers leaves the backend's padding and truncation set after a padded
    call (until its next call); they are not part of the tokens' key."""
    directory, _ = saved
    tokenizer = load_tokenizer(directory)
    before = data_cache.tokenizer_digest(tokenizer)
    tokenizer(["a b c", "a"], padding=True, truncation=True, max_length=2)
    assert tokenizer.backend_tokenizer.truncation is not None  # what the key must not read
    assert data_cache.tokenizer_digest(tokenizer) == before
    assert data_cache.tokenizer_digest(load_tokenizer(directory)) == before  # a fresh load


@pytest.mark.parametrize("change", [
    "chat_template_file", "added_token", "max_length", "max_prompt_length", "truncation_mode",
    "text_mode", "columns", "edited_same_size_and_mtime", "replaced_same_name_and_mtime"])
def test_every_input_that_changes_the_tokens_is_a_new_key(saved, tmp_path, counted,
                                                          monkeypatch, change):
    """Passes: each change is tokenised again (not read from the first entry), and the result
    is what a fresh load gives. The data file is over the digest memo's 1 MiB, so its SHA-256
    is remembered by identity (RACY_S lowered so the memo is written at once): an edit of the
    same size with its mtime put back, or another file renamed onto the name with the old
    mtime, is still a new key (the identity's ctime/inode moved)."""
    import dpokit.digests as digests

    monkeypatch.setattr(digests, "RACY_S", 0.0)
    directory, _ = saved
    filler = "x" * 700
    rows = [{**r, "note": filler} for r in ROWS] * 150  # ~1.1 MB (a column no one reads)
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    assert data.stat().st_size > digests.MEMO_MIN_BYTES
    cache = tmp_path / "cache"
    kwargs = {"settings": TokenizeSettings(max_length=12 if change == "truncation_mode" else None)}
    load_preference_pairs(data, load_tokenizer(directory), cache_dir=cache, **kwargs)
    assert len(counted) == 1 and list((cache / "digests").iterdir())  # the memo is used
    stat = data.stat()
    if change == "chat_template_file":
        (directory / "chat_template.jinja").write_text("{{ messages }}")
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    elif change == "added_token":
        grown = load_tokenizer(directory)
        grown.add_tokens(["answer"])
        grown.save_pretrained(directory)
    elif change in ("max_length", "max_prompt_length"):
        kwargs = {"settings": TokenizeSettings(**{change: 12 if change == "max_length" else 3})}
    elif change == "truncation_mode":
        kwargs = {"settings": dataclasses.replace(kwargs["settings"], truncation_mode="keep_end")}
    elif change == "text_mode":
        kwargs = {"settings": TokenizeSettings(max_length=None, text_mode="plain")}
    elif change == "columns":
        kwargs = {**kwargs, "columns": ColumnMap(chosen="rejected", rejected="chosen")}
    elif change == "edited_same_size_and_mtime":
        with data.open("r+b") as handle:  # in place: the same inode, size and (below) mtime
            handle.seek(len('{"prompt": "question 0 about the '))
            handle.write(b"dog")
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        other = write_jsonl(tmp_path / "other.jsonl",
                            [{**r, "chosen": r["chosen"].replace("good", "fine")} for r in rows])
        os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(other, data)
    if change.startswith(("edited", "replaced")):
        assert (data.stat().st_size, data.stat().st_mtime_ns) == (stat.st_size,
                                                                  stat.st_mtime_ns)
    tokenizer = load_tokenizer(directory)
    got = list(load_preference_pairs(data, tokenizer, cache_dir=cache, **kwargs))
    assert len(counted) == 2, "read from the entry of other inputs"
    assert got == fresh(data, tokenizer, **kwargs)
    assert len(entries(cache)) == 2


@pytest.mark.parametrize("change", ["touched", "chunks_and_processes", "weights_added",
                                    "tokenizer_moved"])
def test_what_does_not_change_the_tokens_keeps_the_key(saved, tmp_path, counted, change):
    """Passes: a new mtime on the same bytes, another chunking or process count, a weights
    file beside the tokenizer, the tokenizer's directory moved: the entry is read (no
    tokenisation), equal to a fresh load."""
    directory, data = saved
    cache = tmp_path / "cache"
    first = list(load_preference_pairs(data, load_tokenizer(directory), cache_dir=cache))
    kwargs = {}
    if change == "touched":
        os.utime(data, (time.time() + 100, time.time() + 100))
    elif change == "chunks_and_processes":
        kwargs = {"chunk_rows": 3, "dataset_num_proc": 2}
    elif change == "weights_added":
        (directory / "model.safetensors").write_bytes(b"weights")
    else:
        directory = shutil.move(directory, tmp_path / "elsewhere")
    tokenizer = load_tokenizer(directory)
    assert list(load_preference_pairs(data, tokenizer, cache_dir=cache, **kwargs)) == first
    assert len(counted) == 1 and first == fresh(data, tokenizer)


# --- builds: killed, concurrent ---------------------------------------------------------------

def test_a_build_of_another_node_with_the_same_pid_is_not_written_into(saved, tmp_path):
    """Old code: a build's temporary directory was named by the pid alone, and each build
    removed that name before making it. Two nodes sharing a cache run their local rank 0 under
    the same pid (containers, most of all): the second build removed the first one's directory
    while it was filling it and wrote into the same name, and the first then described the
    second's half-written files (a ValueError traceback, or a fallback that tokenised it all
    again). Simulated with two threads of this process (one pid): B starts while A is
    building and ends after it. Both get the pairs of a fresh load, the entry is A's, no
    temporary is left."""
    directory, data = saved
    cache = tmp_path / "cache"
    expected = fresh(data, load_tokenizer(directory))
    original = prepare.iter_row_chunks
    b_writing, a_done = threading.Event(), threading.Event()
    results = {}

    def interleaved(path, **kwargs):
        for index, chunk in enumerate(original(path, **kwargs)):
            if threading.current_thread().name == "B" and index == 1:
                b_writing.set()  # B has made its directory and written a chunk
                assert a_done.wait(60)
            if threading.current_thread().name != "B" and index == 1:
                other.start()
                assert b_writing.wait(60)
            yield chunk

    def build(name):
        try:
            results[name] = list(load_preference_pairs(data, load_tokenizer(directory),
                                                       cache_dir=cache, chunk_rows=3))
        except BaseException as error:  # (the failure is the finding)
            results[name] = error
        finally:
            if name == "A":
                a_done.set()

    other = threading.Thread(target=build, args=("B",), name="B")
    prepare.iter_row_chunks = interleaved
    try:
        build("A")
        other.join(60)
    finally:
        prepare.iter_row_chunks = original
    assert results["A"] == expected, results["A"]
    assert results["B"] == expected, results["B"]
    assert len(entries(cache)) == 1 and not list(cache.glob(".*"))
    assert list(load_preference_pairs(data, load_tokenizer(directory),
                                      cache_dir=cache)) == expected


def test_a_dead_build_of_another_host_is_cleared_by_age_not_by_a_pid_here(saved, tmp_path):
    """Old code: a temporary directory was judged by ``os.kill(pid, 0)`` on this host, so one
    left by a killed build on another node whose pid happens to be alive here (this very
    process's, below) was kept forever. Its age now decides (an hour old: removed), one of
    this host's live process is kept, and neither is read: the load gives a fresh load's
    pairs."""
    directory, data = saved
    cache = tmp_path / "cache"
    other = write_jsonl(tmp_path / "o.jsonl", [{**r, "chosen": " other"} for r in ROWS])
    load_preference_pairs(other, load_tokenizer(directory), cache_dir=cache)
    (built,) = entries(cache)
    key = data_cache.items_key(data, None, load_tokenizer(directory), TokenizeSettings(),
                               ColumnMap(), data_digest=data_cache.content_digest(
                                   data, cache / "digests"))
    name = f".tokenizedpair-{key}"
    elsewhere = cache / f"{name}.othernode-0123456789ab.{os.getpid()}.tmp"
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())
    here = cache / f"{name}.{host}-ba9876543210.{os.getpid()}.tmp"
    shutil.copytree(built, elsewhere)  # complete-looking, of other rows: must not be read
    shutil.copytree(built, here)
    old = time.time() - 3600
    for tmp in (elsewhere, here):
        for file in [tmp, *tmp.iterdir()]:
            os.utime(file, (old, old))
    got = list(load_preference_pairs(data, load_tokenizer(directory), cache_dir=cache))
    assert got == fresh(data, load_tokenizer(directory))
    assert not elsewhere.exists()
    assert here.exists()  # this host's pid is alive: a live build


def _build_in_process(data, directory, cache, barrier, out):
    """One of two processes building the same entry at once (a spawned child)."""
    import dpokit.data.prepare as prepare
    from dpokit.data import load_preference_pairs
    from dpokit.models import load_tokenizer

    original = prepare.iter_row_chunks

    def slow(path, **kwargs):
        for chunk in original(path, **kwargs):
            time.sleep(0.05)  # the two builds overlap
            yield chunk

    prepare.iter_row_chunks = slow
    tokenizer = load_tokenizer(directory)
    barrier.wait(60)
    pairs = load_preference_pairs(data, tokenizer, cache_dir=cache, chunk_rows=2)
    out.put([[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), p.row]
             for p in pairs])


def test_two_processes_building_one_entry_at_once_both_get_the_pairs(saved, tmp_path):
    """Passes: two processes (two pids) build the same key at the same time: both get a fresh
    load's pairs, one complete entry remains, no temporary directory, and it reads back."""
    directory, data = saved
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_build_in_process, args=(data, directory, cache,
                                                               barrier, out))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    got = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    expected = [[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), p.row]
                for p in fresh(data, load_tokenizer(directory))]
    assert got == [expected, expected]
    assert len(entries(cache)) == 1 and not list(cache.glob(".*"))
    cached = load_preference_pairs(data, load_tokenizer(directory), cache_dir=cache)
    assert [[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), p.row]
            for p in cached] == expected


# --- the same items and errors in any chunking and process count; honest counts ---------------

RUNS = [{}, {"chunk_rows": 2}, {"chunk_rows": 2, "dataset_num_proc": 2}]


def outcome(call, *args, **kwargs):
    try:
        return list(call(*args, **kwargs))
    except DpokitError as error:
        return str(error)


def test_a_bad_row_in_any_chunk_is_named_alike_in_workers(tokenizer, tmp_path):
    """Passes: a bad row in the first, a middle and the last chunk (and a file of only bad
    rows), pairs and SFT: one process, chunks of 2, two worker processes give the same
    one-line error naming the file and row; good data gives the same items in order."""
    bad = {"prompt": "x", "chosen": 5, "rejected": " y"}
    for position in (0, 5, 11):
        rows = [*ROWS[:position], bad, *ROWS[position:]]
        data = write_jsonl(tmp_path / f"bad{position}.jsonl", rows)
        found = {outcome(load_preference_pairs, data, tokenizer, **kw) for kw in RUNS}
        assert found == {f"{data}, row {position + 1}, field 'chosen': expected a string or a "
                         f"list of messages, got int"}
    data = write_jsonl(tmp_path / "all_bad.jsonl", [bad] * 5)
    assert {outcome(load_preference_pairs, data, tokenizer, **kw) for kw in RUNS} == {
        f"{data}, row 1, field 'chosen': expected a string or a list of messages, got int"}
    data = write_jsonl(tmp_path / "good.jsonl", ROWS)
    pairs = [outcome(load_preference_pairs, data, tokenizer, **kw) for kw in RUNS]
    assert pairs[0] == pairs[1] == pairs[2] and [p.row for p in pairs[0]] == list(range(1, 13))
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
    sft_rows[7]["completion"] = 3
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    found = {outcome(load_sft_sequences, data, tokenizer, **kw) for kw in RUNS}
    assert len(found) == 1 and f"{data}, row 8" in found.pop()


def test_empty_data_and_rows_filtered_by_length_are_counted_honestly(tokenizer, tmp_path,
                                                                      caplog):
    """Passes: an empty file is "no rows" (not an empty store); rows left without a completion
    by max_length are counted over every chunk (3 of 9, in chunks of 2), and when all are, the
    error counts all of them; a cache hit says the same counts again."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert outcome(load_preference_pairs, empty, tokenizer) == f"{empty}: no rows"
    long_prompt = "x " * 30  # over max_length=8 alone: its pair has no completion left
    rows = [{"prompt": long_prompt if i % 3 == 0 else "hi", "chosen": " a", "rejected": " b"}
            for i in range(9)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    settings = TokenizeSettings(max_length=8)
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        pairs = load_preference_pairs(data, tokenizer, settings=settings, chunk_rows=2)
    assert [p.row for p in pairs] == [2, 3, 5, 6, 8, 9]
    assert "dropped 3 of 9 rows" in caplog.text and "9 rows, 6 pairs" in caplog.text
    data = write_jsonl(tmp_path / "all.jsonl", [rows[0]] * 4)
    assert outcome(load_preference_pairs, data, tokenizer, settings=settings,
                   chunk_rows=1).startswith("no rows left after truncation (all 4 had")


def test_a_cache_hit_repeats_the_counts_of_the_build(saved, tmp_path, caplog, counted):
    """Passes: the build's drop count and row/pair counts are said again by a hit."""
    directory, _ = saved
    rows = [{"prompt": "x " * 30 if i % 3 == 0 else "hi", "chosen": " a", "rejected": " b"}
            for i in range(9)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    settings, cache = TokenizeSettings(max_length=8), tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        built = list(load_preference_pairs(data, load_tokenizer(directory), settings=settings,
                                           cache_dir=cache, chunk_rows=2))
        caplog.clear()
        hit = list(load_preference_pairs(data, load_tokenizer(directory), settings=settings,
                                         cache_dir=cache))
    assert hit == built and len(counted) == 5  # five chunks, once
    assert "dropped 3 of 9 rows" in caplog.text and "9 rows, 6 pairs" in caplog.text


def test_a_backend_left_truncating_by_an_earlier_call_does_not_truncate_the_data(tokenizer):
    """After a first batch agreed, ``batch_ids`` called the Rust backend directly — with
    whatever truncation and padding an earlier call of the user's had left set on it, so every
    text came back cut to 4 tokens. The ids must be the tokenizer's own, as a fresh call
    makes them."""
    import copy

    from dpokit.data.tokenize import batch_ids

    tok = copy.deepcopy(tokenizer)
    texts = ["the quick brown fox jumps over the lazy dog", "what color is the sky"]
    want = tok(texts)["input_ids"]
    direct: dict = {}
    assert batch_ids(tok, texts, direct) == want and direct["ok"]
    tok(["the cat sat on the mat"], truncation=True, max_length=4, padding="max_length")
    assert tok.backend_tokenizer.truncation is not None  # the state the call leaves behind
    assert batch_ids(tok, texts, direct) == want


def test_tokenising_workers_leave_ctrl_c_to_the_parent(tokenizer, monkeypatch):
    """Ctrl-C in a terminal signals the whole process group: each ``dataset_num_proc``
    worker printed its own KeyboardInterrupt traceback. A worker ignores SIGINT (the parent
    shuts the pool down and prints its one line)."""
    import pickle
    import signal

    from dpokit.data import prepare

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(prepare.log, "level", prepare.log.level)  # the worker raises it
    try:
        prepare._start_worker(pickle.dumps(tokenizer))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert prepare._WORKER["tokenizer"](["the cat"])["input_ids"] == tokenizer(
            ["the cat"])["input_ids"]
    finally:
        signal.signal(signal.SIGINT, before)
        prepare._WORKER.clear()
