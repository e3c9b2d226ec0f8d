"""The large-data preparation path (io → prepare → store), from a review: each test asserts the
behaviour the project's rules ask for ("never silently wrong": a one-line DpokitError naming the
file and row; the same items and errors whatever the chunking, the process count or the cache).
The oracle is the same data read in one chunk, in one process, or through ``load_rows``."""

import csv
import json

import pytest

from dpokit.data import TokenizeSettings, load_preference_pairs
from dpokit.data.io import iter_row_chunks, iter_rows, load_rows
from dpokit.data.sft import load_sft_sequences
from dpokit.data.store import StoreWriter, chunk_arrays, content_digest
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError


def message(call, *args, **kwargs):
    with pytest.raises(DpokitError) as info:
        call(*args, **kwargs)
    return str(info.value)


def rows_of(path, **kwargs):
    return [(r.source, r.row, r.fields) for r in iter_rows(path, **kwargs)]


# --- CSV: values silently shifted or swallowed --------------------------------------------------

def test_csv_row_with_more_cells_than_the_header_is_refused(tmp_path):
    """An unquoted comma in a prompt gives the row a 4th cell: the values shift one column left
    (the prompt is cut at the comma, the chosen becomes the prompt's tail, the rejected becomes
    the chosen) and the extra cell is dropped without a word."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2, really?,4,5\n", encoding="utf-8")
    with pytest.raises(DpokitError, match=r"d\.csv"):
        rows_of(path)


def test_csv_unbalanced_quote_does_not_swallow_the_following_rows(tmp_path):
    """A quote opened in the last cell and never closed makes every later line part of that
    cell (csv's non-strict mode): 3 rows read as 1, no error."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\nq1,yes,"no\nq2,yes,no\nq3,yes,no\n',
                    encoding="utf-8")
    try:
        rows = rows_of(path)
    except DpokitError:
        return  # refused: right
    assert len(rows) == 3, rows


def test_csv_cell_longer_than_131072_characters_is_read(tmp_path):
    """A long but well-formed cell (far under max_row_chars=1,000,000) is refused as
    "malformed CSV (field larger than field limit (131072))" — csv's default field limit."""
    path = tmp_path / "d.csv"
    long = "x " * 100_000
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerows([["prompt", "chosen", "rejected"], [long, " yes", " no"]])
    rows = rows_of(path)
    assert len(rows) == 1 and rows[0][2]["prompt"] == long


# --- JSON: crashes with tracebacks ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_an_integer_of_5000_digits_is_a_one_line_error(tmp_path, name):
    """Python's int-string limit (4300 digits) raises a plain ValueError from json.loads, which
    the readers do not catch (they catch JSONDecodeError only)."""
    row = (b'{"prompt": "a", "chosen": " b", "rejected": " c", "weight": ' + b"1" * 5000
           + b"}")
    path = tmp_path / name
    path.write_bytes(row + b"\n" if name.endswith("l") else b"[" + row + b"]")
    with pytest.raises(DpokitError, match=r"d\.json"):
        rows_of(path)


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    """json.loads raises RecursionError on deep nesting: a traceback, not a row error."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": " b", "rejected": ' + b"[" * 100_000
                     + b"]" * 100_000 + b"}\n")
    with pytest.raises(DpokitError, match=r"d\.jsonl, row 1"):
        rows_of(path)


def test_a_weight_too_large_for_a_float_is_a_row_error(tokenizer, tmp_path):
    """A 400-digit integer weight parses (JSON ints are exact) and ``float()`` of it raises
    OverflowError, which get_number does not catch: a traceback from load_preference_pairs."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": " b", "rejected": " c", "weight": '
                    + "9" * 400 + "}\n", encoding="utf-8")
    with pytest.raises(DpokitError, match=r"d\.jsonl, row 1, field 'weight'"):
        load_preference_pairs(path, tokenizer)


def test_jsonl_bom_then_blank_first_line(tmp_path):
    """A UTF-8 BOM is accepted on line 1 and blank lines are skipped — but a BOM on a blank
    line 1 is "not valid JSON (Expecting value at column 1)"."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"x": 1}).encode() + b"\n")
    assert rows_of(path) == [(str(path), 2, {"x": 1})]


# --- directories of shards -----------------------------------------------------------------------

def test_a_shard_with_an_upper_case_suffix_is_not_silently_left_out(tmp_path):
    """A single ``b.JSONL`` is read (the suffix is lower-cased), but in a directory the shard
    filter compares suffixes case-sensitively: its rows vanish without a word."""
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"x": 1}) + "\n", encoding="utf-8")
    (folder / "b.JSONL").write_text(json.dumps({"x": 2}) + "\n", encoding="utf-8")
    assert [r[2] for r in rows_of(folder / "b.JSONL")] == [{"x": 2}]
    try:
        rows = rows_of(folder)
    except DpokitError:
        return  # refused: right
    assert [r[2] for r in rows] == [{"x": 1}, {"x": 2}]


def test_json_shards_holding_splits_read_the_split_asked_for(tmp_path):
    """JSON shards each holding {"train": [...], "test": [...]}: with split="train" the shards
    are read with split=None, so the error says "set split to choose one" — it is set."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        (folder / f"part{k}.json").write_text(json.dumps(
            {"train": [{"x": k}], "test": [{"x": -k}]}), encoding="utf-8")
    assert [r[2] for r in rows_of(folder, split="train")] == [{"x": 0}, {"x": 1}]


