"""The tokenised-data cache against the ways a cached run could differ from an uncached one
(found by a review): data rewritten during the build, a hit that forgets the build's warnings,
unreadable files outside the data, tokenizer files the key left out."""

import json
import logging
import pathlib

import pytest

import dpokit.data.prepare as prepare
from dpokit.data import TokenizeSettings, load_preference_pairs
from dpokit.errors import DpokitError
from dpokit.models import load_tokenizer
from tests.helpers import write_jsonl

ROWS = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " no"},
        {"prompt": "why is the sun red?", "chosen": " dust", "rejected": " the sea is red"},
        {"prompt": "a bird", "chosen": " flew", "rejected": " sat on a tree today"}]
EDITED = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in ROWS]


def test_data_changed_while_it_is_tokenised_is_refused_and_not_cached(workdir, tmp_path,
                                                                     monkeypatch):
    """The key digests the file before the build reads it: a file rewritten in between (an
    edit, a checkout, a regenerated file) would have its new rows stored under the old
    content's key, and a later run over the old content would read them. The digest is taken
    again after the build: a change is a one-line error, nothing is cached, and the next run
    tokenises what is there."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tokenizer, cache = load_tokenizer(workdir / "llama"), tmp_path / "cache"
    original = prepare.iter_row_chunks

    def edited_meanwhile(path, **kwargs):
        write_jsonl(data, EDITED)  # after items_key hashed ROWS, before the rows are read
        return original(path, **kwargs)

    monkeypatch.setattr(prepare, "iter_row_chunks", edited_meanwhile)
    with pytest.raises(DpokitError, match=r"d\.jsonl changed while it was being tokenised"):
        load_preference_pairs(data, tokenizer, cache_dir=cache)
    assert list(cache.iterdir()) == []  # no entry, no temporary left
    monkeypatch.setattr(prepare, "iter_row_chunks", original)
    write_jsonl(data, ROWS)  # the content the key was made of
    cached = load_preference_pairs(data, tokenizer, cache_dir=cache)
    assert list(cached) == list(load_preference_pairs(data, tokenizer))


def test_a_cache_hit_still_warns_about_the_data(workdir, tmp_path, caplog):
    """An uncached run warns of rows dropped by truncation and of identical completions; the
    same run from the cache says so again (the build's messages are stored in the entry)."""
    rows = [*ROWS, {"prompt": "a", "chosen": " same", "rejected": " same"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    tokenizer, cache = load_tokenizer(workdir / "llama"), tmp_path / "cache"
    settings = TokenizeSettings(max_length=4)
    load_preference_pairs(data, tokenizer, settings=settings, cache_dir=cache)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        load_preference_pairs(data, tokenizer, settings=settings, cache_dir=cache)
    assert "read from" in caplog.text  # a hit
    assert "identical chosen and rejected" in caplog.text
    assert "dropped 1 of 4 rows" in caplog.text


def test_an_unreadable_file_the_loader_never_reads_does_not_fail_the_cached_run(
        workdir, tmp_path, monkeypatch, caplog):
    """A data directory holding a file that is not data and cannot be read (root cannot make
    one with chmod, hence the patch): without the cache the shards load; with it the key's
    digest of every file cannot be taken, so the data is prepared without the cache (a
    warning naming the file) — not a bare PermissionError."""
    directory = tmp_path / "data"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", ROWS)
    (directory / "notes.txt").write_text("not data")
    tokenizer = load_tokenizer(workdir / "llama")
    opened = pathlib.Path.open

    def unreadable(self, *args, **kwargs):
        if self.name == "notes.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", unreadable)
    expected = load_preference_pairs(directory, tokenizer)
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        got = load_preference_pairs(directory, tokenizer, cache_dir=tmp_path / "cache")
    assert list(got) == list(expected)
    assert "could not key the tokenised-data cache on" in caplog.text
    assert "notes.txt" in caplog.text


def test_a_remote_code_tokenizers_files_are_in_the_key(tmp_path):
    """Qwen-1's layout (trust_remote_code): its vocabulary is ``qwen.tiktoken`` and its code
    ``tokenization_qwen.py`` — names no fixed list of tokenizer files holds; replacing either
    is a new key. Weights are left out (a new checkpoint's tokens are the same)."""
    from dpokit.data.cache import tokenizer_digest

    directory = tmp_path / "qwen"
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    (directory / "qwen.tiktoken").write_text("IQ== 0\nIg== 1\n")
    (directory / "tokenization_qwen.py").write_text("SPECIAL = 1\n")

    class Loaded:  # what a loaded tokenizer shows tokenizer_digest
        name_or_path, chat_template, special_tokens_map = str(directory), None, {}

        def __len__(self):
            return 2

    before = tokenizer_digest(Loaded())
    (directory / "qwen.tiktoken").write_text("Ig== 0\nIQ== 1\n")  # the ids swapped
    after_vocab = tokenizer_digest(Loaded())
    (directory / "tokenization_qwen.py").write_text("SPECIAL = 2\n")
    assert after_vocab != before
    after_code = tokenizer_digest(Loaded())
    assert after_code != after_vocab
    (directory / "model.safetensors").write_bytes(b"weights")
    assert tokenizer_digest(Loaded()) == after_code


def test_an_entry_another_process_completed_meanwhile_is_read_not_replaced(
        workdir, tmp_path, monkeypatch, caplog):
    """Every rank of a torchrun job prepares the same data at once: the entry a faster one
    put in place while this one was building is read (not replaced, not tokenised again, no
    warning), and it holds the same items."""
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tokenizer, cache, other = (load_tokenizer(workdir / "llama"), tmp_path / "cache",
                               tmp_path / "other")
    load_preference_pairs(data, tokenizer, cache_dir=other)  # the faster rank's entry
    (entry,) = other.glob("tokenizedpair-*")
    (entry / "marker").write_text("the faster rank's")
    original = prepare.iter_row_chunks

    def faster_rank_finishes(path, **kwargs):
        shutil.copytree(entry, cache / entry.name)
        return original(path, **kwargs)

    monkeypatch.setattr(prepare, "iter_row_chunks", faster_rank_finishes)
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        items = load_preference_pairs(data, tokenizer, cache_dir=cache)
    assert (cache / entry.name / "marker").exists()  # read, not replaced
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary left
    assert "could not cache" not in caplog.text
    monkeypatch.undo()
    assert list(items) == list(load_preference_pairs(data, tokenizer))
