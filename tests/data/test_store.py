"""Data at scale (issue 14): rows prepared chunk by chunk into a memory-mapped item store give
what the whole data read at once gives — item by item, error by error, warning by warning — and
training on the store computes the same numbers as on a list.

The oracle is the list path the loaders took before: ``load_rows`` → ``parse_examples`` →
``tokenize_examples`` (SFT: ``load_rows`` → checks → ``_parse`` → ``tokenize_sft`` →
``sft_sequences``). Chunks of 3 or 4 rows put every boundary inside the small files."""

import csv
import json
import logging
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import dpokit.data.pipeline as pipeline
from dpokit.data import ColumnMap, TokenizedPair, TokenizeSettings, load_preference_pairs
from dpokit.data.formats import check_columns, check_row_chars, parse_examples
from dpokit.data.io import iter_row_chunks, load_rows
from dpokit.data.sft import SFTSequence, _parse, load_sft_sequences, sft_sequences, tokenize_sft
from dpokit.data.store import ItemChain, ItemStore, content_digest, lengths, present
from dpokit.data.tokenize import tokenize_examples
from dpokit.errors import DpokitError
from dpokit.fixtures import WORDS

USER = "user"


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def preference_rows(n=11, *, chat=False, seed=0):
    """Rows with prompts of 2–14 words, completions of 1–8, weights and soft labels on every
    row, margins on none."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, chosen, rejected = (words(rng, rng.randint(2, 14)), words(rng, rng.randint(1, 8)),
                                    words(rng, rng.randint(1, 8)))
        if chat:
            row = {"prompt": [{"role": USER, "content": prompt}],
                   "chosen": {"role": "assistant", "content": chosen},
                   "rejected": {"role": "assistant", "content": rejected}}
        else:
            row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
        rows.append({**row, "weight": 0.25 * (i + 1), "label_prob": round(rng.random(), 3)})
    return rows


def write(tmp_path, fmt, rows):
    """``rows`` in the file format ``fmt``; returns (path, split)."""
    import datasets

    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"train": rows}))
        return path, "train"
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps([v] if isinstance(v, dict) else v)
                              if isinstance(v, dict | list) else v  # message lists, as JSON
                              for k, v in r.items()} for r in rows)
    elif fmt == "shards":
        path = tmp_path / "shards"
        path.mkdir()
        for k in range(2):  # two sources: the store's string table
            (path / f"train-0000{k}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows[k * 6:(k + 1) * 6]))
    else:
        dataset = datasets.Dataset.from_list(rows)
        if fmt == "parquet":
            path = tmp_path / "d.parquet"
            dataset.to_parquet(str(path))
        else:
            datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
            if fmt == "saved":
                return tmp_path / "saved", "train"
            path = next((tmp_path / "saved" / "train").glob("*.arrow"))
    return path, None


def list_path(path, tokenizer, settings=None, columns=None, split=None):
    """The pairs as the loader made them before: every row, then every example, in lists."""
    settings, columns = settings or TokenizeSettings(), columns or ColumnMap()
    examples = parse_examples(load_rows(path, split=split), columns,
                              max_row_chars=settings.max_row_chars)
    return tokenize_examples(examples, tokenizer, settings)


def message(call, *args, **kwargs):
    with pytest.raises(DpokitError) as info:
        call(*args, **kwargs)
    return str(info.value)


def warnings_of(caplog, call, *args, **kwargs):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        result = call(*args, **kwargs)
    return result, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def assert_same_items(got, expected):
    """Token-identical ids, float-exact numbers (None where None), the same source and row."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a == b
        for name in ("weight", "margin", "label_prob"):
            value = getattr(a, name, None)
            assert value is None or type(value) is float
        assert all(type(t) is int for t in a.prompt_ids)