def test_shards_with_bom_crlf_unicode_and_no_final_newline_read_alike_in_any_chunking(tmp_path):
    """Passes: rows and row numbers of a directory of such files are those of load_rows, for
    every chunk size (boundaries inside and across files)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    texts = ["\u00e9t\u00e9", "line\u2028sep", "tab\tand \\ slash", "\U0001f600"]
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(
        json.dumps({"p": t}) for t in texts).encode() + b"\r\n\r\n")
    (folder / "b.jsonl").write_bytes(b"")
    (folder / "c.jsonl").write_bytes(b"\n\n" + "\n".join(
        json.dumps({"p": t}, ensure_ascii=False) for t in texts).encode())  # no final \n
    expected = [(r.source, r.row, r.fields) for r in load_rows(folder)]
    assert [r[1] for r in expected] == [1, 2, 3, 4, 3, 4, 5, 6]
    for size in (1, 2, 3, 5, 100):
        got = [(r.source, r.row, r.fields) for c in iter_row_chunks(folder, rows=size)
               for r in c]
        assert got == expected


# --- the store ------------------------------------------------------------------------------------

def test_an_empty_view_of_a_store_has_the_digest_of_no_items():
    """content_digest says a list, a store and a slice of one give the same digest; an empty
    slice of a store does not give the digest of an empty list (or of an empty ItemChain)."""
    items = [TokenizedPair([1, 2], [3], [4], weight=0.5, source="s", row=i) for i in range(4)]
    writer = StoreWriter(TokenizedPair, None)
    writer.append(chunk_arrays(items, TokenizedPair))
    store = writer.finish()
    assert content_digest(store[1:3]) == content_digest(items[1:3])  # (holds)
    assert list(store[2:2]) == items[2:2] == []
    assert content_digest(store[2:2]) == content_digest(items[2:2])


# --- prepare: the same answer whatever the chunks and processes ---------------------------------

def test_errors_in_a_directory_are_the_same_in_any_chunking_and_in_workers(tokenizer, tmp_path):
    """Passes: a bad row in the second shard and a row over max_row_chars in the third: the
    over-long row (checked first over every row) wins, naming its own file and row, with one
    chunk, chunks of 2 and 2 worker processes; without the limit the bad row is named."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        rows = [{"prompt": f"question {k} {i}", "chosen": " yes good", "rejected": " no bad"}
                for i in range(5)]
        if k == 1:
            rows[1]["chosen"] = 5
        if k == 2:
            rows[3]["prompt"] = "x" * 500
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    limit = TokenizeSettings(max_row_chars=100)
    runs = [{}, {"chunk_rows": 2}, {"chunk_rows": 2, "dataset_num_proc": 2}]
    over = {message(load_preference_pairs, folder, tokenizer, settings=limit, **kw)
            for kw in runs}
    assert len(over) == 1 and f"{folder / 'part-2.jsonl'}, row 4, field 'prompt'" in over.pop()
    bad = {message(load_preference_pairs, folder, tokenizer, **kw) for kw in runs[:2]}
    assert len(bad) == 1 and f"{folder / 'part-1.jsonl'}, row 2, field 'chosen'" in bad.pop()


def test_sft_items_of_a_directory_are_the_same_in_any_chunking(tokenizer, tmp_path):
    """Passes: SFT sequences (source and row included) of three shards, one of them empty,
    with chunk boundaries inside and across files."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        rows = [] if k == 1 else [{"prompt": f"q {k} {i}", "completion": f" answer {i}"}
                                  for i in range(4)]
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = list(load_sft_sequences(folder, tokenizer))
    assert [(s.source.rsplit("/", 1)[-1], s.row) for s in whole] == [
        ("part-0.jsonl", i) for i in range(1, 5)] + [("part-2.jsonl", i) for i in range(1, 5)]
    for size in (1, 3, 5):
        assert list(load_sft_sequences(folder, tokenizer, chunk_rows=size)) == whole


def test_an_interrupted_build_without_a_cache_leaves_no_temporary_files(tokenizer, tmp_path,
                                                                         monkeypatch):
    """Passes: Ctrl-C in the second chunk's tokenisation (scratch store, no cache_dir): the
    KeyboardInterrupt goes through and the temporary store directory is removed."""
    import tempfile

    import dpokit.data.pipeline as pipeline

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    original, calls = pipeline.tokenize_examples, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_examples", interrupted)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q {i}", "chosen": " yes", "rejected": " no"})
                            + "\n" for i in range(6)))
    with pytest.raises(KeyboardInterrupt):
        load_preference_pairs(path, tokenizer, chunk_rows=2)
    assert len(calls) == 2 and list(scratch.iterdir()) == []


def test_csv_defects_do_not_reach_the_pairs_silently(tokenizer, tmp_path):
    """The two CSV defects above end-to-end: 3 rows give 2 pairs, both wrong (prompt
    "What is 2+2", chosen " really?", rejected "4"; and a rejected of "no\\nq3,yes,no\\n"),
    and load_preference_pairs says nothing."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\nWhat is 2+2, really?,4,5\nq2,yes,"no\nq3,yes,no\n',
                    encoding="utf-8")
    with pytest.raises(DpokitError, match=r"d\.csv"):
        load_preference_pairs(path, tokenizer)


def test_a_json_list_read_with_a_split_says_the_split_is_ignored(tmp_path, caplog):
    """As every other file without splits does (a warning, then its rows), not silently."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"x": 1}]), encoding="utf-8")
    with caplog.at_level("WARNING", logger="dpokit.data"):
        assert [r[2] for r in rows_of(path, split="test")] == [{"x": 1}]
    assert "split='test' is ignored" in caplog.text
