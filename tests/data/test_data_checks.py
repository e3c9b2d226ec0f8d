"""Data is never misread without a word (issue 12): a misspelt column, a duplicated column, a
null among filled values, a negative weight, several splits read whole, a huge row — each is a
one-line error naming the file, the row and the column; the legitimate look-alikes still load."""

import csv
import json
import logging

import pytest

from dpokit.data import ColumnMap, RawRow, TokenizeSettings, load_preference_pairs, load_rows
from dpokit.data import parse_examples as parse
from dpokit.data.prompts import load_prompts
from dpokit.data.sft import load_sft_sequences
from dpokit.errors import DpokitError
from dpokit.objectives.config import DataConfig
from tests.helpers import run_cli, write_jsonl

PAIRS = [{"prompt": "the sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": "the sun is", "chosen": " hot.", "rejected": " cold."},
         {"prompt": "grass is", "chosen": " green.", "rejected": " red."}]


def rows(*fields_list, source="data.jsonl"):
    return [RawRow(source, i + 1, f) for i, f in enumerate(fields_list)]


def error(call, *args, **kwargs) -> str:
    """The message of the ``DpokitError`` ``call`` raises; it is one line."""
    with pytest.raises(DpokitError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_csv(path, table):
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(table)
    return path


def train_cli(capsys, workdir, tmp_path, data, *flags):
    """``dpokit train`` on the tiny Llama: (exit status, stdout, stderr)."""
    return run_cli(capsys, "train", "--model", str(workdir / "llama"), "--data", str(data),
                   "--output-dir", str(tmp_path / "run"), "--max-steps", "1", *flags)


def assert_one_line_error(code, out, err, *parts):
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


# --- a configured column must exist ----------------------------------------------------------

def test_a_renamed_prompt_column_that_is_absent_is_an_error():
    message = error(parse, rows(*PAIRS), ColumnMap(prompt="promt"))
    assert message == ("data.jsonl: no column 'promt' (prompt_column); "
                       "columns: chosen, prompt, rejected")


@pytest.mark.parametrize("field", ["chosen", "rejected", "weight", "margin", "label_prob"])
def test_every_renamed_column_that_is_absent_is_an_error(field):
    message = error(parse, rows(*PAIRS), ColumnMap(**{field: "nope"}))
    assert message.startswith(f"data.jsonl: no column 'nope' ({field}_column); columns: ")


def test_default_chosen_column_absent_everywhere_names_the_key():
    data = [{"prompt": "p", "good": " a", "rejected": " b"}]
    assert "no column 'chosen' (chosen_column); columns: good, prompt, rejected" in error(
        parse, rows(*data))


def test_shards_name_their_folder_when_a_column_is_absent():
    data = rows(PAIRS[0], source="d/a.jsonl") + rows(PAIRS[1], source="d/b.jsonl")
    assert error(parse, data, ColumnMap(weight="w")).startswith(
        "d (2 files): no column 'w' (weight_column)")


def test_default_prompt_column_may_be_absent_in_implicit_prompt_data(caplog):
    """The default name is optional: without a ``prompt`` column the prompt is the shared
    prefix (logged); only a name the user changed must exist."""
    data = rows({"chosen": "The sky is blue.", "rejected": "The sky is green."},
                {"chosen": "Grass is green.", "rejected": "Grass is red."})
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        examples = parse(data)
    assert [e.prompt for e in examples] == ["The sky is", "Grass is"]
    assert "no 'prompt' column (prompt_column): implicit-prompt rows" in caplog.text
    assert parse(data, ColumnMap(prompt="prompt"))[0].chosen == " blue."  # default spelled out


def test_renamed_columns_that_exist_load():
    data = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "w": 1.5}
            for r in PAIRS]
    examples = parse(rows(*data), ColumnMap(prompt="q", chosen="good", rejected="bad",
                                            weight="w"))
    assert [e.weight for e in examples] == [1.5] * 3 and examples[0].prompt == "the sky is"


def test_misspelt_prompt_column_through_the_cli(workdir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    code, out, err = train_cli(capsys, workdir, tmp_path, data, "--prompt-column", "promt")
    assert_one_line_error(code, out, err, f"dpokit: error: {data}: no column 'promt' "
                                          f"(prompt_column); columns: chosen, prompt, rejected")


def test_renamed_sft_and_generation_columns_must_exist(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}])
    assert f"{data}: no column 'answer' (completion_column)" in error(
        load_sft_sequences, data, tokenizer, completion_column="answer")
    assert f"{data}: no column 'question' (prompt_column)" in error(
        load_prompts, data, tokenizer, prompt_column="question")


# --- duplicate column names ------------------------------------------------------------------