# --- the same pairs as the list path ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "arrow", "saved", "shards"])
def test_every_format_gives_the_pairs_of_the_list_path(tokenizer, tmp_path, fmt, chat, mode,
                                                       caplog, workdir):
    # keep_start drops 3 of the 11 rows and cuts the others' completions; keep_end cuts 8
    settings = TokenizeSettings(max_length=34 if chat else 14, truncation_mode=mode)
    path, split = write(tmp_path, fmt, preference_rows(chat=chat))
    expected, expected_warnings = warnings_of(caplog, list_path, path, tokenizer, settings,
                                              split=split)
    got, got_warnings = warnings_of(caplog, load_preference_pairs, path, tokenizer,
                                    settings=settings, split=split, chunk_rows=4)
    assert isinstance(got, ItemStore)  # no cache: mapped from temporary files, already unlinked
    assert got.path is not None and not got.path.exists()
    assert_same_items(got, expected)
    assert got_warnings == expected_warnings  # e.g. "dropped 2 of 11 rows": counted once
    if fmt == "jsonl":  # the memory-mapped entry of the cache: the same again
        saved = load_tokenizer(workdir / "llama")  # the same tokenizer, from its directory
        cached = load_preference_pairs(path, saved, settings=settings, chunk_rows=4,
                                       cache_dir=tmp_path / "cache")
        assert cached.path is not None and cached.path.parent == tmp_path / "cache"
        assert_same_items(cached, expected)
        assert_same_items(load_preference_pairs(path, saved, settings=settings,
                                                cache_dir=tmp_path / "cache"), expected)


def test_io_reads_chunks_lazily_and_bounds_their_text(tmp_path):
    rows = preference_rows(11)
    rows[5]["chosen"] = " " + "long " * 100
    path, _ = write(tmp_path, "jsonl", rows)
    chunks = iter_row_chunks(path, rows=4)
    assert [r.row for r in next(chunks)] == [1, 2, 3, 4]  # nothing else read yet
    assert [len(c) for c in chunks] == [4, 3]
    # at most 4 rows, and a chunk ends at the row that brings it to 400 characters
    assert [[r.row for r in c] for c in iter_row_chunks(path, rows=4, chars=400)] == [
        [1, 2, 3, 4], [5, 6], [7, 8, 9, 10], [11]]


def test_tokenising_in_two_processes_gives_the_same_pairs(tokenizer, tmp_path):
    rows = preference_rows(14)
    path, _ = write(tmp_path, "jsonl", rows)
    settings = TokenizeSettings(max_length=24)
    serial = load_preference_pairs(path, tokenizer, settings=settings, chunk_rows=3)
    parallel = load_preference_pairs(path, tokenizer, settings=settings, chunk_rows=3,
                                     dataset_num_proc=2)
    assert_same_items(parallel, list(serial))
    assert parallel.digest() == serial.digest()
    rows[10]["chosen"] = 7  # an error in the 4th chunk, found by a worker
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert message(load_preference_pairs, path, tokenizer, chunk_rows=3,
                   dataset_num_proc=2) == message(list_path, path, tokenizer)


# --- errors and warnings across chunks -------------------------------------------------------

def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def both(tokenizer, path, settings=None, columns=None):
    """The error messages of the list path and of the chunked one."""
    settings, columns = settings or TokenizeSettings(), columns or ColumnMap()
    return (message(list_path, path, tokenizer, settings, columns),
            message(load_preference_pairs, path, tokenizer, settings=settings, columns=columns,
                    chunk_rows=3))


def test_a_bad_row_in_a_later_chunk_names_its_row(tokenizer, tmp_path):
    rows = preference_rows(9)
    rows[6]["rejected"] = ["not", "messages"]
    expected, got = both(tokenizer, jsonl(tmp_path, rows))
    assert got == expected and "d.jsonl, row 7, field 'rejected'" in got


@pytest.mark.parametrize("late", ["row_chars", "bad_json"])
def test_an_earlier_check_in_a_later_chunk_wins_as_over_the_whole_data(tokenizer, tmp_path,
                                                                      late):
    """A bad row in chunk 1, and in chunk 3 a row over max_row_chars (checked over every row
    before any is parsed) or a line that is not JSON (read before anything is checked)."""
    rows = preference_rows(9)
    rows[1]["chosen"] = 3
    if late == "row_chars":
        rows[7]["prompt"] = "x" * 300
    else:
        rows[7] = '{"prompt": \n'
    expected, got = both(tokenizer, jsonl(tmp_path, rows), TokenizeSettings(max_row_chars=200))
    assert got == expected and "row 8" in got


@pytest.mark.parametrize("case", ["weight_missing_late", "prompt_missing_early",
                                  "renamed_column_absent"])
