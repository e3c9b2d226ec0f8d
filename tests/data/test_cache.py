"""The tokenised-data cache (issue 14): a second load of the same data with the same tokenizer
and settings reads the pairs back — equal to tokenising again — and any change to what the
pairs depend on is a new key; a broken entry is rebuilt, never read."""

import json
import logging
import shutil

import pytest

import dpokit.data.pipeline as pipeline
from dpokit.data import ColumnMap, TokenizeSettings, load_preference_pairs
from dpokit.models import load_tokenizer

ROWS = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " no", "weight": 2.0},
        {"prompt": "why is the sun red?", "chosen": " dust", "rejected": " the sea is red",
         "weight": 1.0},
        {"prompt": "a bird", "chosen": " flew", "rejected": " sat on a tree today",
         "weight": 0.25}]


@pytest.fixture
def setup(workdir, tmp_path, counted):
    """A data file, a tokenizer loaded from its own directory (a copy, to edit), and a counter
    of the tokenisations that really ran."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    model = tmp_path / "model"
    shutil.copytree(workdir / "llama", model)
    return data, model, counted


def entries(cache):
    """The complete entries of a cache directory (one directory each, ``meta.json`` inside)."""
    return sorted(p for p in cache.glob("*") if (p / "meta.json").is_file()) if cache.exists() \
        else []


def load(data, model, cache, **settings):
    return load_preference_pairs(data, load_tokenizer(model),
                                 settings=TokenizeSettings(**settings), cache_dir=cache)


def test_a_second_load_reads_the_same_pairs_back(setup, tmp_path, caplog):
    data, model, calls = setup
    cache = tmp_path / "cache"
    first = load(data, model, cache)
    assert len(calls) == 1 and len(entries(cache)) == 1
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        second = load(data, model, cache)
    assert len(calls) == 1  # nothing tokenised
    assert second == first == load(data, model, None)  # every field, None weights included
    assert [p.weight for p in second] == [2.0, 1.0, 0.25] and second[0].margin is None
    assert "read from" in caplog.text


@pytest.mark.parametrize("change", ["data", "tokenizer", "settings", "split", "columns"])
def test_what_the_pairs_depend_on_is_in_the_key(setup, tmp_path, change):
    """An edit of the data in place with the same size, of the tokenizer's chat template, a
    tokenisation setting, the split or a column name: tokenised again, and the result is what a
    fresh tokenisation gives."""
    data, model, calls = setup
    cache = tmp_path / "cache"
    load(data, model, cache)
    settings, columns, split = {}, ColumnMap(), None
    if change == "data":
        text = data.read_text()
        data.write_text(text.replace("the cat", "the dog"))  # same size, new content
        assert len(text) == len(data.read_text())
    elif change == "tokenizer":
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = (config.get("chat_template") or "") + " "
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    elif change == "settings":
        settings = {"max_length": 6}
    elif change == "split":
        split = "train"
    else:
        columns = ColumnMap(chosen="rejected", rejected="chosen")  # swapped
    got = load_preference_pairs(data, load_tokenizer(model), settings=TokenizeSettings(
        **settings), columns=columns, split=split, cache_dir=cache)
    assert len(calls) == 2
    assert got == load_preference_pairs(data, load_tokenizer(model), settings=TokenizeSettings(
        **settings), columns=columns, split=split)
    assert len(entries(cache)) == 2


def test_a_broken_entry_is_removed_and_rebuilt(setup, tmp_path, caplog):
    data, model, calls = setup
    cache = tmp_path / "cache"
    first = list(load(data, model, cache))  # (the store maps the files truncated below)
    (entry,) = entries(cache)
    tokens = entry / "chosen_ids.npy"
    tokens.write_bytes(tokens.read_bytes()[:140])  # truncated
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        again = load(data, model, cache)
    assert again == first and len(calls) == 2
    assert "unusable" in caplog.text and str(entry) in caplog.text
    assert load(data, model, cache) == first and len(calls) == 2  # the rebuilt entry is read


def test_a_tokenizer_without_a_directory_is_not_cached(setup, tmp_path, tokenizer,
                                                       monkeypatch):
    """Not even when the working directory holds tokenizer-like files (``Path("")`` is the
    working directory: it must not become the key)."""
    data, _, calls = setup
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    assert not str(tokenizer.name_or_path)
    for _ in range(2):
        load_preference_pairs(data, tokenizer, cache_dir=cache)
    assert len(calls) == 2
    assert not entries(cache)


def test_a_second_training_run_starts_from_the_cache(workdir, tmp_path, monkeypatch):
    """Two runs of one config in sibling directories: the second tokenises nothing (its pairs
    come from ../.dpokit_cache) and logs the same numbers."""
    from dpokit.train.loop import train
    from tests.helpers import read_metrics
    from tests.train.test_trainer import config

    calls = []
    original = pipeline.tokenize_examples
    monkeypatch.setattr(pipeline, "tokenize_examples",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    runs = []
    for name in ("first", "second"):
        runs.append(read_metrics(train(config(workdir, "unused", max_steps=2,
                                              output_dir=str(tmp_path / name)),
                                       progress=False).parent))
    assert len(calls) == 1
    assert runs[0] == [{**r, "pairs_per_second": runs[0][i]["pairs_per_second"]}
                       for i, r in enumerate(runs[1])]
    off = tmp_path / "off"
    train(config(workdir, "unused", max_steps=1, output_dir=str(off), tokenized_cache=False),
          progress=False)
    assert len(calls) == 2


def test_sft_sequences_are_cached_with_their_loss_span(workdir, tmp_path, monkeypatch):
    """SFT data: the second load reads the sequences back; another completion_only_loss is
    another key (it moves the prompt/completion boundary)."""
    import dpokit.data.sft as sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": " yes " * (1 + i)})
                            + "\n" for i in range(4)))
    calls = []
    original = sft.tokenize_sft
    monkeypatch.setattr(sft, "tokenize_sft", lambda *a, **k: calls.append(1) or original(*a, **k))
    tok, cache = load_tokenizer(workdir / "llama"), tmp_path / "cache"
    first = sft.load_sft_sequences(data, tok, cache_dir=cache)
    assert sft.load_sft_sequences(data, tok, cache_dir=cache) == first and len(calls) == 1
    whole = sft.load_sft_sequences(data, tok, cache_dir=cache, completion_only_loss=False)
    assert len(calls) == 2 and whole == sft.load_sft_sequences(data, tok,
                                                               completion_only_loss=False)
    assert whole != first


def test_a_tokenizer_changed_in_memory_is_another_key(setup, tmp_path):
    """A chat template set after loading (not in the files) changes the key."""
    from dpokit.data.cache import tokenizer_digest

    _, model, _ = setup
    tokenizer = load_tokenizer(model)
    before = tokenizer_digest(tokenizer)
    tokenizer.chat_template = "{{ messages }}"
    assert tokenizer_digest(tokenizer) != before


@pytest.mark.parametrize("failing", ["rename", "writing"])
def test_a_cache_that_cannot_be_written_still_gives_the_pairs(setup, tmp_path, caplog,
                                                              monkeypatch, failing):
    """A full disk: at the rename (or fsync) of a complete build the pairs already tokenised
    are used as they are — not tokenised a second time; while writing the arrays, they are
    prepared again without the cache. Either way the pairs are those of a plain load, and no
    entry nor temporary directory is left."""
    import dpokit.atomic as atomic
    import dpokit.data.store as store

    data, model, calls = setup
    plain = list(load_preference_pairs(data, load_tokenizer(model)))
    before = len(calls)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "rename":
        monkeypatch.setattr(atomic, "replace", no_space)
    else:  # the first build's first chunk
        append = store.StoreWriter.append

        def append_once(self, arrays):
            monkeypatch.setattr(store.StoreWriter, "append", append)
            no_space()

        monkeypatch.setattr(store.StoreWriter, "append", append_once)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        pairs = load(data, model, cache)
        assert list(pairs) == plain
    assert "No space left on device" in caplog.text
    # one tokenisation at the rename; two (the failed build, then without the cache) otherwise
    assert len(calls) - before == (1 if failing == "rename" else 2)
    assert not entries(cache) and not list(cache.glob(".*"))
