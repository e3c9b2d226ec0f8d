"""Reading preference files: every format, splits, shards, and errors that point at the row."""

import csv
import json

import pytest

from dpokit.data import load_rows
from dpokit.errors import DpokitError

ROWS = [
    {"prompt": "the sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "the sun is", "chosen": " in the sky.", "rejected": " in the sea.", "weight": 2.0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_rows_keep_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    rows = load_rows(path)
    assert [r.fields for r in rows] == ROWS
    assert [r.row for r in rows] == [1, 3]  # blank line 2 skipped, numbering is by line
    assert rows[1].where == f"{path}, row 3"


def test_json_list_and_split_object(tmp_path):
    plain = tmp_path / "a.json"
    plain.write_text(json.dumps(ROWS), encoding="utf-8")
    assert [r.fields for r in load_rows(plain)] == ROWS
    splits = tmp_path / "b.json"
    splits.write_text(json.dumps({"train": ROWS[:1], "test": ROWS[1:]}), encoding="utf-8")
    assert [r.fields for r in load_rows(splits, split="train")] == ROWS[:1]
    assert [r.fields for r in load_rows(splits, split="test")] == ROWS[1:]


def test_csv_with_json_message_cells(tmp_path):
    path = tmp_path / "prefs.csv"
    chosen = json.dumps([{"role": "assistant", "content": "blue"}])
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["prompt", "chosen", "rejected"],
                                      ["the sky is", chosen, "green"]])
    (row,) = load_rows(path)
    assert row.fields["chosen"] == [{"role": "assistant", "content": "blue"}]
    assert row.fields["rejected"] == "green" and row.row == 1


def test_parquet_and_arrow_and_saved_dataset(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_list(
        [{**r, "weight": r.get("weight")} for r in ROWS])
    dataset.to_parquet(str(tmp_path / "prefs.parquet"))
    assert [r.fields["chosen"] for r in load_rows(tmp_path / "prefs.parquet")] == [
        " blue.", " in the sky."]
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(
        str(tmp_path / "saved"))
    assert len(load_rows(tmp_path / "saved", split="train")) == 2
    test_rows = load_rows(tmp_path / "saved", split="test")
    assert [r.fields["prompt"] for r in test_rows] == ["the sun is"]
    assert test_rows[0].source.endswith("saved[test]")
    with pytest.raises(DpokitError, match="no split 'validation'"):
        load_rows(tmp_path / "saved", split="validation")
    arrow = next((tmp_path / "saved" / "train").glob("*.arrow"))
    assert len(load_rows(arrow)) == 2


def test_directory_of_shards_in_name_order_with_split(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "train-00001.jsonl", ROWS[1:])
    write_jsonl(shards / "train-00000.jsonl", ROWS[:1])
    write_jsonl(shards / "test-00000.jsonl", ROWS)
    assert [r.fields for r in load_rows(shards, split="train")] == ROWS
    with pytest.raises(DpokitError, match="no data files for split 'dev'"):
        load_rows(shards, split="dev")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "bad.jsonl, row 2: not valid JSON"),
    ("bad.jsonl", b'{"prompt": "a"}\n["x"]\n', "row 2: expected a JSON object, got list"),
    ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": "\xff"}\n', "row 2: undecodable text"),
    ("bad.json", b'{"prompt": 1', "bad.json, line 1: not valid JSON"),
    ("bad.json", b'{"other": []}', "expected a list of objects, or an object with a 'train'"),
    ("bad.csv", b"prompt,chosen\nok,fine\n\xff\xfe,x\n", "bad.csv, line 3: undecodable text"),
    ("bad.txt", b"hello", "unsupported file type '.txt'"),
    ("bad.parquet", b"not parquet", "cannot read"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DpokitError, match=None) as info:
        load_rows(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_path_and_empty_file(tmp_path):
    with pytest.raises(DpokitError, match="data not found"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DpokitError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")


def test_csv_json_cells_that_are_not_messages_stay_text(tmp_path):
    path = tmp_path / "answers.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["prompt", "chosen", "rejected"],
                                      ["give json", '[{"name": "x"}]', "no"]])
    (row,) = load_rows(path)
    assert row.fields["chosen"] == '[{"name": "x"}]'


def test_utf8_bom_is_accepted_in_json_and_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    assert load_rows(tmp_path / "a.jsonl")[0].fields == ROWS[0]
    assert len(load_rows(tmp_path / "b.json")) == 2


def test_shards_named_by_no_split_are_read_whole_for_any_split(tmp_path, caplog):
    """A directory of shards without split names is one split (as load_dataset calls it
    "train", TRL's default dataset_train_split): split=train reads it all, with a warning."""
    import logging

    shards = tmp_path / "plain"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", ROWS[:1])
    write_jsonl(shards / "part-1.jsonl", ROWS[1:])
    with caplog.at_level(logging.WARNING, logger="dpokit.data"):
        assert [r.fields for r in load_rows(shards, split="train")] == ROWS
    assert "shards without split names" in caplog.text