def test_checks_over_every_row_see_every_chunk(tokenizer, tmp_path, case):
    """A column only later rows lack (or only later rows have): the count of rows lacking it
    is over the whole data, the example row the first one."""
    rows = preference_rows(9)
    columns = ColumnMap()
    if case == "weight_missing_late":
        del rows[7]["weight"]
    elif case == "prompt_missing_early":
        for r in rows[:4]:
            r.pop("prompt")
            r["chosen"], r["rejected"] = "a b" + r["chosen"], "a b" + r["rejected"]
    else:
        columns = ColumnMap(margin="m")
    expected, got = both(tokenizer, jsonl(tmp_path, rows), columns=columns)
    assert got == expected
    assert {"weight_missing_late": "1 of 9 rows lack it", "prompt_missing_early":
            "4 of 9 rows lack it", "renamed_column_absent": "no column 'm'"}[case] in got


def test_a_renamed_column_only_a_later_chunk_holds_is_there(tokenizer, tmp_path):
    rows = preference_rows(9)
    rows[8]["m"] = None  # present (null): a column of the data, filled nowhere
    path = jsonl(tmp_path, rows)
    columns = ColumnMap(margin="m")
    expected = list_path(path, tokenizer, columns=columns)
    assert_same_items(load_preference_pairs(path, tokenizer, columns=columns, chunk_rows=3),
                      expected)


def test_formats_mixed_across_chunks_are_refused_as_over_the_whole_data(tokenizer, tmp_path):
    rows = preference_rows(4) + preference_rows(4, chat=True)
    expected, got = both(tokenizer, jsonl(tmp_path, rows))
    assert got == expected and "row 5: mixes conversational and plain-text rows" in got


def test_dropped_merged_and_identical_rows_are_counted_once_over_all_chunks(tokenizer,
                                                                           tmp_path, caplog):
    """The second chunk loses every row to max_length (no error: the others remain); the
    prompts of rows 1, 5 and 8 merge into their completions; rows 2 and 9 have no preference."""
    rows = preference_rows(9)
    for i in (3, 4, 5):
        rows[i]["prompt"] = words(random.Random(i), 30)
    for i, (a, b) in ((0, ("the ca", "t")), (6, ("the do", "g")), (7, ("a bi", "rd"))):
        rows[i].update(prompt=a, chosen=b + " sat", rejected=b + " ran")
    for i in (1, 8):
        rows[i]["rejected"] = rows[i]["chosen"]
    path = jsonl(tmp_path, rows)
    settings = TokenizeSettings(max_length=24)
    expected, expected_warnings = warnings_of(caplog, list_path, path, tokenizer, settings)
    got, got_warnings = warnings_of(caplog, load_preference_pairs, path, tokenizer,
                                    settings=settings, chunk_rows=3)
    assert_same_items(got, expected)
    assert got_warnings == expected_warnings
    joined = "\n".join(got_warnings)
    for text in ("dropped 3 of 9 rows", "3 of 9 rows had their prompt shortened",
                 "2 of 9 rows have identical chosen and rejected"):
        assert joined.count(text) == 1, (text, joined)
    assert joined.count("is not a prefix of prompt+completion") == 1
    # every row dropped: the error counts them all
    everything = TokenizeSettings(max_length=1, truncation_mode="keep_end")
    expected, got = both(tokenizer, path, everything)
    assert got == expected and "all 9 had an empty completion" in got


def test_an_empty_file_has_no_rows(tokenizer, tmp_path):
    path = jsonl(tmp_path, [])
    assert message(load_preference_pairs, path, tokenizer) == f"{path}: no rows"


# --- SFT ----------------------------------------------------------------------------------------

def sft_list_path(path, tokenizer, settings, completion_only_loss=True):
    rows = load_rows(path)
    names = ["prompt", "completion", "messages", "text"]
    check_columns(rows, {})
    check_row_chars(rows, names, settings.max_row_chars)
    examples = [_parse(r, *names) for r in rows]
    tokenized = tokenize_sft(examples, tokenizer, settings)
    sequences, _ = sft_sequences(examples, rows, tokenized, settings,
                                 completion_only_loss=completion_only_loss,
                                 assistant_only_loss=False)
    return sequences