def test_duplicate_csv_header_is_an_error(tmp_path):
    path = write_csv(tmp_path / "data.csv", [["prompt", "chosen", "rejected", "chosen"],
                                             ["p", " a", " b", " c"]])
    assert error(load_rows, path) == (f"{path}: column 'chosen' appears twice in the header "
                                      f"(columns 2 and 4); rename or remove one")


def test_duplicate_csv_header_after_stripping_spaces(tmp_path):
    path = write_csv(tmp_path / "data.csv", [["prompt", "chosen", " prompt"], ["p", "a", "q"]])
    assert "column 'prompt' appears twice in the header (columns 1 and 3)" in error(
        load_rows, path)


def test_duplicate_csv_column_through_the_cli(workdir, tmp_path, capsys):
    path = write_csv(tmp_path / "data.csv", [["prompt", "chosen", "rejected", "rejected"],
                                             ["p", " a", " b", " c"]])
    code, out, err = train_cli(capsys, workdir, tmp_path, path)
    assert_one_line_error(code, out, err, f"{path}: column 'rejected' appears twice")


def test_duplicate_json_keys_are_an_error(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                     '{"prompt": "p", "chosen": "a", "rejected": "b", "prompt": "q"}\n')
    assert error(load_rows, jsonl).startswith(
        f"{jsonl}, row 2: key 'prompt' appears twice in one object")
    document = tmp_path / "data.json"
    document.write_text('[{"prompt": "p", "chosen": [{"role": "assistant", "content": "a", '
                        '"content": "b"}], "rejected": "b"}]')
    assert error(load_rows, document).startswith(f"{document}: key 'content' appears twice")


def test_duplicate_parquet_columns_are_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["p"]), pa.array(["a"]), pa.array(["b"])],
                                        names=["prompt", "chosen", "chosen"]), path)
    assert f"{path}: column 'chosen' appears twice in the schema" in error(load_rows, path)


# --- null among filled values ----------------------------------------------------------------

def test_null_prompt_among_prompts_is_an_error_for_that_row():
    data = [PAIRS[0], {**PAIRS[1], "prompt": None}, PAIRS[2]]
    assert error(parse, rows(*data)).startswith(
        "data.jsonl, row 2, field 'prompt': null or missing, while other rows fill this column "
        "(e.g. data.jsonl, row 1); 1 of 3 rows lack it")


def test_missing_prompt_key_among_prompts_is_an_error_for_that_row():
    data = [PAIRS[0], PAIRS[1], {"chosen": "x y", "rejected": "x z"}]
    assert error(parse, rows(*data)).startswith("data.jsonl, row 3, field 'prompt': null")


@pytest.mark.parametrize("field", ["weight", "margin", "label_prob"])
def test_null_optional_number_among_filled_is_an_error(field):
    data = [{**PAIRS[0], field: 0.5}, {**PAIRS[1], field: None}, {**PAIRS[2], field: 0.25}]
    assert error(parse, rows(*data)).startswith(f"data.jsonl, row 2, field '{field}': null")


def test_empty_csv_weight_cell_among_weights_is_an_error(tmp_path):
    path = write_csv(tmp_path / "data.csv", [["prompt", "chosen", "rejected", "weight"],
                                             ["p", " a", " b", "2"], ["q", " c", " d", ""]])
    assert error(parse, load_rows(path)).startswith(f"{path}, row 2, field 'weight': null")


def test_null_chosen_is_still_an_error_for_that_row():
    data = [PAIRS[0], {**PAIRS[1], "chosen": None}]
    assert error(parse, rows(*data)).startswith("data.jsonl, row 2, field 'chosen': missing")


def test_a_column_null_in_every_row_is_no_column():
    data = [{**r, "weight": None, "prompt": r["prompt"]} for r in PAIRS]
    assert [e.weight for e in parse(rows(*data))] == [None] * 3


# --- numbers ---------------------------------------------------------------------------------

def test_negative_weight_is_an_error():
    data = [{**PAIRS[0], "weight": 1.0}, {**PAIRS[1], "weight": -0.5}]
    assert error(parse, rows(*data)) == ("data.jsonl, row 2, field 'weight': expected a weight "
                                         "≥ 0, got -0.5")


@pytest.mark.parametrize(("field", "value"), [("weight", "inf"), ("weight", float("nan")),
                                              ("margin", float("-inf")), ("label_prob", "nan")])
def test_non_finite_numbers_are_errors(field, value):
    data = [{**PAIRS[0], field: 0.5}, {**PAIRS[1], field: value}]
    assert error(parse, rows(*data)).startswith(
        f"data.jsonl, row 2, field '{field}': expected a finite number")


def test_zero_weight_is_accepted():
    data = [{**PAIRS[0], "weight": 0}, {**PAIRS[1], "weight": 2}]
    assert [e.weight for e in parse(rows(*data))] == [0.0, 2.0]


# --- splits ----------------------------------------------------------------------------------