@pytest.mark.parametrize("completion_only_loss", [True, None, False])
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_sft_sequences_are_those_of_the_list_path(tokenizer, tmp_path, mode,
                                                  completion_only_loss):
    rng = random.Random(1)
    rows = []
    for i in range(10):  # prompt-completion, conversation and text rows, mixed
        kind = i % 3
        if kind == 0:
            rows.append({"prompt": words(rng, rng.randint(2, 12)),
                         "completion": " " + words(rng, 5)})
        elif kind == 1:
            rows.append({"messages": [{"role": USER, "content": words(rng, 6)},
                                      {"role": "assistant", "content": words(rng, 4)}]})
        else:
            rows.append({"text": words(rng, rng.randint(3, 20))})
    path = jsonl(tmp_path, rows)
    settings = TokenizeSettings(max_length=16, truncation_mode=mode)
    expected = sft_list_path(path, tokenizer, settings, completion_only_loss)
    for cache in (None, tmp_path / "cache"):
        got = load_sft_sequences(path, tokenizer, settings=settings, chunk_rows=3,
                                 completion_only_loss=completion_only_loss, cache_dir=cache)
        assert isinstance(got, ItemStore) and got == expected
        assert got.kinds == {"prompt_ids": "ids", "completion_ids": "ids", "source": "text",
                             "row": "int", "tail": "int"} and isinstance(got[0], SFTSequence)
    rows[7] = {"prompt": "a", "completion": 3}  # a bad row in the 3rd chunk
    path = jsonl(tmp_path, rows)
    assert message(load_sft_sequences, path, tokenizer, chunk_rows=3) == (
        f"{path}, row 8, field 'completion': expected a string, got int")


# --- the store --------------------------------------------------------------------------------

@pytest.fixture
def pairs(tokenizer):
    from tests.helpers import tokenized_pairs

    rows = preference_rows(7)
    rows[2].pop("weight")  # not every number set (parse_examples would refuse: built by hand)
    return [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, r.get("weight"),
                          None, p.source, p.row, r["label_prob"])
            for p, r in zip(tokenized_pairs(preference_rows(7), tokenizer), rows, strict=True)]


def store_of(items, directory=None):
    from dpokit.data.store import StoreWriter, chunk_arrays

    writer = StoreWriter(type(items[0]), directory)
    for start in range(0, len(items), 3):
        writer.append(chunk_arrays(items[start:start + 3], type(items[0])))
    return writer.finish()


def test_a_store_is_a_sequence_of_its_items(pairs, tmp_path):
    (tmp_path / "s").mkdir()
    for store in (store_of(pairs), store_of(pairs, tmp_path / "s")):
        assert len(store) == 7 and list(store) == pairs and store == pairs and pairs == store
        assert store[-1] == pairs[-1] and store[2].weight is None
        assert list(store[1:6:2]) == pairs[1:6:2] and list(store[5:][::-1]) == pairs[:4:-1]
        assert store[:] is store and len(store[7:]) == 0
        with pytest.raises(IndexError):
            store[7]
        assert (store + []) is store and ([] + store) is store  # noqa: RUF005
        chain = store + pairs[:2]
        assert isinstance(chain, ItemChain) and list(chain) == pairs + pairs[:2]
        assert chain[:7] is store and chain[7:] == pairs[:2] and chain[8] == pairs[1]
        assert list(pairs[:2] + store) == pairs[:2] + pairs
        np.testing.assert_array_equal(lengths(store, "chosen_ids"),
                                      [len(p.chosen_ids) for p in pairs])
        np.testing.assert_array_equal(store[2:5].lengths("prompt_ids"),
                                      [len(p.prompt_ids) for p in pairs[2:5]])
        weights = store.column("weight")
        assert np.isnan(weights[2]) and weights[3] == pairs[3].weight
        np.testing.assert_array_equal(present(store, "weight"), [p.weight is not None
                                                                 for p in pairs])
        assert present(chain, "margin").tolist() == [False] * 9
        assert store.column("row").tolist() == [p.row for p in pairs]
        assert list(store.column("source")) == [p.source for p in pairs]


def test_the_content_digest_is_the_items_not_their_container(pairs):
    store = store_of(pairs)
    digest = content_digest(pairs)
    assert store.digest() == digest == content_digest(store_of(pairs[:4]) + pairs[4:])
    assert store[2:5].digest() == content_digest(pairs[2:5]) == content_digest(store[2:5])
    assert store[::2].digest() == content_digest(pairs[::2])
    ids = ("prompt_ids", "chosen_ids", "rejected_ids")
    moved = list(pairs)  # one token moved from the prompt to the completion: another digest
    first = moved[0]
    moved[0] = TokenizedPair(first.prompt_ids[:-1], first.prompt_ids[-1:] + first.chosen_ids,
                             first.rejected_ids, first.weight, source=first.source)
    assert content_digest(moved, fields=ids) != store.digest(fields=ids)
    renamed = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.weight, p.margin,
                             "elsewhere.jsonl", p.row + 1, p.label_prob) for p in pairs]
    assert content_digest(renamed, exclude=("source", "row")) == store.digest(
        exclude=("source", "row")) and content_digest(renamed) != digest
    zero = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, 0.0 if p.weight is None
                          else p.weight, p.margin, p.source, p.row, p.label_prob) for p in pairs]
    assert content_digest(zero) != digest  # None is not 0.0


# --- the cache: atomic, and rebuilt when broken ---------------------------------------------

def entries(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) \
        if cache.exists() else []


@pytest.fixture
def model_dir(workdir):
    return workdir / "llama"


def load(path, model_dir, cache, **kwargs):
    from dpokit.models import load_tokenizer

    return load_preference_pairs(path, load_tokenizer(model_dir), cache_dir=cache, chunk_rows=3,
                                 **kwargs)


def test_an_interrupted_build_leaves_no_entry(tmp_path, model_dir, counted, monkeypatch):
    path = jsonl(tmp_path, preference_rows(9))
    cache = tmp_path / "cache"
    original = pipeline.tokenize_examples

    def interrupted(*args, **kwargs):
        if len(counted) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_examples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(path, model_dir, cache)
    assert list(cache.iterdir()) == []  # no entry, no temporary directory
    monkeypatch.setattr(pipeline, "tokenize_examples", original)
    assert load(path, model_dir, cache) == list_path(path, load_tokenizer(model_dir))
    (entry,) = entries(cache)
    assert (entry / "meta.json").is_file()


def load_tokenizer(path):
    from dpokit.models import load_tokenizer as load

    return load(path)


def test_a_dead_build_is_never_read_and_is_cleared(tmp_path, model_dir, counted):
    """A build whose process was killed left its temporary directory (complete or not): the
    next load neither reads nor keeps it."""
    path = jsonl(tmp_path, preference_rows(9))
    cache = tmp_path / "cache"
    expected = list(load(path, model_dir, cache))
    (entry,) = entries(cache)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = cache / f".{entry.name}.{dead}.tmp"
    os.replace(entry, stale)
    recent = cache / f".tokenizedpair-other.{dead}.tmp"  # written to a minute ago: kept
    recent.mkdir()
    old = time.time() - 3600
    for file in [stale, *stale.iterdir()]:
        os.utime(file, (old, old))
    assert load(path, model_dir, cache) == expected and len(counted) == 6  # 3 chunks, twice
    assert sorted(p.name for p in cache.iterdir()) == [recent.name, entry.name]


@pytest.mark.parametrize("damage", ["meta", "offsets", "key", "missing"])
def test_a_damaged_entry_is_removed_and_rebuilt(tmp_path, model_dir, counted, damage, caplog):
    path = jsonl(tmp_path, preference_rows(9))
    cache = tmp_path / "cache"
    expected = list(load(path, model_dir, cache))
    (entry,) = entries(cache)
    if damage == "meta":
        (entry / "meta.json").write_text('{"format": 1, "ki')
    elif damage == "offsets":  # a new file, as a writer would make it (the old one is mapped)
        offsets = np.load(entry / "chosen_ids_offsets.npy")
        offsets[3] = offsets[4] + 1
        (entry / "chosen_ids_offsets.npy").unlink()
        np.save(entry / "chosen_ids_offsets.npy", offsets)
    elif damage == "key":
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "key": "another"}))
    else:
        (entry / "rejected_ids.npy").unlink()
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        again = load(path, model_dir, cache)
    assert again == expected and len(counted) == 6  # 3 chunks, twice
    assert "unusable" in caplog.text and str(entry) in caplog.text
    assert load(path, model_dir, cache) == expected and len(counted) == 6


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, model_dir, caplog):
    path = jsonl(tmp_path, preference_rows(5))
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        got = load(path, model_dir, blocked / "cache")
    assert got == list_path(path, load_tokenizer(model_dir))
    assert "could not cache the tokenised data" in caplog.text