def test_datasetdict_with_splits_needs_split(tmp_path, caplog):
    import datasets

    dataset = datasets.Dataset.from_list(PAIRS)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(saved))
    assert error(load_rows, saved) == (f"{saved}: a saved DatasetDict with splits test, train; "
                                       f"set split to choose one")
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        test_rows = load_rows(saved, split="test")
    assert [r.fields["prompt"] for r in test_rows] == ["the sky is"]
    assert f"{saved}: reading split 'test' (1 rows)" in caplog.text


def test_datasetdict_with_one_split_reads_it_and_says_so(tmp_path, caplog):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(saved))
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        assert len(load_rows(saved)) == 3
    assert "reading split 'train' (3 rows), its only split" in caplog.text


@pytest.mark.parametrize("layout", ["names", "folders"])
def test_shards_of_several_splits_need_split(tmp_path, layout, caplog):
    shards = tmp_path / "shards"
    for split, part in (("train", PAIRS[:2]), ("test", PAIRS[2:])):
        path = shards / (f"{split}-00000.jsonl" if layout == "names" else f"{split}/0.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, part)
    assert error(load_rows, shards) == (f"{shards}: shards of several splits (test, train); "
                                        f"set split to choose one")
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        assert [r.fields for r in load_rows(shards, split="train")] == PAIRS[:2]
    assert "reading 1 shard of split 'train'" in caplog.text


def test_shards_without_split_names_are_read_whole_and_logged(tmp_path, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", PAIRS[:1])
    write_jsonl(shards / "part-1.jsonl", PAIRS[1:])
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        assert len(load_rows(shards)) == 3
    assert f"{shards}: reading 2 shards (part-0.jsonl, part-1.jsonl)" in caplog.text


def test_json_object_of_several_splits_needs_split(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": PAIRS[:2], "test": PAIRS[2:]}))
    assert error(load_rows, path) == (f"{path}: an object holding several splits (test, train); "
                                      f"set split to choose one")
    assert len(load_rows(path, split="test")) == 1


# --- huge rows -------------------------------------------------------------------------------

def test_a_row_over_max_row_chars_is_refused_before_tokenising(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [PAIRS[0], {**PAIRS[1], "chosen": "x" * 150}])
    settings = TokenizeSettings(max_row_chars=100)
    message = error(load_preference_pairs, data, tokenizer, settings=settings)
    assert message == (f"{data}, row 2, field 'chosen': 150 characters (166 in the row), over "
                       f"max_row_chars=100; shorten the row, or raise max_row_chars (null: no "
                       f"limit)")
    unlimited = TokenizeSettings(max_row_chars=None, max_length=None)
    assert len(load_preference_pairs(data, tokenizer, settings=unlimited)) == 2


def test_max_row_chars_counts_message_contents_and_applies_to_sft_and_prompts(tokenizer,
                                                                               tmp_path):
    user = {"role": "user", "content": "y" * 60}
    data = rows({"prompt": [user], "chosen": {"role": "assistant", "content": "z" * 50},
                 "rejected": {"role": "assistant", "content": "no"}})
    # roles are text too: 4 + 60 in the prompt, 9 + 50 and 9 + 2 in the completions
    assert "row 1, field 'prompt': 64 characters (134 in the row)" in error(
        parse, data, max_row_chars=100)
    settings = TokenizeSettings(max_row_chars=10)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "short", "completion": " longer one"}])
    assert f"{sft}, row 1, field 'completion': 11 characters" in error(
        load_sft_sequences, sft, tokenizer, settings=settings)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a prompt too long"}])
    assert f"{prompts}, row 1, field 'prompt': 17 characters" in error(
        load_prompts, prompts, tokenizer, settings=settings)


def test_max_row_chars_is_a_data_config_key():
    config = DataConfig(data="d.jsonl")
    assert config.max_row_chars == 1_000_000
    assert config.tokenize_settings.max_row_chars == 1_000_000
    assert DataConfig(data="d.jsonl", max_row_chars=None).tokenize_settings.max_row_chars is None
    with pytest.raises(DpokitError, match="max_row_chars must be ≥ 1 or null, got 0"):
        DataConfig(data="d.jsonl", max_row_chars=0).validate()


# --- progress --------------------------------------------------------------------------------

def test_tokenisation_logs_its_size_and_shows_a_bar_when_asked(tokenizer, tmp_path, caplog,
                                                               capsys):
    data = write_jsonl(tmp_path / "data.jsonl", PAIRS)
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        load_preference_pairs(data, tokenizer, progress=True)
    assert "tokenising 3 rows (text)" in caplog.text
    assert "tokenising" in capsys.readouterr().err  # the tqdm bar
    load_preference_pairs(data, tokenizer)  # default: a bar only on a terminal, after 2 s
    assert "tokenising" not in capsys.readouterr().err