# --- training on a store ----------------------------------------------------------------------

def test_training_on_a_store_computes_what_training_on_a_list_does(workdir, tmp_path,
                                                                    monkeypatch):
    """The same run with the pairs as a list and as the memory-mapped store of the cache:
    identical metrics, fingerprint and reference-cache key; the store's checks are arrays."""
    import dpokit.objectives.dpo as dpo
    from dpokit.models import check_positions
    from dpokit.objectives import DPOObjective
    from dpokit.objectives.reference import cache_key
    from dpokit.train.fingerprint import run_fingerprint
    from dpokit.train.loop import train
    from dpokit.train.setup import item_tokens
    from tests.helpers import read_metrics
    from tests.train.test_trainer import config

    original = dpo.load_preference_pairs
    kinds = []

    def as_list(*args, **kwargs):
        items = original(*args, **kwargs)
        kinds.append(type(items).__name__)
        return list(items) if len(kinds) == 1 else items

    monkeypatch.setattr(dpo, "load_preference_pairs", as_list)
    metrics = []
    for name in ("list", "store"):
        cfg = config(workdir, "unused", max_steps=3, output_dir=str(tmp_path / name),
                     selective_checkpointing=None, tokenized_cache=name == "store")
        metrics.append(read_metrics(train(cfg, progress=False).parent))
    assert kinds == ["ItemStore", "ItemStore"]
    for a, b in zip(*metrics, strict=True):
        assert {**a, "pairs_per_second": 0} == {**b, "pairs_per_second": 0}
    tokenizer = load_tokenizer(workdir / "llama")
    store = DPOObjective(cfg, tokenizer).load(cfg.data, None)
    assert isinstance(store, ItemStore) and store.path is not None  # from the cache
    items = list(store)
    assert run_fingerprint(cfg, store) == run_fingerprint(cfg, items)
    assert cache_key("w", store, {"a": 1}) == cache_key("w", items, {"a": 1})
    for shared in (False, True):
        objective = DPOObjective(config(workdir, "unused", shared_prompt=shared), tokenizer)
        assert list(item_tokens(objective, store)) == [objective.tokens(p) for p in items]
    longest = max(range(len(items)), key=lambda i: len(items[i].prompt_ids) + max(
        len(items[i].chosen_ids), len(items[i].rejected_ids)))
    limits = [(4, "max_position_embeddings", "m", False)]
    assert message(check_positions, store, limits, 0) == message(check_positions, items,
                                                                 limits, 0)
    assert f"row {items[longest].row}:" in message(check_positions, store + items, limits, 0)


def test_a_checkpoint_with_an_older_data_digest_still_resumes(workdir, tmp_path):
    from dpokit.train.fingerprint import legacy_items_identity, run_fingerprint
    from dpokit.train.setup import check_resumable
    from tests.train.test_trainer import config

    cfg = config(workdir, "unused")
    pairs = load_preference_pairs(cfg.data, load_tokenizer(workdir / "llama"))
    current = run_fingerprint(cfg, pairs)
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    for data, ok in ((legacy_items_identity(list(pairs)), True),
                     (legacy_items_identity(list(pairs)[1:]), False)):
        (checkpoint / "trainer_state.json").write_text(json.dumps({
            "global_step": 1, "total_steps": 6, "steps_per_epoch": 12, "world_size": 1,
            "fingerprint": {**current, "data": data}}))
        runtime = SimpleNamespace(world_size=1)
        if ok:
            assert check_resumable(checkpoint, cfg, runtime, current, 12, 6, items=pairs) == 1
        else:
            assert "data (content differs)" in message(check_resumable, checkpoint, cfg,
                                                       runtime, current, 12, 6, items=pairs)
